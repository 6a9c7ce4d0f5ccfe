// Argument checking and preparation shared by the CPU and CUDA implementations of the
// pid_fast ops. Every op streams a few (B, ...) tensors and reads per-sample coefficient
// vectors (B,); the kernels see rows of D = numel / B elements laid out back to back.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "pid_math.h"

namespace pid_fast {

// The streamed tensors of one op, in a common dense layout (row b occupies elements
// [b*D, (b+1)*D) of memory), plus the float32 coefficient vectors.
struct Rows {
  std::vector<at::Tensor> streams;
  std::vector<at::Tensor> coefs;  // kept alive for the raw pointers below
  int64_t B = 0;
  int64_t D = 0;
  CoefPtrs ptrs{};
  // A new tensor with the shape and memory layout of the streams.
  at::Tensor empty_like_rows(at::ScalarType dtype) const;
};

// Validates (names every argument in its messages) and prepares the streams: same shape,
// device and floating dtype; copied to a contiguous layout only when their layouts differ
// or are not dense.
Rows prepare_streams(const char* op, const std::vector<std::pair<const char*, at::Tensor>>& streams);

// Validates and converts a per-sample vector to float32 contiguous (B,); returns its pointer
// (or null for an absent optional one).
const float* prepare_coef(const char* op, Rows& rows, const char* name,
                          const std::optional<at::Tensor>& v);

// The coefficient set of residual/loss: t, t2, optional a1 b1 a2 b2, c_skip, c_out, weight.
void prepare_pid_coefs(const char* op, Rows& rows, const at::Tensor& t, const at::Tensor& t2,
                       const std::optional<at::Tensor>& a1, const std::optional<at::Tensor>& b1,
                       const std::optional<at::Tensor>& a2, const std::optional<at::Tensor>& b2,
                       const at::Tensor& c_skip, const at::Tensor& c_out,
                       const std::optional<at::Tensor>& weight, double sigma_max);

void check_norm(int64_t norm, double huber_c);

// Work split used by every kernel: each row is cut into chunks of `chunk` elements.
inline int64_t num_chunks(int64_t D, int64_t chunk) { return (D + chunk - 1) / chunk; }

}  // namespace pid_fast
