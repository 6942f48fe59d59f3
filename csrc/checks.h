// Input checks shared by the CPU implementations and the CUDA bindings, so both reject the same inputs with the
// same messages. Header-only; include it from .cpp files only (it needs ATen, which .cu files must not include).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <optional>

namespace tlv_fast {

// every tensor of an op on the scores' device
inline void check_same_device(const char* op, const at::Tensor& ref, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the scores' device ", ref.device(), ", got ",
              t.device());
}

// sinkhorn_fwd / sinkhorn_bwd: scores (B, M, N); log_mu (B, M + bins), log_nu (B, N + bins) and the optional
// one-element dustbin score in the accumulation dtype (float32 for 16-bit scores); iters >= 1
inline void check_sinkhorn(const at::Tensor& scores, const at::Tensor& log_mu, const at::Tensor& log_nu,
                           const std::optional<at::Tensor>& bin_score, int64_t iters) {
  TORCH_CHECK(scores.dim() == 3, "sinkhorn: scores must be (B, M, N), got ", scores.sizes());
  const int64_t bins = bin_score.has_value() ? 1 : 0;
  TORCH_CHECK(log_mu.dim() == 2 && log_mu.size(0) == scores.size(0) && log_mu.size(1) == scores.size(1) + bins,
              "sinkhorn: log_mu must be (B, M", bins ? " + 1" : "", "), got ", log_mu.sizes());
  TORCH_CHECK(log_nu.dim() == 2 && log_nu.size(0) == scores.size(0) && log_nu.size(1) == scores.size(2) + bins,
              "sinkhorn: log_nu must be (B, N", bins ? " + 1" : "", "), got ", log_nu.sizes());
  const auto acc = at::toOpMathType(scores.scalar_type());
  TORCH_CHECK(log_mu.scalar_type() == acc && log_nu.scalar_type() == acc, "sinkhorn: log_mu and log_nu must be ",
              acc, " for ", scores.scalar_type(), " scores, got ", log_mu.scalar_type(), " and ", log_nu.scalar_type());
  check_same_device("sinkhorn", scores, "log_mu", log_mu);
  check_same_device("sinkhorn", scores, "log_nu", log_nu);
  if (bins) {
    TORCH_CHECK(bin_score->numel() == 1 && bin_score->scalar_type() == acc,
                "sinkhorn: bin_score must be a one-element ", acc, " tensor");
    check_same_device("sinkhorn", scores, "bin_score", *bin_score);
  }
  TORCH_CHECK(iters >= 1, "sinkhorn: iters must be >= 1, got ", iters);
  TORCH_CHECK(scores.size(1) + bins <= (int64_t{1} << 30) && scores.size(2) + bins <= (int64_t{1} << 30),
              "sinkhorn: M and N must be < 2^30, got ", scores.sizes());
}

// the backward's extra inputs: the incoming gradient has the output's shape and dtype, the potentials of the forward
inline void check_sinkhorn_grad(const at::Tensor& grad, const at::Tensor& scores, const at::Tensor& out,
                                const at::Tensor& us, const at::Tensor& vs) {
  TORCH_CHECK(grad.sizes() == out.sizes() && grad.scalar_type() == scores.scalar_type(),
              "sinkhorn backward: grad must have the output's shape ", out.sizes(), " and dtype ",
              scores.scalar_type(), ", got ", grad.sizes(), " ", grad.scalar_type());
  TORCH_CHECK(us.dim() == 3 && vs.dim() == 3 && us.size(1) == vs.size(1) && us.size(1) >= 2,
              "sinkhorn backward: us and vs must be the forward's potentials (B, iters + 1, M | N)");
  check_same_device("sinkhorn backward", scores, "grad", grad);
  check_same_device("sinkhorn backward", scores, "out", out);
}

// native_attention_fwd / _bwd: q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) of one dtype (fp32 / bf16 /
// fp16) and device, Hq a multiple of Hk; mask bool or floating, (B, Hq, Nq, Nk) (broadcast views welcome)
inline void check_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double dropout_p) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k and v must be 4-D (B, H, N, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": q must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, ": q, k and v must share a dtype, got ", dt, ", ",
              k.scalar_type(), ", ", v.scalar_type());
  check_same_device(op, q, "k", k);
  check_same_device(op, q, "v", v);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, ": batch sizes differ: ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(1) > 0 && q.size(1) % k.size(1) == 0, op,
              ": query heads must be a multiple of key/value heads, got ", q.size(1), " and ", k.size(1), "/",
              v.size(1));
  TORCH_CHECK(k.size(3) == q.size(3) && k.size(2) == v.size(2), op, ": k must be (B, Hk, Nk, D) and v (B, Hk, Nk, ",
              "Dv) for q ", q.sizes(), ", got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(2) < (int64_t{1} << 31) && k.size(2) < (int64_t{1} << 31), op, ": sequences must be < 2^31");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(m.dim() == 4 && m.size(0) == q.size(0) && m.size(1) == q.size(1) && m.size(2) == q.size(2) &&
                    m.size(3) == k.size(2),
                op, ": mask must be (B, Hq, Nq, Nk) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), ", ",
                k.size(2), ") (an expanded view is fine), got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), op,
                ": mask must be bool or floating, got ", m.scalar_type());
    check_same_device(op, q, "mask", m);
  }
}

