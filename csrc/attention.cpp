// Fused attention on CPU tensors, forward and backward (tlv_fast::native_attention_fwd / _bwd, schemas in
// schemas.cpp): the same semantics as the Triton kernels in kernels/attention.py.
//
// Flash-style (Dao et al., "FlashAttention", 2022): each task owns a block of query rows of one (batch, head) and
// streams the keys in blocks with an online softmax in fp32, so no Nq x Nk buffer exists (except the gradient of a
// float mask, which is Nq x Nk by definition). Tile products go through the BLAS that torch links (sgemm, found at
// load time; a portable loop when the build has none); softmax, masks and dropout are fused around them.
//
//   S = scale * q k^T (+ mask) (causal: key j hidden from query i when j > i + causal_offset)
//   out = softmax(S) v (dropout on the weights), lse = log sum_j exp(S_ij); a row with no visible key: out 0, lse -inf
//
// Inputs: q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) in fp32 / bf16 / fp16, any strides; Hq a multiple
// of Hk (query head h reads kv head h / (Hq / Hk), never copied); mask None or bool / floating, broadcast to
// (B, Hq, Nq, Nk) through strides (a key-padding mask costs no Nq x Nk memory). The backward is parallel over
// (batch, kv head): dK and dV of one kv head are summed over its query heads by one task, in a fixed order, so the
// gradients (and the float-mask gradient) are deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu_blocks.h"
#include "vec_math.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace tlv_fast {
namespace {

using cpu::Block;
using cpu::Rows;
using cpu::gemm;
using cpu::heaviest_first;
using cpu::kNegInf;
using cpu::parallel_dynamic;

// The mask, read through its (broadcast) strides in its own dtype.
struct Mask {
  const void* p = nullptr;
  at::ScalarType dtype = at::kBool;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;

  explicit Mask(const std::optional<at::Tensor>& m) {
    if (!m.has_value()) return;
    p = m->data_ptr();
    dtype = m->scalar_type();
    sb = m->stride(0), sh = m->stride(1), si = m->stride(2), sj = m->stride(3);
  }
  bool present() const { return p != nullptr; }

  template <typename T>
  static void apply_typed(const T* m, int64_t sj, int64_t n, float* s) {
    if (sj == 1) {
      for (int64_t j = 0; j < n; ++j) s[j] += static_cast<float>(m[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) s[j] += static_cast<float>(m[j * sj]);
    }
  }
  // s[j] (+)= mask[b, h, i, j0 + j] for j < n: bool hides (-inf), floating adds
  void apply(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, float* s) const {
    const int64_t off = b * sb + h * sh + i * si + j0 * sj;
    switch (dtype) {
      case at::kBool: {
        const bool* m = static_cast<const bool*>(p) + off;
        if (sj == 1) {
          for (int64_t j = 0; j < n; ++j) s[j] = m[j] ? s[j] : kNegInf;
        } else {
          for (int64_t j = 0; j < n; ++j) s[j] = m[j * sj] ? s[j] : kNegInf;
        }
        break;
      }
      case at::kFloat: apply_typed(static_cast<const float*>(p) + off, sj, n, s); break;
      case at::kDouble: apply_typed(static_cast<const double*>(p) + off, sj, n, s); break;
      case at::kHalf: apply_typed(static_cast<const at::Half*>(p) + off, sj, n, s); break;
      case at::kBFloat16: apply_typed(static_cast<const at::BFloat16*>(p) + off, sj, n, s); break;
      default: TORCH_CHECK(false, "native attention: unsupported mask dtype ", dtype);
    }
  }
  // is key j of row (b, h, i) hidden (bool False, or -inf)?
  bool hidden(int64_t b, int64_t h, int64_t i, int64_t j) const {
    const int64_t off = b * sb + h * sh + i * si + j * sj;
    switch (dtype) {
      case at::kBool: return !static_cast<const bool*>(p)[off];
      case at::kFloat: return static_cast<const float*>(p)[off] == kNegInf;
      case at::kDouble: return static_cast<const double*>(p)[off] == -std::numeric_limits<double>::infinity();
      case at::kHalf: return static_cast<float>(static_cast<const at::Half*>(p)[off]) == kNegInf;
      case at::kBFloat16: return static_cast<float>(static_cast<const at::BFloat16*>(p)[off]) == kNegInf;
      default: return false;
    }
  }
};

struct Problem {
  int64_t B, Hq, Hk, Nq, Nk, D, Dv, group;
  float scale;
  bool causal;
  int64_t causal_offset;
  float dropout_p;
  uint64_t seed;
  Mask mask;

