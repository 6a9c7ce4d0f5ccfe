// The PID per-sample algebra, shared by the CPU (.cpp) and CUDA (.cu) kernels.
//
// Per sample (row) the spec's stages are linear in the four streamed tensors
// n (noise), F1 = F(t), F2 = F(t2) and G (teacher output):
//
//   y      = a1 n + b1 F1                 y2 = a2 n + b2 F2
//   k      = t / (t - t2)                 (t2 > t at the last grid index: k < 0)
//   pred   = y - t (y - y2)/(t - t2) = (1 - k) y + k y2
//          = pn n + p1 F1 + p2 F2,        pn = (1-k) a1 + k a2,  p1 = (1-k) b1,  p2 = k b2
//   target = c_skip y + c_out G = tn n + t1 F1 + tg G
//   r      = pred - target
//
// With a guide (a fifth stream Gg, the guide teacher's raw output, and a per-sample scale w)
// the teacher is the guided one, D_w = D_g + w (D_m - D_g); with shared c_skip, c_out:
//   target = c_skip y + c_out (w G + (1 - w) Gg) = tn n + t1 F1 + tg G + tgg Gg,
//   tg = c_out w,  tgg = c_out (1 - w)
// formed in double and rounded once, so w = 1 gives tg = c_out and tgg = 0 exactly (the
// unguided result bit for bit: the Gg term is added last, +-0 leaves the sum unchanged) and
// w = 0 gives tg = 0, tgg = c_out (the unguided result with G = Gg).
//
// The target is detached, so dr/dF1 = p1 and dr/dF2 = p2 (the spec's
// d pred/d y = 1 - t/(t-t2), d pred/d y2 = t/(t-t2), times d y/d F = b), guided or not.
// Coefficients are formed in double once per row, then used in float32.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PID_HD __host__ __device__ __forceinline__
#else
#define PID_HD inline
#endif

namespace pid_fast {

enum Norm : int { kL2 = 0, kL1 = 1, kHuber = 2 };

// Raw per-sample coefficient vectors (float32, contiguous, length B). a1/b1/a2/b2 may be
// null: then the boundary parametrization a = t / sigma_max, b = 1 - a is used.
struct CoefPtrs {
  const float* t;
  const float* t2;
  const float* a1;
  const float* b1;
  const float* a2;
  const float* b2;
  const float* c_skip;
  const float* c_out;
  const float* weight;  // may be null (w = 1)
  const float* guide_scale;  // null: no guide (then no guide stream either)
  double sigma_max;
};

struct RowCoefs {
  float pn, p1, p2;  // pred   = pn n + p1 F1 + p2 F2
  float tn, t1, tg;  // target = tn n + t1 F1 + tg G (+ tgg Gg with a guide)
  float tgg;         // 0 without a guide
};

PID_HD RowCoefs row_coefs(const CoefPtrs& c, int64_t row) {
  const double t = c.t[row], t2 = c.t2[row];
  const double a1 = c.a1 ? (double)c.a1[row] : t / c.sigma_max;
  const double b1 = c.b1 ? (double)c.b1[row] : 1.0 - t / c.sigma_max;
  const double a2 = c.a2 ? (double)c.a2[row] : t2 / c.sigma_max;
  const double b2 = c.b2 ? (double)c.b2[row] : 1.0 - t2 / c.sigma_max;
  const double k = t / (t - t2);
  const double cs = c.c_skip[row];
  RowCoefs rc;
  rc.pn = (float)((1.0 - k) * a1 + k * a2);
  rc.p1 = (float)((1.0 - k) * b1);
  rc.p2 = (float)(k * b2);
  rc.tn = (float)(cs * a1);
  rc.t1 = (float)(cs * b1);
  if (c.guide_scale) {
    const double co = c.c_out[row], w = c.guide_scale[row];
    rc.tg = (float)(co * w);
    rc.tgg = (float)(co * (1.0 - w));
  } else {
    rc.tg = c.c_out[row];
    rc.tgg = 0.f;
  }
  return rc;
}


// The per-element contribution to the row sum (|r| for l1, r^2 otherwise) and the
// direction of dL/dr (sign(r) for l1, r otherwise); the per-row factor comes later.
template <int NORM>
PID_HD float norm_term(float r) { return NORM == kL1 ? fabsf(r) : r * r; }

template <int NORM>
PID_HD float norm_dir(float r) {
  return NORM == kL1 ? (float)((r > 0.f) - (r < 0.f)) : r;
}

// From the row sum S over D elements: the loss L and the factor s with dL/dr_j = s * dir_j.
//   l2:    L = w S/D,                        dL/dr = 2 w r / D
//   l1:    L = w S/D  (S = sum |r|),         dL/dr = w sign(r) / D
//   huber: L = w (sqrt(S/D + c^2) - c),      dL/dr = w r / (D sqrt(S/D + c^2))
PID_HD void finalize_row(int norm, double S, int64_t D, double w, double huber_c,
                         float* loss, float* scale) {
  const double m = S / (double)D;
  if (norm == kHuber) {
    const double root = sqrt(m + huber_c * huber_c);
    *loss = (float)(w * (root - huber_c));
    *scale = (float)(w / ((double)D * root));
  } else {
    *loss = (float)(w * m);
    *scale = (float)((norm == kL2 ? 2.0 : 1.0) * w / (double)D);
  }
}

}  // namespace pid_fast
