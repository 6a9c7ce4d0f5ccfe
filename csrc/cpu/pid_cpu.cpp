// CPU kernels: rows are cut into chunks processed in parallel (torch::stable::parallel_for,
// torch's own OpenMP thread pool, as at::parallel_for); inside a chunk, 8-lane blocks with
// independent accumulators let the compiler vectorise the loops (fp32 arithmetic whatever the
// storage dtype).
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <type_traits>

#include "../pid_dispatch.h"
#include "../pid_ops_impl.h"

namespace pid_fast {
namespace {

constexpr int64_t kChunk = 8192;   // elements per work item
constexpr int64_t kGrain = 65536;  // elements below which one thread does the whole op
constexpr int kLanes = 8;

// The streams and outputs never alias (fresh outputs), but with five input streams GCC's
// run-time alias checks exceed its budget (vect-max-version-for-alias-checks) and the guided
// loops would stay scalar: say so explicitly.
#if defined(__clang__)
#define PID_NO_ALIAS _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define PID_NO_ALIAS _Pragma("GCC ivdep")
#else
#define PID_NO_ALIAS
#endif

// Runs fn(row, item, begin, end) over every chunk of every row, in parallel when there is
// enough work (waking threads for a small op costs more than it saves).
template <class Fn>
void for_each_chunk(const Rows& rows, const Fn& fn) {
  const int64_t nchunks = num_chunks(rows.D, kChunk);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::min(rows.D, kChunk));
  torch::stable::parallel_for(0, rows.B * nchunks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t row = item / nchunks, ch = item % nchunks;
      const int64_t begin = row * rows.D + ch * kChunk;
      fn(row, item, begin, std::min(begin + kChunk, (row + 1) * rows.D));
    }
  });
}

template <typename T, typename TO>
void assemble_kernel(const Rows& rows, const float* a, const float* b, const float* c_in,
                     Tensor& x, Tensor& x_in) {
  const T* __restrict__ n = rows.streams[0].const_data_ptr<T>();
  const T* __restrict__ f = rows.streams[1].const_data_ptr<T>();
  T* __restrict__ xo = x.mutable_data_ptr<T>();
  TO* __restrict__ xi = x_in.mutable_data_ptr<TO>();
  for_each_chunk(rows, [&](int64_t row, int64_t, int64_t begin, int64_t end) {
    const float ar = a[row], br = b[row], cr = c_in[row];
    for (int64_t j = begin; j < end; ++j) {
      const float v = ar * (float)n[j] + br * (float)f[j];
      xo[j] = (T)v;
      xi[j] = (TO)(cr * v);
    }
  });
}

// GUIDED (compile time): a fifth stream, the guide's output Gg, with the target's Gg term
// tgg Gg added last (see pid_math.h); without it nothing extra is read or computed.
template <typename T, bool GUIDED>
void residual_kernel(const Rows& rows, Tensor& pred, Tensor& target) {
  const T* __restrict__ n = rows.streams[0].const_data_ptr<T>();
  const T* __restrict__ f1 = rows.streams[1].const_data_ptr<T>();
  const T* __restrict__ f2 = rows.streams[2].const_data_ptr<T>();
  const T* __restrict__ g = rows.streams[3].const_data_ptr<T>();
  const T* __restrict__ gg = GUIDED ? rows.streams[4].const_data_ptr<T>() : nullptr;
  T* __restrict__ po = pred.mutable_data_ptr<T>();
  T* __restrict__ to = target.mutable_data_ptr<T>();
  for_each_chunk(rows, [&](int64_t row, int64_t, int64_t begin, int64_t end) {
    const RowCoefs rc = row_coefs(rows.ptrs, row);
    PID_NO_ALIAS
    for (int64_t j = begin; j < end; ++j) {
      const float nv = n[j], f1v = f1[j];
      po[j] = (T)(rc.pn * nv + rc.p1 * f1v + rc.p2 * (float)f2[j]);
      float tv = rc.tn * nv + rc.t1 * f1v + rc.tg * (float)g[j];
      if constexpr (GUIDED) tv += rc.tgg * (float)gg[j];
      to[j] = (T)tv;
    }
  });
}

