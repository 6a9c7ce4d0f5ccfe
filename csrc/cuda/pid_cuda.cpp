// Registers the CUDA implementations of the pid_fast ops (kernels in pid_cuda_kernels.cu).
#include "../pid_ops_impl.h"
#include "pid_cuda.h"

namespace pid_fast {
namespace {

struct CudaKernels {
  static void assemble(const Rows& rows, const float* a, const float* b, const float* c_in,
                       Tensor& x, Tensor& x_in) {
    cuda_assemble(rows, a, b, c_in, x, x_in);
  }
  static void residual(const Rows& rows, Tensor& pred, Tensor& target) {
    cuda_residual(rows, pred, target);
  }
  static void loss(const Rows& rows, int norm, double huber_c, bool grad, Tensor& loss,
                   Tensor& scale, Tensor& d1, Tensor& d2) {
    cuda_loss(rows, norm, huber_c, grad, loss, scale, d1, d2);
  }
  static void scale_rows(const Rows& rows, const float* s1, const float* s2, Tensor& out) {
    cuda_scale_rows(rows, s1, s2, out);
  }
};

}  // namespace

PID_FAST_REGISTER_IMPLS(CUDA, CudaKernels)

}  // namespace pid_fast