  // keys a query row can see at most: [0, end) (causal limit; trailing keys the mask hides are cut too, so a
  // key-padding mask costs nothing past the last kept key)
  int64_t key_end(int64_t b, int64_t h, int64_t i) const {
    int64_t end = causal ? std::clamp<int64_t>(i + causal_offset + 1, 0, Nk) : Nk;
    if (mask.present()) {
      while (end > 0 && mask.hidden(b, h, i, end - 1)) --end;
    }
    return end;
  }
  // the largest key_end of rows [i0, i0 + m): a mask broadcast over the rows (key padding) is scanned once
  int64_t block_key_end(int64_t b, int64_t h, int64_t i0, int64_t m) const {
    if (!mask.present() || mask.si == 0) {
      int64_t end = key_end(b, h, i0 + m - 1);  // the causal limit grows with the row
      return end;
    }
    int64_t end = 0;
    for (int64_t r = 0; r < m; ++r) end = std::max(end, key_end(b, h, i0 + r));
    return end;
  }
  // the scaled, masked logits of rows [i0, i0 + m) and keys [j0, j0 + n) into s (m x n): S = scale q k^T (+ mask)
  // q: the block's rows; k: the kv head's rows from key 0
  void logits(Block q, Block k, int64_t b, int64_t h, int64_t i0, int64_t m, int64_t j0, int64_t n, float* s) const {
    gemm(false, true, m, n, D, scale, q.p, q.ld, k.p + j0 * k.ld, k.ld, 0.0f, s, n);
    for (int64_t r = 0; r < m; ++r) {
      float* row = s + r * n;
      if (mask.present()) mask.apply(b, h, i0 + r, j0, n, row);
      if (causal) {
        const int64_t visible = i0 + r + causal_offset + 1 - j0;  // keys j0 + j with j < visible
        for (int64_t j = std::max<int64_t>(visible, 0); j < n; ++j) row[j] = kNegInf;
      }
    }
  }
  // dropout: keep element (b, h, i, j) with probability 1 - p; returns the multiplier (0 or 1 / (1 - p))
  float drop(int64_t b, int64_t h, int64_t i, int64_t j) const {
    const uint64_t idx = ((static_cast<uint64_t>(b) * Hq + h) * Nq + i) * Nk + j;
    return uniform_hash(seed, idx) >= dropout_p ? 1.0f / (1.0f - dropout_p) : 0.0f;
  }
};

std::vector<int64_t> block_key_ends(const Problem& P, int64_t block_m) {
  const int64_t qblocks = (P.Nq + block_m - 1) / block_m;
  std::vector<int64_t> kends(P.B * P.Hq * qblocks);
  at::parallel_for(0, static_cast<int64_t>(kends.size()), 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t qb = t % qblocks, bh = t / qblocks;
      const int64_t i0 = qb * block_m;
      kends[t] = P.block_key_end(bh / P.Hq, bh % P.Hq, i0, std::min(block_m, P.Nq - i0));
    }
  });
  return kends;
}

// query rows per task and keys per step: the logits block (kBlockM x kBlockN fp32) stays in L2
constexpr int64_t kBlockM = 128, kBlockN = 512;

