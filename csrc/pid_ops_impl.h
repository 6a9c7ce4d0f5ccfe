// The op bodies, shared by every device: validate, allocate, call the device's kernels.
// A device provides a struct K with static kernel entry points (see cpu/pid_cpu.cpp and
// cuda/pid_cuda.cpp) and registers assemble_op<K>, residual_op<K>, ... for its dispatch key.
#pragma once

#include <torch/csrc/stable/library.h>

#include <tuple>

#include "pid_ops.h"

namespace pid_fast {

template <class K>
std::tuple<Tensor, Tensor> assemble_op(const Tensor& noise, const Tensor& f, const Tensor& a,
                                       const Tensor& b, const Tensor& c_in,
                                       std::optional<ScalarType> out_dtype) {
  Rows rows = prepare_streams("assemble", {{"noise", noise}, {"f", f}});
  const float* pa = prepare_coef("assemble", rows, "a", a);
  const float* pb = prepare_coef("assemble", rows, "b", b);
  const float* pc = prepare_coef("assemble", rows, "c_in", c_in);
  const auto dtype = noise.scalar_type();
  const auto odtype = out_dtype.value_or(dtype);
  PID_CHECK(odtype == ScalarType::Float || odtype == ScalarType::Half ||
                odtype == ScalarType::BFloat16,
            "assemble: out_dtype must be float32, float16 or bfloat16, got ", odtype);
  Tensor x = rows.empty_like_rows(dtype), x_in = rows.empty_like_rows(odtype);
  if (rows.B > 0) K::assemble(rows, pa, pb, pc, x, x_in);
  return {x, x_in};
}

template <class K>
std::tuple<Tensor, Tensor> residual_op(
    const Tensor& noise, const Tensor& f_t, const Tensor& f_t2,
    const Tensor& teacher_out, const Tensor& t, const Tensor& t2,
    const OptTensor& a1, const OptTensor& b1,
    const OptTensor& a2, const OptTensor& b2,
    const Tensor& c_skip, const Tensor& c_out, double sigma_max,
    const OptTensor& guide_out, const OptTensor& guide_scale) {
  Rows rows = prepare_pid_streams("residual", noise, f_t, f_t2, teacher_out, guide_out,
                                  guide_scale);
  prepare_pid_coefs("residual", rows, t, t2, a1, b1, a2, b2, c_skip, c_out, std::nullopt,
                    guide_scale, sigma_max);
  Tensor pred = rows.empty_like_rows(noise.scalar_type());
  Tensor target = rows.empty_like_rows(noise.scalar_type());
  if (rows.B > 0) K::residual(rows, pred, target);
  return {pred, target};
}

template <class K>
std::tuple<Tensor, Tensor, Tensor, Tensor> loss_op(
    const Tensor& noise, const Tensor& f_t, const Tensor& f_t2,
    const Tensor& teacher_out, const Tensor& t, const Tensor& t2,
    const OptTensor& a1, const OptTensor& b1,
    const OptTensor& a2, const OptTensor& b2,
    const Tensor& c_skip, const Tensor& c_out, const OptTensor& weight,
    double sigma_max, int64_t norm, double huber_c, bool need_grad,
    const OptTensor& guide_out, const OptTensor& guide_scale) {
  check_norm(norm, huber_c);
  Rows rows = prepare_pid_streams("loss", noise, f_t, f_t2, teacher_out, guide_out, guide_scale);
  prepare_pid_coefs("loss", rows, t, t2, a1, b1, a2, b2, c_skip, c_out, weight, guide_scale,
                    sigma_max);
  const ScalarType dtype = noise.scalar_type();
  Tensor loss = empty_1d(noise, rows.B, ScalarType::Float);
  Tensor scale = empty_1d(noise, need_grad ? rows.B : 0, ScalarType::Float);
  Tensor d1 = need_grad ? rows.empty_like_rows(dtype) : empty_1d(noise, 0, dtype);
  Tensor d2 = need_grad ? rows.empty_like_rows(dtype) : empty_1d(noise, 0, dtype);
  if (rows.B > 0) K::loss(rows, (int)norm, huber_c, need_grad, loss, scale, d1, d2);
  return {loss, scale, d1, d2};
}

template <class K>
Tensor scale_rows_op(const Tensor& x, const Tensor& s1, const OptTensor& s2) {
  Rows rows = prepare_streams("scale_rows", {{"x", x}});
  const float* p1 = prepare_coef("scale_rows", rows, "s1", s1);
  const float* p2 = prepare_coef("scale_rows", rows, "s2", s2);
  Tensor out = rows.empty_like_rows(x.scalar_type());
  if (rows.B > 0) K::scale_rows(rows, p1, p2, out);
  return out;
}

#define PID_FAST_REGISTER_IMPLS(KEY, K)                             \
  STABLE_TORCH_LIBRARY_IMPL(pid_fast, KEY, m) {                     \
    m.impl("assemble", TORCH_BOX(&pid_fast::assemble_op<K>));       \
    m.impl("residual", TORCH_BOX(&pid_fast::residual_op<K>));       \
    m.impl("loss", TORCH_BOX(&pid_fast::loss_op<K>));               \
    m.impl("scale_rows", TORCH_BOX(&pid_fast::scale_rows_op<K>));   \
  }

}  // namespace pid_fast
