// The schemas of every op in the tlv_fast namespace, in one place. Implementations register per dispatch key
// beside their code (TORCH_LIBRARY_IMPL(tlv_fast, CPU, ...) in csrc/*.cpp, (..., CUDA, ...) in csrc/cuda/*.cpp).
// The Triton ops (attention_fwd, relpos_attention_fwd, ...) are registered from Python (tlv_fast/ops): their schemas
// carry Triton-only arguments and live beside their kernels.
#include <torch/library.h>

TORCH_LIBRARY(tlv_fast, m) {
  // Batched log-domain Sinkhorn (csrc/sinkhorn.cpp): log plan or exp(plan + exp_log_scale), and the potentials after
  // every update (B, iters + 1, M | N) that the backward replays.
  m.def("sinkhorn_fwd(Tensor scores, Tensor log_mu, Tensor log_nu, Tensor? bin_score, int iters, bool col_first, "
        "float? exp_log_scale) -> (Tensor, Tensor, Tensor)");
  m.def("sinkhorn_bwd(Tensor grad, Tensor scores, Tensor log_mu, Tensor log_nu, Tensor? bin_score, Tensor out, "
        "Tensor us, Tensor vs, bool col_first, float? exp_log_scale) -> (Tensor, Tensor, Tensor, Tensor)");
  // Fused attention (csrc/attention.cpp): softmax(scale q k^T + mask) v with causal_offset (key j hidden from query i
  // when j > i + causal_offset; None: no causal mask), dropout from a one-element int64 seed; returns out and the
  // natural-log logsumexp (B, Hq, Nq) float32. The backward's last output is the float mask's gradient
  // (B, Hq, Nq, Nk) float32 when mask_grad, else empty.
  m.def("native_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? seed, float scale, "
        "int? causal_offset, float dropout_p) -> (Tensor, Tensor)");
  m.def("native_attention_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? mask, Tensor? seed, float scale, int? causal_offset, float dropout_p, bool mask_grad) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  // STTR's relative-position attention (csrc/relpos.cpp): out, lse (B, H, Nq) float32 and the head-summed logits
  // (B, Nq, Nk) float32 when return_logits (else empty); the backward returns dq, dk, dv, d(qr), d(kr).
  m.def("native_relpos_fwd(Tensor q, Tensor k, Tensor v, Tensor qr, Tensor kr, int offset_sign, bool mask_upper, "
        "bool return_logits) -> (Tensor, Tensor, Tensor)");
  m.def("native_relpos_bwd(Tensor dout, Tensor? dlogits, Tensor q, Tensor k, Tensor v, Tensor qr, Tensor kr, "
        "Tensor out, Tensor lse, int offset_sign, bool mask_upper) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
