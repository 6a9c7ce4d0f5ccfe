// CUDA kernels of the pid_fast ops. Only the light stable-ABI headers here (no ATen, no
// torch/extension.h) to keep nvcc fast; the op bodies and registration are in pid_cuda.cpp.
// The current stream and the device guard come through torch's C shim (needs -DUSE_CUDA for
// aoti_torch_get_current_cuda_stream's declaration).
//
// Work split: every row (sample) of D elements is cut into chunks of kThreads*VEC*iters
// elements, one thread block per (row, chunk), flattened on grid.x. Loads and stores are
// 16 bytes wide (VEC = 16 / sizeof(T)) when every pointer is aligned and D % VEC == 0, so a
// vector never straddles two rows. Offsets are int64. Arithmetic is float32.
// Results are deterministic: per-chunk partial sums are reduced in a fixed order.
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cstdlib>
#include <type_traits>

#include "../pid_dispatch.h"
#include "pid_cuda.h"

namespace pid_fast {
namespace {

constexpr int kThreads = 256;

// Vector iterations per thread per chunk (chunk = kThreads * VEC * iters elements). A tuning
// knob: PID_FAST_CUDA_ITERS (default 4), read at each launch so a benchmark can sweep it.
int chunk_iters() {
  const char* v = std::getenv("PID_FAST_CUDA_ITERS");
  const int it = v ? std::atoi(v) : 0;
  return it > 0 ? it : 4;
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* __restrict__ p, int64_t i, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p + i);
#pragma unroll
  for (int l = 0; l < VEC; ++l) out[l] = static_cast<float>(pk.v[l]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* __restrict__ p, int64_t i, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int l = 0; l < VEC; ++l) pk.v[l] = static_cast<T>(in[l]);
  *reinterpret_cast<Pack<T, VEC>*>(p + i) = pk;
}

// The (row, [begin, end)) of this block's chunk.
struct Chunk {
  int64_t row, begin, end;
};

__device__ __forceinline__ Chunk my_chunk(int64_t D, int64_t chunk, int64_t nchunks) {
  const int64_t item = blockIdx.x;
  const int64_t row = item / nchunks;
  const int64_t begin = row * D + (item - row * nchunks) * chunk;
  const int64_t end = begin + chunk < (row + 1) * D ? begin + chunk : (row + 1) * D;
  return {row, begin, end};
}

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;  // valid in thread 0
}

template <typename T, typename TO, int VEC>
__global__ void __launch_bounds__(kThreads)
    assemble_kernel(const T* __restrict__ n, const T* __restrict__ f, const float* __restrict__ a,
                    const float* __restrict__ b, const float* __restrict__ c_in,
                    T* __restrict__ x, TO* __restrict__ x_in, int64_t D, int64_t chunk,
                    int64_t nchunks) {
  const Chunk c = my_chunk(D, chunk, nchunks);
  const float ar = a[c.row], br = b[c.row], cr = c_in[c.row];
  for (int64_t i = c.begin + (int64_t)threadIdx.x * VEC; i < c.end; i += (int64_t)kThreads * VEC) {
    float nv[VEC], fv[VEC], xv[VEC], xi[VEC];
    load<T, VEC>(n, i, nv);
    load<T, VEC>(f, i, fv);
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      xv[l] = ar * nv[l] + br * fv[l];
      xi[l] = cr * xv[l];
    }
    store<T, VEC>(x, i, xv);
    store<TO, VEC>(x_in, i, xi);
  }
}

