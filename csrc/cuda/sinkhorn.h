// CUDA launchers for the batched log-domain Sinkhorn (math and conventions: ../sinkhorn.cpp). Raw pointers and
// sizes only: this header is shared by sinkhorn.cu (no torch headers, fast nvcc) and sinkhorn_cuda.cpp (binding).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tlv_fast {
namespace cuda {

enum class Dtype { kFloat16, kBFloat16, kFloat32, kFloat64 };

struct SinkhornProblem {
  // scores (B, M, N) in `dtype`, any strides (elements); marginals and dustbin score in the accumulation type
  // (float, or double for kFloat64): log_mu (B, M + bins), log_nu (B, N + bins) with strides; bin: nullptr or 1 value
  const void* scores;
  int64_t s0, s1, s2;
  const void* log_mu;
  int64_t mu0, mu1;
  const void* log_nu;
  int64_t nu0, nu1;
  const void* bin;
  int64_t B, M, N;
  int iters;
  bool col_first;
  bool exp_out;  // output exp(S + u + v + log_scale) instead of the log plan
  double log_scale;
  Dtype dtype;
};

struct LaunchInfo {
  int cluster;    // CTAs per problem (1: no cluster); 0 when the matrix streams from global memory
  size_t smem;    // dynamic shared memory per CTA, bytes
};

// out (B, Ma, Na) contiguous in `dtype`; us (B, iters + 1, Ma), vs (B, iters + 1, Na) contiguous, accumulation type.
cudaError_t sinkhorn_forward(const SinkhornProblem& p, void* out, void* us, void* vs, cudaStream_t stream,
                             LaunchInfo* info);

// grad: (B, Ma, Na) in `dtype`, strides g0, g1, g2; out/us/vs from the forward. Writes d_scores (B, M, N) contiguous
// in `dtype`, d_mu (B, Ma), d_nu (B, Na) contiguous (accumulation type), d_bin_partial (B * 8) accumulation type
// (one partial sum per CTA; zero-filled by the caller; summed by the caller). scratch: (B, iters, Ma + Na)
// accumulation-type buffer, used when the problem streams.
cudaError_t sinkhorn_backward(const SinkhornProblem& p, const void* grad, int64_t g0, int64_t g1, int64_t g2,
                              const void* out, const void* us, const void* vs, void* d_scores, void* d_mu,
                              void* d_nu, void* d_bin_partial, void* scratch, cudaStream_t stream,
                              LaunchInfo* info);

}  // namespace cuda
}  // namespace tlv_fast