template <typename out_t>
void forward(const Problem& P, const Rows& q, const Rows& k, const Rows& v, out_t* out, int64_t osb, int64_t osh,
             int64_t osi, float* lse) {
  const int64_t qblocks = (P.Nq + kBlockM - 1) / kBlockM;
  const int64_t bn = std::min(kBlockN, std::max<int64_t>(P.Nk, 1));
  const std::vector<int64_t> kends = block_key_ends(P, kBlockM);
  std::vector<int64_t> cost(kends.size());
  for (size_t t = 0; t < cost.size(); ++t)
    cost[t] = kends[t] * std::min(kBlockM, P.Nq - static_cast<int64_t>(t % qblocks) * kBlockM);
  const std::vector<int64_t> order = heaviest_first(cost);
  parallel_dynamic(static_cast<int64_t>(order.size()), [&](const auto& next) {
    std::vector<float> s(kBlockM * bn), acc(kBlockM * P.Dv), mx(kBlockM), l(kBlockM), qbuf, kbuf, vbuf;
    for (int64_t i = next(); i >= 0; i = next()) {
      const int64_t task = order[i];
      const int64_t qb = task % qblocks, bh = task / qblocks, h = bh % P.Hq, b = bh / P.Hq;
      const int64_t i0 = qb * kBlockM, m = std::min(kBlockM, P.Nq - i0);
      const int64_t kend = kends[task];
      const Block qr = q.block(b, h, i0, m, qbuf), kr = k.block(b, h / P.group, 0, kend, kbuf),
                  vr = v.block(b, h / P.group, 0, kend, vbuf);
      std::fill(acc.begin(), acc.begin() + m * P.Dv, 0.0f);
      std::fill(mx.begin(), mx.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t j0 = 0; j0 < kend; j0 += bn) {
        const int64_t n = std::min(bn, kend - j0);
        P.logits(qr, kr, b, h, i0, m, j0, n, s.data());
        for (int64_t r = 0; r < m; ++r) {
          float* row = s.data() + r * n;
          const float m_new = std::max(mx[r], row_max(row, n));
          if (m_new == kNegInf) {  // nothing visible yet: weights 0
            std::fill(row, row + n, 0.0f);
            continue;
          }
          const float alpha = exp_approx(mx[r] - m_new);  // exp(-inf) = 0 when the row had nothing before
          l[r] = l[r] * alpha + exp_shift_sum(row, n, m_new);
          mx[r] = m_new;
          if (alpha != 1.0f) {
            float* a = acc.data() + r * P.Dv;
            for (int64_t d = 0; d < P.Dv; ++d) a[d] *= alpha;
          }
          if (P.dropout_p > 0.0f) {
            for (int64_t j = 0; j < n; ++j) row[j] *= P.drop(b, h, i0 + r, j0 + j);
          }
        }
        gemm(false, false, m, P.Dv, n, 1.0f, s.data(), n, vr.p + j0 * vr.ld, vr.ld, 1.0f, acc.data(), P.Dv);
      }
      for (int64_t r = 0; r < m; ++r) {
        out_t* o = out + b * osb + h * osh + (i0 + r) * osi;
        const float* a = acc.data() + r * P.Dv;
        const bool empty = !(l[r] > 0.0f);
        const float inv = empty ? 0.0f : 1.0f / l[r];
        for (int64_t d = 0; d < P.Dv; ++d) o[d] = static_cast<out_t>(a[d] * inv);
        lse[(b * P.Hq + h) * P.Nq + i0 + r] = empty ? kNegInf : mx[r] + std::log(l[r]);
      }
    }
  });
}

template <typename in_t>
void store_rows(const float* src, int64_t m, int64_t width, int64_t ld_src, float mul, in_t* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t d = 0; d < width; ++d) dst[r * ld_dst + d] = static_cast<in_t>(src[r * ld_src + d] * mul);
}