// GUIDED (compile time): a fifth stream gg, the guide's output, whose target term tgg * gg is
// added last (see pid_math.h); without it gg is never read.
template <typename T, int VEC, bool GUIDED>
__global__ void __launch_bounds__(kThreads)
    residual_kernel(const T* __restrict__ n, const T* __restrict__ f1, const T* __restrict__ f2,
                    const T* __restrict__ g, const T* __restrict__ gg, T* __restrict__ pred,
                    T* __restrict__ target, CoefPtrs coefs, int64_t D, int64_t chunk,
                    int64_t nchunks) {
  const Chunk c = my_chunk(D, chunk, nchunks);
  const RowCoefs rc = row_coefs(coefs, c.row);
  for (int64_t i = c.begin + (int64_t)threadIdx.x * VEC; i < c.end; i += (int64_t)kThreads * VEC) {
    float nv[VEC], f1v[VEC], f2v[VEC], gv[VEC], ggv[VEC], pv[VEC], tv[VEC];
    load<T, VEC>(n, i, nv);
    load<T, VEC>(f1, i, f1v);
    load<T, VEC>(f2, i, f2v);
    load<T, VEC>(g, i, gv);
    if (GUIDED) load<T, VEC>(gg, i, ggv);
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      pv[l] = rc.pn * nv[l] + rc.p1 * f1v[l] + rc.p2 * f2v[l];
      tv[l] = rc.tn * nv[l] + rc.t1 * f1v[l] + rc.tg * gv[l];
      if (GUIDED) tv[l] += rc.tgg * ggv[l];
    }
    store<T, VEC>(pred, i, pv);
    store<T, VEC>(target, i, tv);
  }
}