// the backward's extra inputs: dout like out, lse (B, Hq, Nq) float32, dlse like lse
inline void check_attention_grad(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  const char* op = "native_attention_bwd";
  TORCH_CHECK(out.dim() == 4 && out.size(0) == q.size(0) && out.size(1) == q.size(1) && out.size(2) == q.size(2) &&
                  out.size(3) == v.size(3) && dout.sizes() == out.sizes(),
              op, ": out and dout must be (B, Hq, Nq, Dv), got ", out.sizes(), " and ", dout.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && dout.scalar_type() == q.scalar_type(), op,
              ": out and dout must have q's dtype ", q.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2) &&
                  lse.scalar_type() == at::kFloat,
              op, ": lse must be float32 (B, Hq, Nq), got ", lse.sizes(), " ", lse.scalar_type());
  if (dlse.has_value()) {
    TORCH_CHECK(dlse->sizes() == lse.sizes(), op, ": dlse must be shaped like lse, got ", dlse->sizes());
    check_same_device(op, q, "dlse", *dlse);
  }
  check_same_device(op, q, "dout", dout);
  check_same_device(op, q, "out", out);
  check_same_device(op, q, "lse", lse);
}

// native_relpos_fwd / _bwd: q (B, H, Nq, d), k (B, H, Nk, d), v (B, H, Nk, dv), qr and kr (Nq + Nk - 1, H, d), one
// dtype (fp32 / bf16 / fp16) and device; Nq, Nk >= 1; offset_sign +1 or -1
inline void check_relpos(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& qr, const at::Tensor& kr, int64_t offset_sign) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k and v must be 4-D (B, H, N, d), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": q must be float32, bfloat16 or float16, got ", dt);
  for (const auto* t : {&k, &v, &qr, &kr}) {
    TORCH_CHECK(t->scalar_type() == dt, op, ": q, k, v, qr and kr must share a dtype, got ", dt, " and ",
                t->scalar_type());
    check_same_device(op, q, "every input", *t);
  }
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3), Nk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == d && v.size(0) == B && v.size(1) == H &&
                  v.size(2) == Nk,
              op, ": k must be (B, H, Nk, d) and v (B, H, Nk, dv) for q ", q.sizes(), ", got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(Nq >= 1 && Nk >= 1, op, ": Nq and Nk must be >= 1, got ", Nq, " and ", Nk);
  for (const auto* t : {&qr, &kr}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == Nq + Nk - 1 && t->size(1) == H && t->size(2) == d, op,
                ": qr and kr must be (Nq + Nk - 1, H, d) = (", Nq + Nk - 1, ", ", H, ", ", d, "), got ", t->sizes());
  }
  TORCH_CHECK(offset_sign == 1 || offset_sign == -1, op, ": offset_sign must be +1 or -1, got ", offset_sign);
}

inline void check_relpos_grad(const at::Tensor& dout, const std::optional<at::Tensor>& dlogits, const at::Tensor& q,
                              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  const char* op = "native_relpos_bwd";
  TORCH_CHECK(out.dim() == 4 && out.size(0) == q.size(0) && out.size(1) == q.size(1) && out.size(2) == q.size(2) &&
                  out.size(3) == v.size(3) && dout.sizes() == out.sizes() && dout.scalar_type() == q.scalar_type(),
              op, ": out and dout must be (B, H, Nq, dv) in q's dtype, got ", out.sizes(), " and ", dout.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2) &&
                  lse.scalar_type() == at::kFloat,
              op, ": lse must be float32 (B, H, Nq), got ", lse.sizes(), " ", lse.scalar_type());
  if (dlogits.has_value()) {
    TORCH_CHECK(dlogits->dim() == 3 && dlogits->size(0) == q.size(0) && dlogits->size(1) == q.size(2), op,
                ": dlogits must be (B, Nq, Nk), got ", dlogits->sizes());
    check_same_device(op, q, "dlogits", *dlogits);
  }
  check_same_device(op, q, "dout", dout);
  check_same_device(op, q, "lse", lse);
}

}  // namespace tlv_fast
