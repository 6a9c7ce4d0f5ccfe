// Launchers of the CUDA kernels (pid_cuda_kernels.cu), called by the op bodies (pid_cuda.cpp).
#pragma once

#include "../pid_ops.h"

namespace pid_fast {

void cuda_assemble(const Rows& rows, const float* a, const float* b, const float* c_in,
                   Tensor& x, Tensor& x_in);
void cuda_residual(const Rows& rows, Tensor& pred, Tensor& target);
void cuda_loss(const Rows& rows, int norm, double huber_c, bool grad, Tensor& loss,
               Tensor& scale, Tensor& d1, Tensor& d2);
void cuda_scale_rows(const Rows& rows, const float* s1, const float* s2, Tensor& out);

}  // namespace pid_fast
