// CUDA dispatch of tlv_fast::sinkhorn_fwd / sinkhorn_bwd (schemas in ../schemas.cpp): the tensor checks shared with
// the CPU path (../checks.h), allocation, then the raw-pointer launchers of sinkhorn.cu on the current stream.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../checks.h"
#include "sinkhorn.h"

namespace tlv_fast {
namespace {

cuda::Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cuda::Dtype::kFloat16;
    case at::kBFloat16: return cuda::Dtype::kBFloat16;
    case at::kFloat: return cuda::Dtype::kFloat32;
    case at::kDouble: return cuda::Dtype::kFloat64;
    default: TORCH_CHECK(false, "sinkhorn (CUDA): scores must be float16, bfloat16, float32 or float64, got ", t);
  }
}

cuda::SinkhornProblem make_problem(const at::Tensor& scores, const at::Tensor& log_mu, const at::Tensor& log_nu,
                                   const std::optional<at::Tensor>& bin_score, int64_t iters, bool col_first,
                                   std::optional<double> exp_log_scale) {
  check_sinkhorn(scores, log_mu, log_nu, bin_score, iters);
  cuda::SinkhornProblem p{};
  p.dtype = to_dtype(scores.scalar_type());
  p.scores = scores.data_ptr();
  p.s0 = scores.stride(0); p.s1 = scores.stride(1); p.s2 = scores.stride(2);
  p.log_mu = log_mu.data_ptr(); p.mu0 = log_mu.stride(0); p.mu1 = log_mu.stride(1);
  p.log_nu = log_nu.data_ptr(); p.nu0 = log_nu.stride(0); p.nu1 = log_nu.stride(1);
  p.bin = nullptr;
  if (bin_score.has_value()) p.bin = bin_score->data_ptr();
  p.B = scores.size(0); p.M = scores.size(1); p.N = scores.size(2);
  p.iters = static_cast<int>(iters);
  p.col_first = col_first;
  p.exp_out = exp_log_scale.has_value();
  p.log_scale = exp_log_scale.value_or(0.0);
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_fwd_cuda(
    const at::Tensor& scores, const at::Tensor& log_mu, const at::Tensor& log_nu,
    const std::optional<at::Tensor>& bin_score, int64_t iters, bool col_first, std::optional<double> exp_log_scale) {
  const c10::cuda::CUDAGuard guard(scores.device());
  const auto bin = bin_score.has_value() ? std::optional<at::Tensor>(bin_score->contiguous()) : std::nullopt;
  const auto p = make_problem(scores, log_mu, log_nu, bin, iters, col_first, exp_log_scale);
  const int64_t bins = bin.has_value() ? 1 : 0, Ma = p.M + bins, Na = p.N + bins;
  const auto acc = scores.options().dtype(at::toOpMathType(scores.scalar_type()));
  auto out = at::empty({p.B, Ma, Na}, scores.options());
  auto us = at::zeros({p.B, iters + 1, Ma}, acc);
  auto vs = at::zeros({p.B, iters + 1, Na}, acc);
  if (p.B > 0 && Ma > 0 && Na > 0) {
    const cudaError_t err = cuda::sinkhorn_forward(p, out.data_ptr(), us.data_ptr(), vs.data_ptr(),
                                                   c10::cuda::getCurrentCUDAStream(), nullptr);
    TORCH_CHECK(err == cudaSuccess, "sinkhorn (CUDA) forward: ", cudaGetErrorString(err));
  }
  return {out, us, vs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& scores, const at::Tensor& log_mu, const at::Tensor& log_nu,
    const std::optional<at::Tensor>& bin_score, const at::Tensor& out, const at::Tensor& us, const at::Tensor& vs,
    bool col_first, std::optional<double> exp_log_scale) {
  const c10::cuda::CUDAGuard guard(scores.device());
  const auto bin = bin_score.has_value() ? std::optional<at::Tensor>(bin_score->contiguous()) : std::nullopt;
  const int64_t iters = us.size(1) - 1;
  const auto p = make_problem(scores, log_mu, log_nu, bin, iters, col_first, exp_log_scale);
  check_sinkhorn_grad(grad, scores, out, us, vs);
  const int64_t bins = bin.has_value() ? 1 : 0, Ma = p.M + bins, Na = p.N + bins;
  const auto acc = scores.options().dtype(at::toOpMathType(scores.scalar_type()));
  auto d_scores = at::empty({p.B, p.M, p.N}, scores.options());
  auto d_mu = at::empty({p.B, Ma}, acc);
  auto d_nu = at::empty({p.B, Na}, acc);
  auto d_bin_partial = at::zeros({p.B * 8}, acc);
  auto outc = out.contiguous(), usc = us.contiguous(), vsc = vs.contiguous();
  at::Tensor scratch = at::empty({p.B, iters, Ma + Na}, acc);
  if (p.B > 0 && Ma > 0 && Na > 0) {
    const cudaError_t err = cuda::sinkhorn_backward(
        p, grad.data_ptr(), grad.stride(0), grad.stride(1), grad.stride(2), outc.data_ptr(), usc.data_ptr(),
        vsc.data_ptr(), d_scores.data_ptr(), d_mu.data_ptr(), d_nu.data_ptr(), d_bin_partial.data_ptr(),
        scratch.data_ptr(), c10::cuda::getCurrentCUDAStream(), nullptr);
    TORCH_CHECK(err == cudaSuccess, "sinkhorn (CUDA) backward: ", cudaGetErrorString(err));
  }
  // the dustbin score is shared: its gradient sums the per-CTA partials in a fixed order (deterministic)
  at::Tensor d_bin = bins ? d_bin_partial.sum().reshape(bin->sizes()) : at::zeros({0}, acc);
  return {d_scores, d_mu, d_nu, d_bin};
}

}  // namespace

TORCH_LIBRARY_IMPL(tlv_fast, CUDA, m) {
  m.impl("sinkhorn_fwd", &sinkhorn_fwd_cuda);
  m.impl("sinkhorn_bwd", &sinkhorn_bwd_cuda);
}

}  // namespace tlv_fast
