// Argument checking and preparation shared by the CPU and CUDA implementations of the
// pid_fast ops. Every op streams a few (B, ...) tensors and reads per-sample coefficient
// vectors (B,); the kernels see rows of D = numel / B elements laid out back to back.
//
// Only the LibTorch Stable ABI is used (torch/csrc/stable, torch/headeronly; built with
// -DTORCH_TARGET_VERSION, see setup.py): the library calls torch through its C shim only, so
// one build loads in every torch from the target version on.
#pragma once

#include <torch/csrc/stable/device.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "pid_math.h"

namespace pid_fast {

using Tensor = torch::stable::Tensor;
using OptTensor = std::optional<torch::stable::Tensor>;
using ScalarType = torch::headeronly::ScalarType;

namespace detail {
template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream s;
  ((s << args), ...);
  return s.str();
}
}  // namespace detail

// Throws std::runtime_error (RuntimeError in Python) with the message alone: the messages
// name the op and the argument.
#define PID_CHECK(cond, ...)                                                     \
  do {                                                                           \
    if (!(cond)) throw std::runtime_error(::pid_fast::detail::cat(__VA_ARGS__)); \
  } while (0)

// "[3, 2, 5]", "cpu", "cuda:0": as torch prints shapes and devices.
std::string shape_str(const Tensor& x);
std::string device_str(const torch::stable::Device& d);

// A new uninitialised tensor with like's sizes, strides and device, of the given dtype.
Tensor empty_strided_like(const Tensor& like, ScalarType dtype);
// A new uninitialised 1-d tensor of n elements on like's device.
Tensor empty_1d(const Tensor& like, int64_t n, ScalarType dtype);

inline bool is_set(const OptTensor& v) { return v.has_value() && v->defined(); }

// The streamed tensors of one op, in a common dense layout (row b occupies elements
// [b*D, (b+1)*D) of memory), plus the float32 coefficient vectors.
struct Rows {
  std::vector<Tensor> streams;
  std::vector<Tensor> coefs;  // kept alive for the raw pointers below
  int64_t B = 0;
  int64_t D = 0;
  CoefPtrs ptrs{};
  // A new tensor with the shape and memory layout of the streams.
  Tensor empty_like_rows(ScalarType dtype) const { return empty_strided_like(streams.front(), dtype); }
};

// Validates (names every argument in its messages) and prepares the streams: same shape,
// device and floating dtype; copied to a contiguous layout only when their layouts differ
// or are not dense.
Rows prepare_streams(const char* op, const std::vector<std::pair<const char*, Tensor>>& streams);

// Validates and converts a per-sample vector to float32 contiguous (B,); returns its pointer
// (or null for an absent optional one).
const float* prepare_coef(const char* op, Rows& rows, const char* name, const OptTensor& v);

// The streams of residual/loss: noise, f_t, f_t2, teacher_out and, when a guide is given,
// guide_out (checked against teacher_out; guide_scale must be given with it and only with it).
Rows prepare_pid_streams(const char* op, const Tensor& noise, const Tensor& f_t,
                         const Tensor& f_t2, const Tensor& teacher_out,
                         const OptTensor& guide_out, const OptTensor& guide_scale);

// Whether rows carries the guide stream (streams[4]) and its scale (ptrs.guide_scale).
inline bool has_guide(const Rows& rows) { return rows.ptrs.guide_scale != nullptr; }

// The coefficient set of residual/loss: t, t2, optional a1 b1 a2 b2, c_skip, c_out, weight,
// guide_scale.
void prepare_pid_coefs(const char* op, Rows& rows, const Tensor& t, const Tensor& t2,
                       const OptTensor& a1, const OptTensor& b1, const OptTensor& a2,
                       const OptTensor& b2, const Tensor& c_skip, const Tensor& c_out,
                       const OptTensor& weight, const OptTensor& guide_scale, double sigma_max);

void check_norm(int64_t norm, double huber_c);

// Work split used by every kernel: each row is cut into chunks of `chunk` elements.
inline int64_t num_chunks(int64_t D, int64_t chunk) { return (D + chunk - 1) / chunk; }

}  // namespace pid_fast