template <typename in_t>
void backward(const Problem& P, const Rows& q, const Rows& k, const Rows& v, const Rows& dout, const Rows& out,
              const float* lse, const float* dlse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, float* dmask) {
  const int64_t qblocks = (P.Nq + kBlockM - 1) / kBlockM;
  const int64_t bn = std::min(kBlockN, std::max<int64_t>(P.Nk, 1));
  in_t* dq_p = dq.data_ptr<in_t>();
  in_t* dk_p = dk.data_ptr<in_t>();
  in_t* dv_p = dv.data_ptr<in_t>();
  const std::vector<int64_t> kends = block_key_ends(P, kBlockM);
  std::vector<int64_t> cost(P.B * P.Hk, 0);
  for (size_t t = 0; t < kends.size(); ++t) {  // t = ((b * Hq + h) * qblocks + qb); its kv task b * Hk + h / group
    const int64_t qb = t % qblocks, bh = t / qblocks, h = bh % P.Hq, b = bh / P.Hq;
    cost[b * P.Hk + h / P.group] += kends[t] * std::min(kBlockM, P.Nq - qb * kBlockM);
  }
  const std::vector<int64_t> order = heaviest_first(cost);
  parallel_dynamic(static_cast<int64_t>(order.size()), [&](const auto& next) {
    std::vector<float> pr(kBlockM * bn), pd(P.dropout_p > 0.0f ? kBlockM * bn : 0), dp(kBlockM * bn);
    std::vector<float> dq_acc(kBlockM * P.D), delta(kBlockM), dk_acc(P.Nk * P.D), dv_acc(P.Nk * P.Dv);
    std::vector<float> qbuf, kbuf, vbuf, gbuf, obuf;
    for (int64_t i = next(); i >= 0; i = next()) {
      const int64_t task = order[i];
      const int64_t hk = task % P.Hk, b = task / P.Hk;
      const Block kr = k.block(b, hk, 0, P.Nk, kbuf), vr = v.block(b, hk, 0, P.Nk, vbuf);
      std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
      for (int64_t h = hk * P.group; h < (hk + 1) * P.group; ++h) {
        for (int64_t qb = 0; qb < qblocks; ++qb) {
          const int64_t i0 = qb * kBlockM, m = std::min(kBlockM, P.Nq - i0);
          const float* row_lse = lse + (b * P.Hq + h) * P.Nq + i0;
          const int64_t kend = kends[(b * P.Hq + h) * qblocks + qb];
          const Block qr = q.block(b, h, i0, m, qbuf), gr = dout.block(b, h, i0, m, gbuf),
                      orow = out.block(b, h, i0, m, obuf);
          for (int64_t r = 0; r < m; ++r) {
            const float* o = orow.p + r * orow.ld;
            const float* g = gr.p + r * gr.ld;
            // d lse / d S = softmax: a gradient into lse enters as if it were subtracted from delta
            delta[r] = dot(o, g, P.Dv) - (dlse != nullptr ? dlse[(b * P.Hq + h) * P.Nq + i0 + r] : 0.0f);
          }
          std::fill(dq_acc.begin(), dq_acc.begin() + m * P.D, 0.0f);
          for (int64_t j0 = 0; j0 < kend; j0 += bn) {
            const int64_t n = std::min(bn, kend - j0);
            P.logits(qr, kr, b, h, i0, m, j0, n, pr.data());
            for (int64_t r = 0; r < m; ++r) {  // P = exp(S - lse); a row that sees nothing has P = 0
              float* row = pr.data() + r * n;
              const float shift = row_lse[r];
              if (shift == kNegInf) {
                std::fill(row, row + n, 0.0f);
              } else {
                for (int64_t j = 0; j < n; ++j) row[j] = exp_approx(row[j] - shift);
              }
            }
            const float* weights = pr.data();  // what multiplied v in the forward
            if (P.dropout_p > 0.0f) {
              for (int64_t r = 0; r < m; ++r)
                for (int64_t j = 0; j < n; ++j) pd[r * n + j] = pr[r * n + j] * P.drop(b, h, i0 + r, j0 + j);
              weights = pd.data();
            }
            // dV += weights^T dO ; dP = dO V^T
            gemm(true, false, n, P.Dv, m, 1.0f, weights, n, gr.p, gr.ld, 1.0f, dv_acc.data() + j0 * P.Dv, P.Dv);
            gemm(false, true, m, n, P.Dv, 1.0f, gr.p, gr.ld, vr.p + j0 * vr.ld, vr.ld, 0.0f, dp.data(), n);
            for (int64_t r = 0; r < m; ++r) {  // dS = P * (dP * dropout - delta), in place in dp
              float* g = dp.data() + r * n;
              const float* p = pr.data() + r * n;
              const float dr = delta[r];
              if (P.dropout_p > 0.0f) {
                for (int64_t j = 0; j < n; ++j) g[j] = p[j] * (g[j] * P.drop(b, h, i0 + r, j0 + j) - dr);
              } else {
                for (int64_t j = 0; j < n; ++j) g[j] = p[j] * (g[j] - dr);
              }
              if (dmask != nullptr) {
                float* dm = dmask + ((b * P.Hq + h) * P.Nq + i0 + r) * P.Nk + j0;
                std::copy(g, g + n, dm);
              }
            }
            // dQ += dS K (scaled at the end) ; dK += scale dS^T Q
            gemm(false, false, m, P.D, n, 1.0f, dp.data(), n, kr.p + j0 * kr.ld, kr.ld, 1.0f, dq_acc.data(), P.D);
            gemm(true, false, n, P.D, m, P.scale, dp.data(), n, qr.p, qr.ld, 1.0f, dk_acc.data() + j0 * P.D, P.D);
          }
          store_rows(dq_acc.data(), m, P.D, P.D, P.scale,
                     dq_p + b * dq.stride(0) + h * dq.stride(1) + i0 * dq.stride(2), dq.stride(2));
        }
      }
      store_rows(dk_acc.data(), P.Nk, P.D, P.D, 1.0f, dk_p + b * dk.stride(0) + hk * dk.stride(1), dk.stride(2));
      store_rows(dv_acc.data(), P.Nk, P.Dv, P.Dv, 1.0f, dv_p + b * dv.stride(0) + hk * dv.stride(1), dv.stride(2));
    }
  });
}

