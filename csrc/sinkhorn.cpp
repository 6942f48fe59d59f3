// Batched log-domain Sinkhorn (entropic optimal transport): the CPU implementation (schema: schemas.cpp).
//
//   v_j = log_nu_j - LSE_i(S_ij + u_i),   u_i = log_mu_i - LSE_j(S_ij + v_j)      (Cuturi 2013, log domain)
//
// `iters` unrolled pairs of updates (columns first as in STTR, or rows first as in SuperGlue) from u = v = 0; the
// result is the log plan S + u + v, or exp(S + u + v + c) when `exp_log_scale` = c is given. A row or column with
// no finite score keeps potential 0. The potentials after every update are returned (O(iters (M + N)) per
// problem) so that the backward replays the iterations in reverse without the autograd graph:
//
//   row update   u = log_mu - LSE_j(S + v):  A_ij = exp(S_ij + v_j + u_i - log_mu_i)
//                dlog_mu += du,  dv_j -= sum_i du_i A_ij,  dS_ij -= du_i A_ij
//   column update v = log_nu - LSE_i(S + u): B_ij = exp(S_ij + u_i + v_j - log_nu_j)
//                dlog_nu += dv,  du_i -= sum_j dv_j B_ij,  dS_ij -= dv_j B_ij
//
// With `bin_score` (a scalar tensor) the problem is augmented with a dustbin row and column holding that score
// (SuperGlue / STTR) without materialising the augmented matrix in the caller's memory.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace tlv_fast {
namespace {


template <typename T>
struct Problem {
  int64_t M, N, Ma, Na;  // scores are M x N; augmented with dustbins Ma x Na
  std::vector<T> S;      // Ma x Na, row-major
  std::vector<T> tmp;    // Na
  std::vector<T> tmp2;   // Na

  Problem(int64_t m, int64_t n, bool bins) : M(m), N(n), Ma(m + bins), Na(n + bins),
      S(static_cast<size_t>((m + bins) * (n + bins))), tmp(n + bins), tmp2(n + bins) {}

  void load(const T* scores, int64_t sm, int64_t sn, const T* bin) {
    for (int64_t i = 0; i < Ma; ++i) {
      T* row = S.data() + i * Na;
      if (i < M) {
        for (int64_t j = 0; j < N; ++j) row[j] = scores[i * sm + j * sn];
        if (Na > N) row[N] = *bin;
      } else {
        for (int64_t j = 0; j < Na; ++j) row[j] = *bin;
      }
    }
  }

  // Shift for a log-sum-exp: the exact maximum costs a pass of its own, so from the second iteration on the
  // previous value of the same LSE serves (potentials move little); a sum outside [kLow, kHigh] (the shift was
  // off by more than ~69) falls back to the exact maximum. Same result up to rounding.
  static constexpr T kLow = T(1e-30), kHigh = T(1e30);
  static constexpr T kNegInf = -std::numeric_limits<T>::infinity();

