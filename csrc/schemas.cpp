// The schemas of every op in the tlv_fast namespace, in one place. Implementations register per dispatch key
// beside their code (TORCH_LIBRARY_IMPL(tlv_fast, CPU, ...) in csrc/*.cpp, (..., CUDA, ...) in csrc/cuda/*.cpp).
// The Triton ops (attention, relpos_attention) are registered from Python (tlv_fast/ops) and are not declared here.
#include <torch/library.h>

TORCH_LIBRARY(tlv_fast, m) {
  // Batched log-domain Sinkhorn (csrc/sinkhorn.cpp): log plan or exp(plan + exp_log_scale), and the potentials after
  // every update (B, iters + 1, M | N) that the backward replays.
  m.def("sinkhorn_fwd(Tensor scores, Tensor log_mu, Tensor log_nu, Tensor? bin_score, int iters, bool col_first, "
        "float? exp_log_scale) -> (Tensor, Tensor, Tensor)");
  m.def("sinkhorn_bwd(Tensor grad, Tensor scores, Tensor log_mu, Tensor log_nu, Tensor? bin_score, Tensor out, "
        "Tensor us, Tensor vs, bool col_first, float? exp_log_scale) -> (Tensor, Tensor, Tensor, Tensor)");
}
