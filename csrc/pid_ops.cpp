// Op schemas (one STABLE_TORCH_LIBRARY for every device), argument preparation, build info.
// Autograd of assemble/residual/loss is registered from Python (pid_fast/ops/library.py):
// the stable ABI has no autograd Function.
#include "pid_ops.h"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/shim_utils.h>

#include <algorithm>
#include <array>
#include <sstream>

namespace pid_fast {

using torch::headeronly::DeviceType;

std::string shape_str(const Tensor& x) {
  std::ostringstream s;
  s << "[";
  for (int64_t d = 0; d < x.dim(); ++d) s << (d ? ", " : "") << x.size(d);
  s << "]";
  return s.str();
}

std::string device_str(const torch::stable::Device& d) {
  std::string s;
  switch (d.type()) {
    case DeviceType::CPU: s = "cpu"; break;
    case DeviceType::CUDA: s = "cuda"; break;
    case DeviceType::Meta: s = "meta"; break;
    default: s = "device type " + std::to_string(static_cast<int>(d.type()));
  }
  return d.index() >= 0 ? s + ":" + std::to_string(d.index()) : s;
}

// Allocations go straight to the C shim's aoti_torch_empty_strided (at::empty_strided): a few
// microseconds less per call than a boxed dispatcher call (torch_call_dispatcher).
static int32_t shim_dtype(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::Float: return aoti_torch_dtype_float32();
    case ScalarType::Half: return aoti_torch_dtype_float16();
    case ScalarType::BFloat16: return aoti_torch_dtype_bfloat16();
    default: throw std::runtime_error(detail::cat("pid_fast: no output of dtype ", dtype));
  }
}

static Tensor empty_strided(const Tensor& like, int64_t ndim, const int64_t* sizes,
                            const int64_t* strides, ScalarType dtype) {
  int32_t device_type = 0, device_index = 0;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(like.get(), &device_index));
  AtenTensorHandle out = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(ndim, sizes, strides, shim_dtype(dtype),
                                                  device_type, device_index, &out));
  return Tensor(out);
}

Tensor empty_strided_like(const Tensor& like, ScalarType dtype) {
  const auto sizes = like.sizes();
  const auto strides = like.strides();
  return empty_strided(like, like.dim(), sizes.data(), strides.data(), dtype);
}

Tensor empty_1d(const Tensor& like, int64_t n, ScalarType dtype) {
  const int64_t stride = 1;
  return empty_strided(like, 1, &n, &stride, dtype);
}

static bool is_floating(ScalarType s) {
  return s == ScalarType::Float || s == ScalarType::Double || s == ScalarType::Half ||
         s == ScalarType::BFloat16;
}

static bool same_sizes(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != b.size(d)) return false;
  return true;
}

static bool same_strides(const Tensor& a, const Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.stride(d) != b.stride(d)) return false;
  return true;
}

// Non-overlapping and dense: the elements fill numel() consecutive memory slots.
static bool is_dense(const Tensor& x) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size != 1
  for (int64_t d = 0; d < x.dim(); ++d)
    if (x.size(d) != 1) dims.emplace_back(x.stride(d), x.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

Rows prepare_streams(const char* op, const std::vector<std::pair<const char*, Tensor>>& streams) {
  PID_CHECK(!streams.empty(), op, ": no input tensors");
  const auto& [name0, ref] = streams.front();
  PID_CHECK(ref.defined(), op, ": ", name0, " is undefined");
  PID_CHECK(ref.dim() >= 1, op, ": ", name0, " must have a batch dimension (B, ...), got a ",
            "0-d tensor");
  const auto dtype = ref.scalar_type();
  PID_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Half ||
                dtype == ScalarType::BFloat16,
            op, ": ", name0, " must be float32, float16 or bfloat16, got ", dtype);
  Rows rows;
  rows.B = ref.size(0);
  rows.D = 1;
  for (int64_t d = 1; d < ref.dim(); ++d) rows.D *= ref.size(d);
  PID_CHECK(rows.D > 0, op, ": ", name0, " must have at least one element per sample, got shape ",
            shape_str(ref));

  // Keep the callers' layout when all streams share one dense layout whose rows are
  // contiguous blocks (NCHW and channels_last both are); otherwise copy to contiguous.
  bool shared_layout = is_dense(ref) && (rows.B <= 1 || ref.stride(0) == rows.D);
  const auto ref_device = ref.device();
  for (const auto& [name, x] : streams) {
    PID_CHECK(x.defined(), op, ": ", name, " is undefined");
    const auto device = x.device();
    PID_CHECK(device == ref_device, op, ": ", name, " is on ", device_str(device), " but ", name0,
              " is on ", device_str(ref_device), "; all inputs must be on one device");
    PID_CHECK(x.scalar_type() == dtype, op, ": ", name, " has dtype ", x.scalar_type(), " but ",
              name0, " has dtype ", dtype, "; the streamed tensors must share one dtype");
    PID_CHECK(same_sizes(x, ref), op, ": ", name, " has shape ", shape_str(x), " but ", name0,
              " has shape ", shape_str(ref));
    shared_layout = shared_layout && same_strides(x, ref);
  }
  for (const auto& [name, x] : streams)
    rows.streams.push_back(shared_layout ? x : torch::stable::contiguous(x));
  return rows;
}