template <typename T, int NORM, bool GRAD, bool GUIDED>
void loss_kernel(const Rows& rows, float* partial, T* __restrict__ d1, T* __restrict__ d2) {
  const T* __restrict__ n = rows.streams[0].const_data_ptr<T>();
  const T* __restrict__ f1 = rows.streams[1].const_data_ptr<T>();
  const T* __restrict__ f2 = rows.streams[2].const_data_ptr<T>();
  const T* __restrict__ g = rows.streams[3].const_data_ptr<T>();
  const T* __restrict__ gg = GUIDED ? rows.streams[4].const_data_ptr<T>() : nullptr;
  for_each_chunk(rows, [&](int64_t row, int64_t item, int64_t begin, int64_t end) {
    const RowCoefs rc = row_coefs(rows.ptrs, row);
    const float qn = rc.pn - rc.tn, q1 = rc.p1 - rc.t1, q2 = rc.p2, qg = -rc.tg, qgg = -rc.tgg;
    auto resid = [&](int64_t i) {
      float r = qn * (float)n[i] + q1 * (float)f1[i] + q2 * (float)f2[i] + qg * (float)g[i];
      if constexpr (GUIDED) r += qgg * (float)gg[i];
      return r;
    };
    float acc[kLanes] = {0.f};
    int64_t j = begin;
    for (; j + kLanes <= end; j += kLanes) {
      PID_NO_ALIAS
      for (int l = 0; l < kLanes; ++l) {
        const float r = resid(j + l);
        acc[l] += norm_term<NORM>(r);
        if constexpr (GRAD) {
          const float dir = norm_dir<NORM>(r);
          d1[j + l] = (T)(rc.p1 * dir);
          d2[j + l] = (T)(rc.p2 * dir);
        }
      }
    }
    for (; j < end; ++j) {
      const float r = resid(j);
      acc[0] += norm_term<NORM>(r);
      if constexpr (GRAD) {
        const float dir = norm_dir<NORM>(r);
        d1[j] = (T)(rc.p1 * dir);
        d2[j] = (T)(rc.p2 * dir);
      }
    }
    float s = 0.f;
    for (int l = 0; l < kLanes; ++l) s += acc[l];
    partial[item] = s;
  });
}

template <typename T>
void scale_rows_kernel(const Rows& rows, const float* s1, const float* s2, Tensor& out) {
  const T* __restrict__ x = rows.streams[0].const_data_ptr<T>();
  T* __restrict__ o = out.mutable_data_ptr<T>();
  for_each_chunk(rows, [&](int64_t row, int64_t, int64_t begin, int64_t end) {
    const float s = s2 ? s1[row] * s2[row] : s1[row];
    for (int64_t j = begin; j < end; ++j) o[j] = (T)(s * (float)x[j]);
  });
}


struct CpuKernels {
  static void assemble(const Rows& rows, const float* a, const float* b, const float* c_in,
                       Tensor& x, Tensor& x_in) {
    PID_DISPATCH_FLOATS(x.scalar_type(), "pid_fast::assemble", [&] {
      using T = scalar_t;
      PID_DISPATCH_FLOATS(x_in.scalar_type(), "pid_fast::assemble", [&] {
        assemble_kernel<T, scalar_t>(rows, a, b, c_in, x, x_in);
      });
    });
  }

  static void residual(const Rows& rows, Tensor& pred, Tensor& target) {
    PID_DISPATCH_FLOATS(pred.scalar_type(), "pid_fast::residual", [&] {
      if (has_guide(rows)) residual_kernel<scalar_t, true>(rows, pred, target);
      else residual_kernel<scalar_t, false>(rows, pred, target);
    });
  }

  static void loss(const Rows& rows, int norm, double huber_c, bool grad, Tensor& loss,
                   Tensor& scale, Tensor& d1, Tensor& d2) {
    const int64_t nchunks = num_chunks(rows.D, kChunk);
    Tensor partial = empty_1d(loss, rows.B * nchunks, ScalarType::Float);
    float* pp = partial.mutable_data_ptr<float>();
    PID_DISPATCH_FLOATS(rows.streams[0].scalar_type(), "pid_fast::loss", [&] {
      using T = scalar_t;
      T* p1 = grad ? d1.mutable_data_ptr<T>() : nullptr;
      T* p2 = grad ? d2.mutable_data_ptr<T>() : nullptr;
      auto by_grad = [&](auto norm_c, auto guided_c) {
        constexpr int N = decltype(norm_c)::value;  // compile-time norm
        constexpr bool G = decltype(guided_c)::value;
        if (grad) loss_kernel<T, N, true, G>(rows, pp, p1, p2);
        else loss_kernel<T, N, false, G>(rows, pp, p1, p2);
      };
      auto run = [&](auto norm_c) {
        if (has_guide(rows)) by_grad(norm_c, std::true_type{});
        else by_grad(norm_c, std::false_type{});
      };
      if (norm == kL2) run(std::integral_constant<int, kL2>{});
      else if (norm == kL1) run(std::integral_constant<int, kL1>{});
      else run(std::integral_constant<int, kHuber>{});
    });
    // Per-row finalisation: partial sums in chunk order (deterministic), then the norm.
    float* lo = loss.mutable_data_ptr<float>();
    float* so = grad ? scale.mutable_data_ptr<float>() : nullptr;
    for (int64_t row = 0; row < rows.B; ++row) {
      double S = 0;
      for (int64_t c = 0; c < nchunks; ++c) S += pp[row * nchunks + c];
      const double w = rows.ptrs.weight ? rows.ptrs.weight[row] : 1.0;
      float l, s;
      finalize_row(norm, S, rows.D, w, huber_c, &l, &s);
      lo[row] = l;
      if (so) so[row] = s;
    }
  }

  static void scale_rows(const Rows& rows, const float* s1, const float* s2, Tensor& out) {
    PID_DISPATCH_FLOATS(out.scalar_type(), "pid_fast::scale_rows",
                        [&] { scale_rows_kernel<scalar_t>(rows, s1, s2, out); });
  }
};

}  // namespace

PID_FAST_REGISTER_IMPLS(CPU, CpuKernels)

}  // namespace pid_fast
