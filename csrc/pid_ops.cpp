// Op schemas (one TORCH_LIBRARY for every device), argument preparation, build info.
#include "pid_ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <sstream>

namespace pid_fast {

at::Tensor Rows::empty_like_rows(at::ScalarType dtype) const {
  const at::Tensor& ref = streams.front();
  return at::empty_strided(ref.sizes(), ref.strides(), ref.options().dtype(dtype));
}

static bool is_floating(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

Rows prepare_streams(const char* op,
                     const std::vector<std::pair<const char*, at::Tensor>>& streams) {
  TORCH_CHECK(!streams.empty(), op, ": no input tensors");
  const auto& [name0, ref] = streams.front();
  TORCH_CHECK(ref.defined(), op, ": ", name0, " is undefined");
  TORCH_CHECK(ref.dim() >= 1, op, ": ", name0, " must have a batch dimension (B, ...), got a ",
              "0-d tensor");
  const auto dtype = ref.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ",
              name0, " must be float32, float16 or bfloat16, got ", dtype);
  Rows rows;
  rows.B = ref.size(0);
  rows.D = rows.B == 0 ? 1 : ref.numel() / rows.B;
  for (int64_t d = 1; rows.B == 0 && d < ref.dim(); ++d) rows.D *= ref.size(d);
  TORCH_CHECK(rows.D > 0, op, ": ", name0, " must have at least one element per sample, got shape ",
              ref.sizes());

  // Keep the callers' layout when all streams share one dense layout whose rows are
  // contiguous blocks (NCHW and channels_last both are); otherwise copy to contiguous.
  bool shared_layout = ref.is_non_overlapping_and_dense() && (rows.B <= 1 || ref.stride(0) == rows.D);
  for (const auto& [name, x] : streams) {
    TORCH_CHECK(x.defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(x.device() == ref.device(), op, ": ", name, " is on ", x.device(), " but ", name0,
                " is on ", ref.device(), "; all inputs must be on one device");
    TORCH_CHECK(x.scalar_type() == dtype, op, ": ", name, " has dtype ", x.scalar_type(), " but ",
                name0, " has dtype ", dtype, "; the streamed tensors must share one dtype");
    TORCH_CHECK(x.sizes() == ref.sizes(), op, ": ", name, " has shape ", x.sizes(), " but ", name0,
                " has shape ", ref.sizes());
    shared_layout = shared_layout && x.strides() == ref.strides();
  }
  for (const auto& [name, x] : streams)
    rows.streams.push_back(shared_layout ? x : x.contiguous());
  return rows;
}

const float* prepare_coef(const char* op, Rows& rows, const char* name,
                          const std::optional<at::Tensor>& v) {
  if (!v.has_value() || !v->defined()) return nullptr;
  const at::Tensor& x = *v;
  const at::Tensor& ref = rows.streams.front();
  TORCH_CHECK(x.device() == ref.device(), op, ": ", name, " is on ", x.device(),
              " but the data tensors are on ", ref.device());
  TORCH_CHECK(is_floating(x.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == rows.B, op, ": ", name,
              " must be a per-sample vector of shape (", rows.B, ",), got shape ", x.sizes());
  at::Tensor c = x.to(at::kFloat).contiguous();
  rows.coefs.push_back(c);
  return c.data_ptr<float>();
}

void prepare_pid_coefs(const char* op, Rows& rows, const at::Tensor& t, const at::Tensor& t2,
                       const std::optional<at::Tensor>& a1, const std::optional<at::Tensor>& b1,
                       const std::optional<at::Tensor>& a2, const std::optional<at::Tensor>& b2,
                       const at::Tensor& c_skip, const at::Tensor& c_out,
                       const std::optional<at::Tensor>& weight, double sigma_max) {
  const bool any_ab = (a1 && a1->defined()) || (b1 && b1->defined()) || (a2 && a2->defined()) ||
                      (b2 && b2->defined());
  const bool all_ab = a1 && a1->defined() && b1 && b1->defined() && a2 && a2->defined() && b2 &&
                      b2->defined();
  TORCH_CHECK(!any_ab || all_ab, op, ": give all of a1, b1, a2, b2 or none of them");
  TORCH_CHECK(all_ab || sigma_max > 0, op, ": sigma_max must be positive, got ", sigma_max);
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
  p.sigma_max = sigma_max;
}

void check_norm(int64_t norm, double huber_c) {
  TORCH_CHECK(norm == kL2 || norm == kL1 || norm == kHuber,
              "loss: norm must be 0 (l2), 1 (l1) or 2 (huber), got ", norm);
  TORCH_CHECK(norm != kHuber || huber_c > 0, "loss: huber_c must be positive for the huber norm, got ",
              huber_c);
}

static std::string build_info() {
  std::ostringstream s;
  s << "{\"cpu\": true";
#ifdef PID_FAST_WITH_CUDA
  s << ", \"cuda\": true, \"cuda_archs\": \"" << PID_FAST_CUDA_ARCHS << "\"";
#else
  s << ", \"cuda\": false, \"cuda_archs\": \"\"";
#endif
  s << "}";
  return s.str();
}

}  // namespace pid_fast

TORCH_LIBRARY(pid_fast, m) {
  // x = a n + b F and the teacher input c_in x (in out_dtype, default F's dtype).
  m.def("assemble(Tensor noise, Tensor f, Tensor a, Tensor b, Tensor c_in, ScalarType? out_dtype=None)"
        " -> (Tensor, Tensor)");
  // pred = y - t (y - y2)/(t - t2), target = c_skip y + c_out G.
  m.def("residual(Tensor noise, Tensor f_t, Tensor f_t2, Tensor teacher_out, Tensor t, Tensor t2,"
        " Tensor? a1, Tensor? b1, Tensor? a2, Tensor? b2, Tensor c_skip, Tensor c_out,"
        " float sigma_max) -> (Tensor, Tensor)");
  // Per-sample loss (float32, B) and, when need_grad, the per-row gradient factor (B) and the
  // gradient directions for F(t) and F(t2): dL_b/dF = factor_b * dir (computed in one pass).
  m.def("loss(Tensor noise, Tensor f_t, Tensor f_t2, Tensor teacher_out, Tensor t, Tensor t2,"
        " Tensor? a1, Tensor? b1, Tensor? a2, Tensor? b2, Tensor c_skip, Tensor c_out,"
        " Tensor? weight, float sigma_max, int norm, float huber_c, bool need_grad)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  // out = x * s1[row] (* s2[row]), computed in float32, stored in x's dtype.
  m.def("scale_rows(Tensor x, Tensor s1, Tensor? s2=None) -> Tensor");
  m.def("build_info() -> str", &pid_fast::build_info);
}