const float* prepare_coef(const char* op, Rows& rows, const char* name, const OptTensor& v) {
  if (!is_set(v)) return nullptr;
  const Tensor& x = *v;
  const Tensor& ref = rows.streams.front();
  PID_CHECK(x.device() == ref.device(), op, ": ", name, " is on ", device_str(x.device()),
            " but the data tensors are on ", device_str(ref.device()));
  PID_CHECK(is_floating(x.scalar_type()), op, ": ", name,
            " must be a floating-point tensor, got ", x.scalar_type());
  PID_CHECK(x.dim() == 1 && x.size(0) == rows.B, op, ": ", name,
            " must be a per-sample vector of shape (", rows.B, ",), got shape ", shape_str(x));
  Tensor c = x.scalar_type() == ScalarType::Float ? x : torch::stable::to(x, ScalarType::Float);
  if (!c.is_contiguous()) c = torch::stable::contiguous(c);
  rows.coefs.push_back(c);
  return c.const_data_ptr<float>();
}

Rows prepare_pid_streams(const char* op, const Tensor& noise, const Tensor& f_t,
                         const Tensor& f_t2, const Tensor& teacher_out,
                         const OptTensor& guide_out, const OptTensor& guide_scale) {
  PID_CHECK(is_set(guide_out) == is_set(guide_scale), op, ": ",
            is_set(guide_out) ? "guide_scale (the guidance scale w, a per-sample vector) must be "
                                "given with guide_out"
                              : "guide_scale was given without guide_out (the guide teacher's "
                                "output)");
  if (!is_set(guide_out))
    return prepare_streams(
        op, {{"noise", noise}, {"f_t", f_t}, {"f_t2", f_t2}, {"teacher_out", teacher_out}});
  // guide_out is checked against teacher_out first, so its messages name both.
  const Tensor& g = *guide_out;
  PID_CHECK(g.device() == teacher_out.device(), op, ": guide_out is on ", device_str(g.device()),
            " but teacher_out is on ", device_str(teacher_out.device()));
  PID_CHECK(g.scalar_type() == teacher_out.scalar_type(), op, ": guide_out has dtype ",
            g.scalar_type(), " but teacher_out has dtype ", teacher_out.scalar_type());
  PID_CHECK(same_sizes(g, teacher_out), op, ": guide_out has shape ", shape_str(g),
            " but teacher_out has shape ", shape_str(teacher_out));
  return prepare_streams(op, {{"noise", noise}, {"f_t", f_t}, {"f_t2", f_t2},
                              {"teacher_out", teacher_out}, {"guide_out", g}});
}

