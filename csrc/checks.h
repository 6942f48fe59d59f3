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

}  // namespace tlv_fast