// An output shaped (B, H, N, width) laid out in q's order of (B, H, N): BHND or BNHD memory (so a (B, N, H, D) input
// gives a (B, N, H, D) memory output, as torch's SDPA does), last dim contiguous.
at::Tensor empty_like_layout(const at::Tensor& q, int64_t width, at::ScalarType dtype) {
  const auto B = q.size(0), H = q.size(1), N = q.size(2);
  auto opts = q.options().dtype(dtype);
  if (H > 1 && N > 1 && q.stride(1) < q.stride(2)) return at::empty({B, N, H, width}, opts).transpose(1, 2);
  return at::empty({B, H, N, width}, opts);
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& seed, double scale,
                     std::optional<int64_t> causal_offset, double dropout_p) {
  Problem P{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3), 1,
            static_cast<float>(scale), causal_offset.has_value(), causal_offset.value_or(0),
            static_cast<float>(dropout_p), 0, Mask(mask)};
  P.group = P.Hk > 0 ? P.Hq / P.Hk : 1;
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong,
                "native attention: dropout_p > 0 needs a one-element int64 seed tensor");
    P.seed = static_cast<uint64_t>(seed->item<int64_t>());
  }
  return P;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& mask,
                                                     const std::optional<at::Tensor>& seed, double scale,
                                                     std::optional<int64_t> causal_offset, double dropout_p) {
  check_attention("native_attention_fwd", q, k, v, mask, dropout_p);
  Problem P = make_problem(q, k, v, mask, seed, scale, causal_offset, dropout_p);
  at::Tensor out = empty_like_layout(q, P.Dv, q.scalar_type());
  at::Tensor lse = at::empty({P.B, P.Hq, P.Nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse.fill_(-std::numeric_limits<double>::infinity())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "native_attention_fwd", [&] {
    forward<scalar_t>(P, Rows(q), Rows(k), Rows(v), out.data_ptr<scalar_t>(), out.stride(0), out.stride(1),
                      out.stride(2), lse.data_ptr<float>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& seed, double scale, std::optional<int64_t> causal_offset, double dropout_p,
    bool mask_grad) {
  check_attention("native_attention_bwd", q, k, v, mask, dropout_p);
  check_attention_grad(dout, dlse, q, v, out, lse);
  TORCH_CHECK(!mask_grad || mask.has_value(), "native_attention_bwd: mask_grad needs a mask");
  Problem P = make_problem(q, k, v, mask, seed, scale, causal_offset, dropout_p);
  // dK / dV contiguous per (b, kv head): each is written whole by the one task that owns it
  at::Tensor dq = empty_like_layout(q, P.D, q.scalar_type());
  at::Tensor dk = at::empty({P.B, P.Hk, P.Nk, P.D}, k.options());
  at::Tensor dv = at::empty({P.B, P.Hk, P.Nk, P.Dv}, v.options());
  at::Tensor dmask = mask_grad ? at::zeros({P.B, P.Hq, P.Nq, P.Nk}, q.options().dtype(at::kFloat))
                               : at::empty({0}, q.options().dtype(at::kFloat));
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv, dmask};
  }
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dlse_c = dlse.has_value() ? dlse->to(at::kFloat).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "native_attention_bwd", [&] {
    backward<scalar_t>(P, Rows(q), Rows(k), Rows(v), Rows(dout), Rows(out), lse_c.data_ptr<float>(),
                       dlse.has_value() ? dlse_c.data_ptr<float>() : nullptr, dq, dk, dv,
                       mask_grad ? dmask.data_ptr<float>() : nullptr);
  });
  return {dq, dk, dv, dmask};
}

}  // namespace

TORCH_LIBRARY_IMPL(tlv_fast, CPU, m) {
  m.impl("native_attention_fwd", &attention_fwd_cpu);
  m.impl("native_attention_bwd", &attention_bwd_cpu);
}

}  // namespace tlv_fast