void prepare_pid_coefs(const char* op, Rows& rows, const Tensor& t, const Tensor& t2,
                       const OptTensor& a1, const OptTensor& b1, const OptTensor& a2,
                       const OptTensor& b2, const Tensor& c_skip, const Tensor& c_out,
                       const OptTensor& weight, const OptTensor& guide_scale,
                       double sigma_max) {
  const bool any_ab = is_set(a1) || is_set(b1) || is_set(a2) || is_set(b2);
  const bool all_ab = is_set(a1) && is_set(b1) && is_set(a2) && is_set(b2);
  PID_CHECK(!any_ab || all_ab, op, ": give all of a1, b1, a2, b2 or none of them");
  PID_CHECK(all_ab || sigma_max > 0, op, ": sigma_max must be positive, got ", sigma_max);
  CoefPtrs& p = rows.ptrs;
  p.t = prepare_coef(op, rows, "t", t);
  p.t2 = prepare_coef(op, rows, "t2", t2);
  p.a1 = prepare_coef(op, rows, "a1", a1);
  p.b1 = prepare_coef(op, rows, "b1", b1);
  p.a2 = prepare_coef(op, rows, "a2", a2);
  p.b2 = prepare_coef(op, rows, "b2", b2);
  p.c_skip = prepare_coef(op, rows, "c_skip", c_skip);
  p.c_out = prepare_coef(op, rows, "c_out", c_out);
  p.weight = prepare_coef(op, rows, "weight", weight);
  p.guide_scale = prepare_coef(op, rows, "guide_scale", guide_scale);
  p.sigma_max = sigma_max;
}

void check_norm(int64_t norm, double huber_c) {
  PID_CHECK(norm == kL2 || norm == kL1 || norm == kHuber,
            "loss: norm must be 0 (l2), 1 (l1) or 2 (huber), got ", norm);
  PID_CHECK(norm != kHuber || huber_c > 0,
            "loss: huber_c must be positive for the huber norm, got ", huber_c);
}

static std::string build_info() {
  std::ostringstream s;
  s << "{\"cpu\": true";
#ifdef PID_FAST_WITH_CUDA
  s << ", \"cuda\": true, \"cuda_archs\": \"" << PID_FAST_CUDA_ARCHS << "\"";
#else
  s << ", \"cuda\": false, \"cuda_archs\": \"\"";
#endif
  // The oldest torch this build loads in (its stable ABI target, TORCH_FEATURE_VERSION).
  s << ", \"min_torch\": \"" << ((TORCH_FEATURE_VERSION >> 56) & 0xff) << "."
    << ((TORCH_FEATURE_VERSION >> 48) & 0xff) << "\"}";
  return s.str();
}

}  // namespace pid_fast

STABLE_TORCH_LIBRARY(pid_fast, m) {
  // x = a n + b F and the teacher input c_in x (in out_dtype, default F's dtype).
  m.def("assemble(Tensor noise, Tensor f, Tensor a, Tensor b, Tensor c_in, ScalarType? out_dtype=None)"
        " -> (Tensor, Tensor)");
  // pred = y - t (y - y2)/(t - t2), target = c_skip y + c_out G. With a guide (guide_out = Gg,
  // guide_scale = w, both or neither): G -> w G + (1 - w) Gg, the guided teacher
  // D_w = D_g + w (D_m - D_g).
  m.def("residual(Tensor noise, Tensor f_t, Tensor f_t2, Tensor teacher_out, Tensor t, Tensor t2,"
        " Tensor? a1, Tensor? b1, Tensor? a2, Tensor? b2, Tensor c_skip, Tensor c_out,"
        " float sigma_max, Tensor? guide_out=None, Tensor? guide_scale=None) -> (Tensor, Tensor)");
  // Per-sample loss (float32, B) and, when need_grad, the per-row gradient factor (B) and the
  // gradient directions for F(t) and F(t2): dL_b/dF = factor_b * dir (computed in one pass).
  // The guide as in residual.
  m.def("loss(Tensor noise, Tensor f_t, Tensor f_t2, Tensor teacher_out, Tensor t, Tensor t2,"
        " Tensor? a1, Tensor? b1, Tensor? a2, Tensor? b2, Tensor c_skip, Tensor c_out,"
        " Tensor? weight, float sigma_max, int norm, float huber_c, bool need_grad,"
        " Tensor? guide_out=None, Tensor? guide_scale=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // out = x * s1[row] (* s2[row]), computed in float32, stored in x's dtype.
  m.def("scale_rows(Tensor x, Tensor s1, Tensor? s2=None) -> Tensor");
  m.def("build_info() -> str");
}

// No tensor argument: one kernel for every dispatch key.
STABLE_TORCH_LIBRARY_IMPL(pid_fast, CompositeExplicitAutograd, m) {
  m.impl("build_info", TORCH_BOX(&pid_fast::build_info));
}