  // u = log_mu - LSE_j(S + v); potential 0 for an empty row. u_prev: the previous u (or nullptr: exact shifts)
  void row_update(const T* v, const T* log_mu, int64_t s_mu, const T* u_prev, T* u) {
    for (int64_t i = 0; i < Ma; ++i) {
      const T* row = S.data() + i * Na;
      const T lm = log_mu[i * s_mu];
      if (u_prev != nullptr && u_prev[i] != 0) {  // 0: first use, or an empty row
        const T shift = lm - u_prev[i];
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < Na; ++j) s += exp_approx(row[j] + v[j] - shift);
        if (s >= kLow && s <= kHigh) {
          u[i] = lm - (shift + std::log(s));
          continue;
        }
      }
      T m = kNegInf;
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < Na; ++j) {
        const T x = row[j] + v[j];
        m = m > x ? m : x;
      }
      if (m == kNegInf) {
        u[i] = 0;
        continue;
      }
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < Na; ++j) s += exp_approx(row[j] + v[j] - m);
      u[i] = lm - (m + std::log(s));
    }
  }

  // csum_j = sum_i exp(S_ij + u_i - shift_j)
  void col_sums(const T* u, const T* shift, T* csum) const {
    std::fill(csum, csum + Na, T(0));
    for (int64_t i = 0; i < Ma; ++i) {
      const T* row = S.data() + i * Na;
      const T ui = u[i];
#pragma omp simd
      for (int64_t j = 0; j < Na; ++j) csum[j] += exp_approx(row[j] + ui - shift[j]);
    }
  }

  // v = log_nu - LSE_i(S + u); potential 0 for an empty column. v_prev as u_prev above
  void col_update(const T* u, const T* log_nu, int64_t s_nu, const T* v_prev, T* v) {
    T* shift = tmp.data();
    T* csum = tmp2.data();
    bool exact = v_prev == nullptr;
    for (int64_t j = 0; j < Na && !exact; ++j) {
      exact = v_prev[j] == 0;
      shift[j] = log_nu[j * s_nu] - v_prev[j];
    }
    if (!exact) {
      col_sums(u, shift, csum);
      for (int64_t j = 0; j < Na && !exact; ++j) exact = !(csum[j] >= kLow && csum[j] <= kHigh);
    }
    if (exact) {
      std::fill(shift, shift + Na, kNegInf);
      for (int64_t i = 0; i < Ma; ++i) {
        const T* row = S.data() + i * Na;
        const T ui = u[i];
#pragma omp simd
        for (int64_t j = 0; j < Na; ++j) {
          const T x = row[j] + ui;
          shift[j] = shift[j] > x ? shift[j] : x;
        }
      }
      col_sums(u, shift, csum);
    }
    for (int64_t j = 0; j < Na; ++j) {
      v[j] = shift[j] == kNegInf ? T(0) : log_nu[j * s_nu] - (shift[j] + std::log(csum[j]));
    }
  }

  // log plan S + u + v, or exp(S + u + v + c)
  void write_plan(const T* u, const T* v, bool exp_out, T c, T* out) const {
    for (int64_t i = 0; i < Ma; ++i) {
      const T* row = S.data() + i * Na;
      T* o = out + i * Na;
      const T ui = u[i];
      if (exp_out) {
#pragma omp simd
        for (int64_t j = 0; j < Na; ++j) o[j] = exp_approx(row[j] + ui + v[j] + c);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < Na; ++j) o[j] = row[j] + ui + v[j];
      }
    }
  }

  // reverse of u_out = row(v_in): consumes du (then zeroed), adds to dv, dlog_mu and dS
  void row_backward(const T* u_out, const T* v_in, const T* log_mu, int64_t s_mu, const char* empty, T* du, T* dv,
                    T* dmu, T* dS) const {
    for (int64_t i = 0; i < Ma; ++i) {
      if (empty[i]) continue;  // potential fixed at 0: no path to log_mu, S or v
      dmu[i] += du[i];
      const T c = u_out[i] - log_mu[i * s_mu], g = du[i];
      const T* row = S.data() + i * Na;
      T* drow = dS + i * Na;
#pragma omp simd
      for (int64_t j = 0; j < Na; ++j) {
        const T t = g * exp_approx(row[j] + v_in[j] + c);  // du_i * A_ij
        drow[j] -= t;
        dv[j] -= t;
      }
    }
    std::fill(du, du + Ma, T(0));
  }

  // reverse of v_out = col(u_in): consumes dv (then zeroed), adds to du, dlog_nu and dS
  void col_backward(const T* v_out, const T* u_in, const T* log_nu, int64_t s_nu, const char* empty, T* dv, T* du,
                    T* dnu, T* dS, T* cj) const {
    for (int64_t j = 0; j < Na; ++j) {
      cj[j] = v_out[j] - log_nu[j * s_nu];
      if (empty[j]) {
        dv[j] = 0;
      } else {
        dnu[j] += dv[j];
      }
    }
    for (int64_t i = 0; i < Ma; ++i) {
      const T* row = S.data() + i * Na;
      T* drow = dS + i * Na;
      const T ui = u_in[i];
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < Na; ++j) {
        const T t = dv[j] * exp_approx(row[j] + ui + cj[j]);  // dv_j * B_ij
        drow[j] -= t;
        acc += t;
      }
      du[i] -= acc;
    }
    std::fill(dv, dv + Na, T(0));
  }
};

