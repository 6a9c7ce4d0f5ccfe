// The op bodies, shared by every device: validate, allocate, call the device's kernels.
// A device provides a struct K with static kernel entry points (see cpu/pid_cpu.cpp and
// cuda/pid_cuda.cpp) and registers assemble_op<K>, residual_op<K>, ... for its dispatch key.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "pid_ops.h"

namespace pid_fast {

template <class K>
std::tuple<at::Tensor, at::Tensor> assemble_op(const at::Tensor& noise, const at::Tensor& f,
                                               const at::Tensor& a, const at::Tensor& b,
                                               const at::Tensor& c_in,
                                               std::optional<at::ScalarType> out_dtype) {
  Rows rows = prepare_streams("assemble", {{"noise", noise}, {"f", f}});
  const float* pa = prepare_coef("assemble", rows, "a", a);
  const float* pb = prepare_coef("assemble", rows, "b", b);
  const float* pc = prepare_coef("assemble", rows, "c_in", c_in);
  const auto dtype = noise.scalar_type();
  const auto odtype = out_dtype.value_or(dtype);
  TORCH_CHECK(odtype == at::kFloat || odtype == at::kHalf || odtype == at::kBFloat16,
              "assemble: out_dtype must be float32, float16 or bfloat16, got ", odtype);
  at::Tensor x = rows.empty_like_rows(dtype), x_in = rows.empty_like_rows(odtype);
  if (rows.B > 0) K::assemble(rows, pa, pb, pc, x, x_in);
  return {x, x_in};
}

template <class K>
std::tuple<at::Tensor, at::Tensor> residual_op(
    const at::Tensor& noise, const at::Tensor& f_t, const at::Tensor& f_t2,
    const at::Tensor& teacher_out, const at::Tensor& t, const at::Tensor& t2,
    const std::optional<at::Tensor>& a1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& a2, const std::optional<at::Tensor>& b2,
    const at::Tensor& c_skip, const at::Tensor& c_out, double sigma_max) {
  Rows rows = prepare_streams(
      "residual", {{"noise", noise}, {"f_t", f_t}, {"f_t2", f_t2}, {"teacher_out", teacher_out}});
  prepare_pid_coefs("residual", rows, t, t2, a1, b1, a2, b2, c_skip, c_out, std::nullopt,
                    sigma_max);
  at::Tensor pred = rows.empty_like_rows(noise.scalar_type());
  at::Tensor target = rows.empty_like_rows(noise.scalar_type());
  if (rows.B > 0) K::residual(rows, pred, target);
  return {pred, target};
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_op(
    const at::Tensor& noise, const at::Tensor& f_t, const at::Tensor& f_t2,
    const at::Tensor& teacher_out, const at::Tensor& t, const at::Tensor& t2,
    const std::optional<at::Tensor>& a1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& a2, const std::optional<at::Tensor>& b2,
    const at::Tensor& c_skip, const at::Tensor& c_out, const std::optional<at::Tensor>& weight,
    double sigma_max, int64_t norm, double huber_c, bool need_grad) {
  check_norm(norm, huber_c);
  Rows rows = prepare_streams(
      "loss", {{"noise", noise}, {"f_t", f_t}, {"f_t2", f_t2}, {"teacher_out", teacher_out}});
  prepare_pid_coefs("loss", rows, t, t2, a1, b1, a2, b2, c_skip, c_out, weight, sigma_max);
  auto f32 = noise.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows.B}, f32);
  at::Tensor scale = at::empty({need_grad ? rows.B : 0}, f32);
  at::Tensor d1 = need_grad ? rows.empty_like_rows(noise.scalar_type())
                            : at::empty({0}, noise.options());
  at::Tensor d2 = need_grad ? rows.empty_like_rows(noise.scalar_type())
                            : at::empty({0}, noise.options());
  if (rows.B > 0) K::loss(rows, (int)norm, huber_c, need_grad, loss, scale, d1, d2);
  return {loss, scale, d1, d2};
}

template <class K>
at::Tensor scale_rows_op(const at::Tensor& x, const at::Tensor& s1,
                         const std::optional<at::Tensor>& s2) {
  Rows rows = prepare_streams("scale_rows", {{"x", x}});
  const float* p1 = prepare_coef("scale_rows", rows, "s1", s1);
  const float* p2 = prepare_coef("scale_rows", rows, "s2", s2);
  at::Tensor out = rows.empty_like_rows(x.scalar_type());
  if (rows.B > 0) K::scale_rows(rows, p1, p2, out);
  return out;
}

#define PID_FAST_REGISTER_IMPLS(KEY, K)                 \
  TORCH_LIBRARY_IMPL(pid_fast, KEY, m) {                \
    m.impl("assemble", &pid_fast::assemble_op<K>);      \
    m.impl("residual", &pid_fast::residual_op<K>);      \
    m.impl("loss", &pid_fast::loss_op<K>);              \
    m.impl("scale_rows", &pid_fast::scale_rows_op<K>);  \
  }

}  // namespace pid_fast
