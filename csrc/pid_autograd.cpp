// Autograd kernels of the pid_fast ops, in C++ so a differentiable call costs a few
// microseconds of host time (a Python-registered formula costs ~100 us per call). They
// redispatch to the device kernels below autograd; the backward is a per-row scaling:
//   assemble: dL/dF  = b * dL/dx
//   residual: dL/dF1 = b1 (1 - k) dL/dpred,  dL/dF2 = b2 k dL/dpred,  k = t/(t - t2)
//   loss:     dL/dF  = g_b * factor_b * dir  (factor and dir written by the forward pass)
// Gradients flow to F(t), F(t2) only: the teacher's side is detached by definition.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace pid_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;
using OptT = std::optional<Tensor>;

template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using AssembleSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                               const Tensor&, const Tensor&,
                                               std::optional<at::ScalarType>);
using ResidualSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                               const Tensor&, const Tensor&, const Tensor&,
                                               const OptT&, const OptT&, const OptT&, const OptT&,
                                               const Tensor&, const Tensor&, double);
using LossSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const OptT&, const OptT&, const OptT&, const OptT&, const Tensor&, const Tensor&, const OptT&,
    double, int64_t, double, bool);
using ScaleSig = Tensor(const Tensor&, const Tensor&, const OptT&);

Tensor scale_rows(const Tensor& x, const Tensor& s1, const OptT& s2 = std::nullopt) {
  static auto h = op<ScaleSig>("pid_fast::scale_rows");
  return h.call(x, s1, s2);
}

Tensor f32(const Tensor& x) { return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat); }

class AssembleFn : public torch::autograd::Function<AssembleFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& noise, const Tensor& f,
                               const Tensor& a, const Tensor& b, const Tensor& c_in,
                               std::optional<at::ScalarType> out_dtype) {
    static auto h = op<AssembleSig>("pid_fast::assemble");
    ctx->set_materialize_grads(false);  // no zero tensors for the outputs nobody differentiates
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [x, x_in] = h.call(noise, f, a, b, c_in, out_dtype);
    ctx->save_for_backward({b});
    ctx->mark_non_differentiable({x_in});  // the teacher's input is detached
    return {x, x_in};
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    Tensor g_f;
    if (g[0].defined() && ctx->needs_input_grad(1)) g_f = scale_rows(g[0], ctx->get_saved_variables()[0]);
    return {Tensor(), g_f, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

class ResidualFn : public torch::autograd::Function<ResidualFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& noise, const Tensor& f_t,
                               const Tensor& f_t2, const Tensor& teacher_out, const Tensor& t,
                               const Tensor& t2, const OptT& a1, const OptT& b1, const OptT& a2,
                               const OptT& b2, const Tensor& c_skip, const Tensor& c_out,
                               double sigma_max) {
    static auto h = op<ResidualSig>("pid_fast::residual");
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [pred, target] =
        h.call(noise, f_t, f_t2, teacher_out, t, t2, a1, b1, a2, b2, c_skip, c_out, sigma_max);
    // d pred/d F(t) = b1 (1 - k), d pred/d F(t2) = b2 k (B-sized, computed once here).
    const Tensor tf = f32(t), t2f = f32(t2);
    const Tensor k = tf / (tf - t2f);
    const Tensor bb1 = b1.has_value() && b1->defined() ? f32(*b1) : 1.0 - tf / sigma_max;
    const Tensor bb2 = b2.has_value() && b2->defined() ? f32(*b2) : 1.0 - t2f / sigma_max;
    ctx->save_for_backward({bb1 * (1.0 - k), bb2 * k});
    ctx->mark_non_differentiable({target});  // the target is detached
    return {pred, target};
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const auto s = ctx->get_saved_variables();
    Tensor g1, g2;
    if (g[0].defined() && ctx->needs_input_grad(1)) g1 = scale_rows(g[0], s[0]);
    if (g[0].defined() && ctx->needs_input_grad(2)) g2 = scale_rows(g[0], s[1]);
    variable_list out(13);
    out[1] = g1;
    out[2] = g2;
    return out;
  }
};