template <typename scalar_t>
void sinkhorn_fwd_impl(const at::Tensor& scores, const at::Tensor& log_mu, const at::Tensor& log_nu,
                       const scalar_t* pbin, int64_t iters, bool col_first, std::optional<double> exp_log_scale,
                       at::Tensor& out, at::Tensor& us, at::Tensor& vs) {
  const bool bins = pbin != nullptr;
  const int64_t B = scores.size(0), M = scores.size(1), N = scores.size(2), Ma = M + bins, Na = N + bins;
  const scalar_t* S = scores.data_ptr<scalar_t>();
  const scalar_t* lmu = log_mu.data_ptr<scalar_t>();
  const scalar_t* lnu = log_nu.data_ptr<scalar_t>();
  scalar_t* O = out.data_ptr<scalar_t>();
  scalar_t* U = us.data_ptr<scalar_t>();
  scalar_t* V = vs.data_ptr<scalar_t>();
  const int64_t ss0 = scores.stride(0), ss1 = scores.stride(1), ss2 = scores.stride(2);
  const int64_t sm0 = log_mu.stride(0), sm1 = log_mu.stride(1), sn0 = log_nu.stride(0), sn1 = log_nu.stride(1);
  const bool exp_out = exp_log_scale.has_value();
  const scalar_t c = exp_out ? static_cast<scalar_t>(*exp_log_scale) : scalar_t(0);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Problem<scalar_t> p(M, N, bins);
    for (int64_t b = begin; b < end; ++b) {
      p.load(S + b * ss0, ss1, ss2, pbin);
      scalar_t* u = U + b * (iters + 1) * Ma;
      scalar_t* v = V + b * (iters + 1) * Na;
      for (int64_t t = 1; t <= iters; ++t) {
        scalar_t* u_t = u + t * Ma;
        scalar_t* v_t = v + t * Na;
        const scalar_t* u_prev = t > 1 ? u_t - Ma : nullptr;
        const scalar_t* v_prev = t > 1 ? v_t - Na : nullptr;
        if (col_first) {
          p.col_update(u_t - Ma, lnu + b * sn0, sn1, v_prev, v_t);
          p.row_update(v_t, lmu + b * sm0, sm1, u_prev, u_t);
        } else {
          p.row_update(v_t - Na, lmu + b * sm0, sm1, u_prev, u_t);
          p.col_update(u_t, lnu + b * sn0, sn1, v_prev, v_t);
        }
      }
      p.write_plan(u + iters * Ma, v + iters * Na, exp_out, c, O + b * Ma * Na);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_fwd_cpu(
    const at::Tensor& scores, const at::Tensor& log_mu, const at::Tensor& log_nu,
    const std::optional<at::Tensor>& bin_score, int64_t iters, bool col_first, std::optional<double> exp_log_scale) {
  check_sinkhorn(scores, log_mu, log_nu, bin_score, iters);
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
              "sinkhorn (CPU): scores must be float32 or float64, got ", scores.scalar_type());
  const int64_t bins = bin_score.has_value() ? 1 : 0;
  const int64_t B = scores.size(0), Ma = scores.size(1) + bins, Na = scores.size(2) + bins;
  auto out = at::empty({B, Ma, Na}, scores.options());
  auto us = at::zeros({B, iters + 1, Ma}, scores.options());
  auto vs = at::zeros({B, iters + 1, Na}, scores.options());
  at::Tensor bin = bins ? bin_score->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "sinkhorn_fwd_cpu", [&] {
    sinkhorn_fwd_impl<scalar_t>(scores, log_mu, log_nu, bins ? bin.data_ptr<scalar_t>() : nullptr, iters,
                                col_first, exp_log_scale, out, us, vs);
  });
  return {out, us, vs};
}