// One read of the four streams (five with a guide); per-chunk partial sums of the norm term
// and, with GRAD, the gradient directions p1*dir(r), p2*dir(r) written in the same pass.
template <typename T, int VEC, int NORM, bool GRAD, bool GUIDED>
__global__ void __launch_bounds__(kThreads)
    loss_kernel(const T* __restrict__ n, const T* __restrict__ f1, const T* __restrict__ f2,
                const T* __restrict__ g, const T* __restrict__ gg, T* __restrict__ d1,
                T* __restrict__ d2, float* __restrict__ partial, CoefPtrs coefs, int64_t D,
                int64_t chunk, int64_t nchunks) {
  const Chunk c = my_chunk(D, chunk, nchunks);
  const RowCoefs rc = row_coefs(coefs, c.row);
  const float qn = rc.pn - rc.tn, q1 = rc.p1 - rc.t1, q2 = rc.p2, qg = -rc.tg, qgg = -rc.tgg;
  float acc = 0.f;
  for (int64_t i = c.begin + (int64_t)threadIdx.x * VEC; i < c.end; i += (int64_t)kThreads * VEC) {
    float nv[VEC], f1v[VEC], f2v[VEC], gv[VEC], ggv[VEC];
    load<T, VEC>(n, i, nv);
    load<T, VEC>(f1, i, f1v);
    load<T, VEC>(f2, i, f2v);
    load<T, VEC>(g, i, gv);
    if (GUIDED) load<T, VEC>(gg, i, ggv);
    float o1[VEC], o2[VEC];
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      float r = qn * nv[l] + q1 * f1v[l] + q2 * f2v[l] + qg * gv[l];
      if (GUIDED) r += qgg * ggv[l];
      acc += norm_term<NORM>(r);
      const float dir = norm_dir<NORM>(r);
      o1[l] = rc.p1 * dir;
      o2[l] = rc.p2 * dir;
    }
    if (GRAD) {
      store<T, VEC>(d1, i, o1);
      store<T, VEC>(d2, i, o2);
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// One thread per row: chunk partials summed in order (deterministic), then the norm.
__global__ void finalize_kernel(const float* __restrict__ partial, int64_t nchunks, int64_t B,
                                int64_t D, const float* __restrict__ weight, int norm,
                                double huber_c, float* __restrict__ loss,
                                float* __restrict__ scale) {
  const int64_t row = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= B) return;
  double S = 0;
  for (int64_t k = 0; k < nchunks; ++k) S += partial[row * nchunks + k];
  float l, s;
  finalize_row(norm, S, D, weight ? (double)weight[row] : 1.0, huber_c, &l, &s);
  loss[row] = l;
  if (scale) scale[row] = s;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    scale_rows_kernel(const T* __restrict__ x, const float* __restrict__ s1,
                      const float* __restrict__ s2, T* __restrict__ out, int64_t D,
                      int64_t chunk, int64_t nchunks) {
  const Chunk c = my_chunk(D, chunk, nchunks);
  const float s = s2 ? s1[c.row] * s2[c.row] : s1[c.row];
  for (int64_t i = c.begin + (int64_t)threadIdx.x * VEC; i < c.end; i += (int64_t)kThreads * VEC) {
    float v[VEC];
    load<T, VEC>(x, i, v);
#pragma unroll
    for (int l = 0; l < VEC; ++l) v[l] *= s;
    store<T, VEC>(out, i, v);
  }
}

// ---- launch helpers -----------------------------------------------------------------------

// torch's current CUDA stream on t's device.
cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

bool aligned16(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Vector width: 16-byte accesses when possible, scalar otherwise.
template <typename T>
int pick_vec(const Rows& rows, std::initializer_list<Tensor> outs) {
  constexpr int V = 16 / sizeof(T);
  bool ok = rows.D % V == 0;
  for (const auto& s : rows.streams) ok = ok && aligned16(s);
  for (const auto& o : outs) ok = ok && aligned16(o);
  return ok ? V : 1;
}

struct Launch {
  int64_t chunk, nchunks;
  dim3 grid;
};

Launch plan(const Rows& rows, int vec) {
  Launch L;
  L.chunk = (int64_t)kThreads * vec * chunk_iters();
  L.nchunks = num_chunks(rows.D, L.chunk);
  const int64_t blocks = rows.B * L.nchunks;
  PID_CHECK(blocks < (int64_t{1} << 31), "pid_fast: tensor too large for one launch");
  L.grid = dim3((unsigned)blocks);
  return L;
}

// Calls fn(std::integral_constant<int, VEC>) with VEC = the full width or 1.
template <typename T, class Fn>
void with_vec(int vec, const Fn& fn) {
  if (vec == 16 / (int)sizeof(T)) fn(std::integral_constant<int, 16 / sizeof(T)>{});
  else fn(std::integral_constant<int, 1>{});
}

}  // namespace

void cuda_assemble(const Rows& rows, const float* a, const float* b, const float* c_in,
                   Tensor& x, Tensor& x_in) {
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const cudaStream_t stream = current_stream(x);
  PID_DISPATCH_FLOATS(x.scalar_type(), "pid_fast::assemble", [&] {
    using T = scalar_t;
    PID_DISPATCH_FLOATS(x_in.scalar_type(), "pid_fast::assemble", [&] {
      using TO = scalar_t;
      // x_in is a fresh allocation, so a Pack<TO, VEC> of it is aligned whenever x's is.
      with_vec<T>(pick_vec<T>(rows, {x, x_in}), [&](auto VC) {
        constexpr int V = decltype(VC)::value;
        const Launch L = plan(rows, V);
        assemble_kernel<T, TO, V><<<L.grid, kThreads, 0, stream>>>(
            rows.streams[0].const_data_ptr<T>(), rows.streams[1].const_data_ptr<T>(), a, b, c_in,
            x.mutable_data_ptr<T>(), x_in.mutable_data_ptr<TO>(), rows.D, L.chunk, L.nchunks);
        STD_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void cuda_residual(const Rows& rows, Tensor& pred, Tensor& target) {
  const torch::stable::accelerator::DeviceGuard guard(pred.get_device_index());
  const cudaStream_t stream = current_stream(pred);
  PID_DISPATCH_FLOATS(pred.scalar_type(), "pid_fast::residual", [&] {
    using T = scalar_t;
    const T* gg = has_guide(rows) ? rows.streams[4].const_data_ptr<T>() : nullptr;
    with_vec<T>(pick_vec<T>(rows, {pred, target}), [&](auto VC) {
      constexpr int V = decltype(VC)::value;
      const Launch L = plan(rows, V);
      auto launch = [&](auto GC) {
        residual_kernel<T, V, decltype(GC)::value><<<L.grid, kThreads, 0, stream>>>(
            rows.streams[0].const_data_ptr<T>(), rows.streams[1].const_data_ptr<T>(),
            rows.streams[2].const_data_ptr<T>(), rows.streams[3].const_data_ptr<T>(), gg,
            pred.mutable_data_ptr<T>(), target.mutable_data_ptr<T>(), rows.ptrs, rows.D,
            L.chunk, L.nchunks);
      };
      if (gg) launch(std::true_type{});
      else launch(std::false_type{});
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void cuda_loss(const Rows& rows, int norm, double huber_c, bool grad, Tensor& loss,
               Tensor& scale, Tensor& d1, Tensor& d2) {
  const torch::stable::accelerator::DeviceGuard guard(loss.get_device_index());
  const cudaStream_t stream = current_stream(loss);
  PID_DISPATCH_FLOATS(rows.streams[0].scalar_type(), "pid_fast::loss", [&] {
    using T = scalar_t;
    const int vec = grad ? pick_vec<T>(rows, {d1, d2}) : pick_vec<T>(rows, {});
    const T* gg = has_guide(rows) ? rows.streams[4].const_data_ptr<T>() : nullptr;
    with_vec<T>(vec, [&](auto VC) {
      constexpr int V = decltype(VC)::value;
      const Launch L = plan(rows, V);
      Tensor partial = empty_1d(loss, rows.B * L.nchunks, ScalarType::Float);
      auto launch = [&](auto NC, auto GC, auto GUIDEDC) {
        loss_kernel<T, V, decltype(NC)::value, decltype(GC)::value, decltype(GUIDEDC)::value>
            <<<L.grid, kThreads, 0, stream>>>(
                rows.streams[0].const_data_ptr<T>(), rows.streams[1].const_data_ptr<T>(),
                rows.streams[2].const_data_ptr<T>(), rows.streams[3].const_data_ptr<T>(), gg,
                grad ? d1.mutable_data_ptr<T>() : nullptr,
                grad ? d2.mutable_data_ptr<T>() : nullptr, partial.mutable_data_ptr<float>(),
                rows.ptrs, rows.D, L.chunk, L.nchunks);
      };
      auto by_guide = [&](auto N, auto GC) {
        if (gg) launch(N, GC, std::true_type{});
        else launch(N, GC, std::false_type{});
      };
      auto by_grad = [&](auto N) {
        if (grad) by_guide(N, std::true_type{});
        else by_guide(N, std::false_type{});
      };
      if (norm == kL2) by_grad(std::integral_constant<int, kL2>{});
      else if (norm == kL1) by_grad(std::integral_constant<int, kL1>{});
      else by_grad(std::integral_constant<int, kHuber>{});
      STD_CUDA_KERNEL_LAUNCH_CHECK();
      finalize_kernel<<<(unsigned)((rows.B + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          partial.const_data_ptr<float>(), L.nchunks, rows.B, rows.D, rows.ptrs.weight, norm,
          huber_c, loss.mutable_data_ptr<float>(), grad ? scale.mutable_data_ptr<float>() : nullptr);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void cuda_scale_rows(const Rows& rows, const float* s1, const float* s2, Tensor& out) {
  const torch::stable::accelerator::DeviceGuard guard(out.get_device_index());
  const cudaStream_t stream = current_stream(out);
  PID_DISPATCH_FLOATS(out.scalar_type(), "pid_fast::scale_rows", [&] {
    using T = scalar_t;
    with_vec<T>(pick_vec<T>(rows, {out}), [&](auto VC) {
      constexpr int V = decltype(VC)::value;
      const Launch L = plan(rows, V);
      scale_rows_kernel<T, V><<<L.grid, kThreads, 0, stream>>>(
          rows.streams[0].const_data_ptr<T>(), s1, s2, out.mutable_data_ptr<T>(), rows.D, L.chunk,
          L.nchunks);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace pid_fast