class LossFn : public torch::autograd::Function<LossFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& noise, const Tensor& f_t,
                               const Tensor& f_t2, const Tensor& teacher_out, const Tensor& t,
                               const Tensor& t2, const OptT& a1, const OptT& b1, const OptT& a2,
                               const OptT& b2, const Tensor& c_skip, const Tensor& c_out,
                               const OptT& weight, double sigma_max, int64_t norm,
                               double huber_c, bool need_grad) {
    static auto h = op<LossSig>("pid_fast::loss");
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, scale, d1, d2] = h.call(noise, f_t, f_t2, teacher_out, t, t2, a1, b1, a2, b2,
                                        c_skip, c_out, weight, sigma_max, norm, huber_c,
                                        need_grad);
    if (!need_grad) {
      // Differentiated although the caller said no gradient was needed: the backward pass
      // recomputes the directions (correct, one extra pass).
      ctx->saved_data["recompute"] = true;
      ctx->saved_data["sigma_max"] = sigma_max;
      ctx->saved_data["norm"] = norm;
      ctx->saved_data["huber_c"] = huber_c;
      auto opt = [](const OptT& v) { return v.has_value() ? *v : Tensor(); };
      ctx->save_for_backward({noise, f_t, f_t2, teacher_out, t, t2, opt(a1), opt(b1), opt(a2),
                              opt(b2), c_skip, c_out, opt(weight)});
    } else {
      ctx->saved_data["recompute"] = false;
      ctx->save_for_backward({scale, d1, d2});
    }
    ctx->mark_non_differentiable({scale, d1, d2});
    return {loss, scale, d1, d2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list g) {
    variable_list out(17);
    if (!g[0].defined()) return out;
    auto saved = ctx->get_saved_variables();
    Tensor scale, d1, d2;
    if (ctx->saved_data["recompute"].toBool()) {
      static auto h = op<LossSig>("pid_fast::loss");
      auto opt = [](const Tensor& v) -> OptT { return v.defined() ? OptT(v) : std::nullopt; };
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(std::ignore, scale, d1, d2) =
          h.call(saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], opt(saved[6]),
                 opt(saved[7]), opt(saved[8]), opt(saved[9]), saved[10], saved[11],
                 opt(saved[12]), ctx->saved_data["sigma_max"].toDouble(),
                 ctx->saved_data["norm"].toInt(), ctx->saved_data["huber_c"].toDouble(), true);
    } else {
      scale = saved[0];
      d1 = saved[1];
      d2 = saved[2];
    }
    // One B-sized product (g is often an expanded scalar from .mean()), then one pass each.
    const Tensor k = f32(g[0]) * scale;
    if (ctx->needs_input_grad(1)) out[1] = scale_rows(d1, k);
    if (ctx->needs_input_grad(2)) out[2] = scale_rows(d2, k);
    return out;
  }
};

std::tuple<Tensor, Tensor> assemble_autograd(const Tensor& noise, const Tensor& f,
                                             const Tensor& a, const Tensor& b,
                                             const Tensor& c_in,
                                             std::optional<at::ScalarType> out_dtype) {
  auto r = AssembleFn::apply(noise, f, a, b, c_in, out_dtype);
  return {r[0], r[1]};
}

std::tuple<Tensor, Tensor> residual_autograd(const Tensor& noise, const Tensor& f_t,
                                             const Tensor& f_t2, const Tensor& teacher_out,
                                             const Tensor& t, const Tensor& t2, const OptT& a1,
                                             const OptT& b1, const OptT& a2, const OptT& b2,
                                             const Tensor& c_skip, const Tensor& c_out,
                                             double sigma_max) {
  auto r = ResidualFn::apply(noise, f_t, f_t2, teacher_out, t, t2, a1, b1, a2, b2, c_skip, c_out,
                             sigma_max);
  return {r[0], r[1]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> loss_autograd(
    const Tensor& noise, const Tensor& f_t, const Tensor& f_t2, const Tensor& teacher_out,
    const Tensor& t, const Tensor& t2, const OptT& a1, const OptT& b1, const OptT& a2,
    const OptT& b2, const Tensor& c_skip, const Tensor& c_out, const OptT& weight,
    double sigma_max, int64_t norm, double huber_c, bool need_grad) {
  auto r = LossFn::apply(noise, f_t, f_t2, teacher_out, t, t2, a1, b1, a2, b2, c_skip, c_out,
                         weight, sigma_max, norm, huber_c, need_grad);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pid_fast, Autograd, m) {
  m.impl("assemble", &assemble_autograd);
  m.impl("residual", &residual_autograd);
  m.impl("loss", &loss_autograd);
}

}  // namespace pid_fast