template <typename scalar_t>
void sinkhorn_bwd_impl(const at::Tensor& grad, const at::Tensor& scores, const at::Tensor& log_mu,
                       const at::Tensor& log_nu, const scalar_t* pbin, const at::Tensor& out, const at::Tensor& us,
                       const at::Tensor& vs, bool col_first, bool exp_out, at::Tensor& d_scores, at::Tensor& d_mu,
                       at::Tensor& d_nu, at::Tensor& d_bin_each) {
  const bool bins = pbin != nullptr;
  const int64_t B = scores.size(0), M = scores.size(1), N = scores.size(2), Ma = M + bins, Na = N + bins;
  const int64_t iters = us.size(1) - 1;
  constexpr scalar_t kInf = std::numeric_limits<scalar_t>::infinity();
  const scalar_t* S = scores.data_ptr<scalar_t>();
  const scalar_t* lmu = log_mu.data_ptr<scalar_t>();
  const scalar_t* lnu = log_nu.data_ptr<scalar_t>();
  const scalar_t* G = grad.data_ptr<scalar_t>();
  const scalar_t* O = out.data_ptr<scalar_t>();
  const scalar_t* U = us.data_ptr<scalar_t>();
  const scalar_t* V = vs.data_ptr<scalar_t>();
  scalar_t* dS_out = d_scores.data_ptr<scalar_t>();
  scalar_t* dMu = d_mu.data_ptr<scalar_t>();
  scalar_t* dNu = d_nu.data_ptr<scalar_t>();
  scalar_t* dBin = d_bin_each.data_ptr<scalar_t>();
  const int64_t ss0 = scores.stride(0), ss1 = scores.stride(1), ss2 = scores.stride(2);
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1), gs2 = grad.stride(2);
  const int64_t sm0 = log_mu.stride(0), sm1 = log_mu.stride(1), sn0 = log_nu.stride(0), sn1 = log_nu.stride(1);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Problem<scalar_t> p(M, N, bins);
    std::vector<scalar_t> dS(Ma * Na), du(Ma), dv(Na), cj(Na);
    std::vector<char> row_empty(Ma), col_empty(Na);
    for (int64_t b = begin; b < end; ++b) {
      p.load(S + b * ss0, ss1, ss2, pbin);
      const scalar_t* mu = lmu + b * sm0;
      const scalar_t* nu = lnu + b * sn0;
      const scalar_t* u = U + b * (iters + 1) * Ma;
      const scalar_t* v = V + b * (iters + 1) * Na;
      scalar_t* dmu = dMu + b * Ma;
      scalar_t* dnu = dNu + b * Na;
      std::fill(row_empty.begin(), row_empty.end(), 1);
      std::fill(col_empty.begin(), col_empty.end(), 1);
      std::fill(du.begin(), du.end(), scalar_t(0));
      std::fill(dv.begin(), dv.end(), scalar_t(0));
      std::fill(dmu, dmu + Ma, scalar_t(0));
      std::fill(dnu, dnu + Na, scalar_t(0));
      // dL/d(log plan) = G, times the output when the output is exp(log plan + c); it reaches S, u_T and v_T
      for (int64_t i = 0; i < Ma; ++i) {
        for (int64_t j = 0; j < Na; ++j) {
          scalar_t g = G[b * gs0 + i * gs1 + j * gs2];
          if (exp_out) g *= O[(b * Ma + i) * Na + j];
          dS[i * Na + j] = g;
          du[i] += g;
          dv[j] += g;
          if (p.S[i * Na + j] != -kInf) row_empty[i] = col_empty[j] = 0;
        }
      }
      for (int64_t t = iters; t >= 1; --t) {
        if (col_first) {  // forward: v_t = col(u_{t-1}), u_t = row(v_t)
          p.row_backward(u + t * Ma, v + t * Na, mu, sm1, row_empty.data(), du.data(), dv.data(), dmu, dS.data());
          p.col_backward(v + t * Na, u + (t - 1) * Ma, nu, sn1, col_empty.data(), dv.data(), du.data(), dnu,
                         dS.data(), cj.data());
        } else {  // forward: u_t = row(v_{t-1}), v_t = col(u_t)
          p.col_backward(v + t * Na, u + t * Ma, nu, sn1, col_empty.data(), dv.data(), du.data(), dnu, dS.data(),
                         cj.data());
          p.row_backward(u + t * Ma, v + (t - 1) * Na, mu, sm1, row_empty.data(), du.data(), dv.data(), dmu,
                         dS.data());
        }
      }
      scalar_t* ds = dS_out + b * M * N;
      scalar_t bin_acc = 0;
      for (int64_t i = 0; i < Ma; ++i) {
        for (int64_t j = 0; j < Na; ++j) {
          if (i < M && j < N) {
            ds[i * N + j] = dS[i * Na + j];
          } else {
            bin_acc += dS[i * Na + j];
          }
        }
      }
      dBin[b] = bin_acc;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& scores, const at::Tensor& log_mu, const at::Tensor& log_nu,
    const std::optional<at::Tensor>& bin_score, const at::Tensor& out, const at::Tensor& us, const at::Tensor& vs,
    bool col_first, std::optional<double> exp_log_scale) {
  check_sinkhorn(scores, log_mu, log_nu, bin_score, us.size(1) - 1);
  check_sinkhorn_grad(grad, scores, out, us, vs);
  const int64_t bins = bin_score.has_value() ? 1 : 0;
  const int64_t B = scores.size(0), M = scores.size(1), N = scores.size(2);
  auto d_scores = at::empty({B, M, N}, scores.options());
  auto d_mu = at::empty({B, M + bins}, scores.options());
  auto d_nu = at::empty({B, N + bins}, scores.options());
  auto d_bin_each = at::zeros({B}, scores.options());
  auto usc = us.contiguous(), vsc = vs.contiguous(), outc = out.contiguous();
  at::Tensor bin = bins ? bin_score->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "sinkhorn_bwd_cpu", [&] {
    sinkhorn_bwd_impl<scalar_t>(grad, scores, log_mu, log_nu, bins ? bin.data_ptr<scalar_t>() : nullptr, outc, usc,
                                vsc, col_first, exp_log_scale.has_value(), d_scores, d_mu, d_nu, d_bin_each);
  });
  // the dustbin score is shared by every problem: its gradient sums theirs, in batch order (deterministic)
  at::Tensor d_bin = bins ? d_bin_each.sum().reshape(bin_score->sizes()) : at::zeros({0}, scores.options());
  return {d_scores, d_mu, d_nu, d_bin};
}

}  // namespace

TORCH_LIBRARY_IMPL(tlv_fast, CPU, m) {
  m.impl("sinkhorn_fwd", &sinkhorn_fwd_cpu);
  m.impl("sinkhorn_bwd", &sinkhorn_bwd_cpu);
}

}  // namespace tlv_fast
