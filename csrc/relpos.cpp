// STTR's relative-position attention on CPU tensors, forward and backward (tlv_fast::native_relpos_fwd / _bwd,
// schemas in schemas.cpp): the semantics of kernels/relpos_attention.py and tlv_fast.reference.relpos_attention.
//
//   S[b, h, i, j] = q_i . k_j + q_i . kr[r_ij] + qr[r_ij] . k_j   (q and qr carry the 1/sqrt(d) already)
//   r_ij = (i - j) + Nk - 1 (offset_sign +1) or (j - i) + Nq - 1 (offset_sign -1); mask_upper hides j > i
//   out = softmax_j(S) v; lse; optionally the head-summed logits (B, Nq, Nk) fp32 (-inf where masked)
//
// The banded-table trick (Li et al., "Revisiting Stereo Depth Estimation From a Sequence-to-Sequence Perspective
// with Transformers", 2021, computed flash-style): a block of m queries x n keys touches only the m + n - 1 table
// rows of its band, so the positional terms are two small products with the band (m x (m + n - 1) and
// n x (m + n - 1)) read along diagonals; nothing Nq x Nk x d, nor Nq x (Nq + Nk - 1), is formed. One task owns one
// batch element (all heads and blocks): the head-summed logits are written without races, and the table gradients
// are summed over the batch in a fixed order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu_blocks.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace tlv_fast {
namespace {

using cpu::Block;
using cpu::gemm;
using cpu::kNegInf;
using cpu::Rows;

constexpr int64_t kBlock = 128;  // queries and keys per block

struct Relpos {
  int64_t B, H, Nq, Nk, D, Dv;
  int sign;
  bool mask_upper;

  // band of table rows of the block (i0, m) x (j0, n): rows [base, base + m + n - 1); c_ij = r_ij - base
  int64_t band_base(int64_t i0, int64_t m, int64_t j0, int64_t n) const {
    return sign > 0 ? (i0 - j0 - n + 1) + Nk - 1 : (j0 - i0 - m + 1) + Nq - 1;
  }
  int64_t band_col(int64_t r, int64_t j, int64_t m, int64_t n) const {  // r = i - i0, j = j - j0
    return sign > 0 ? (r - j) + n - 1 : (j - r) + m - 1;
  }
  int64_t key_end(int64_t i) const { return mask_upper ? std::min(Nk, i + 1) : Nk; }
};

// The logits of one block into s (m x n): q k^T + the two banded positional terms, mask_upper applied.
// qkr (m x w) and kqr (n x w), w = m + n - 1, are scratch.
void block_logits(const Relpos& R, Block q, Block k, Block qr, Block kr, int64_t i0, int64_t m, int64_t j0, int64_t n,
                  float* s, float* qkr, float* kqr) {
  const int64_t w = m + n - 1, base = R.band_base(i0, m, j0, n);
  gemm(false, true, m, n, R.D, 1.0f, q.p, q.ld, k.p + j0 * k.ld, k.ld, 0.0f, s, n);
  gemm(false, true, m, w, R.D, 1.0f, q.p, q.ld, kr.p + base * kr.ld, kr.ld, 0.0f, qkr, w);      // q_i . kr[band]
  gemm(false, true, n, w, R.D, 1.0f, k.p + j0 * k.ld, k.ld, qr.p + base * qr.ld, qr.ld, 0.0f, kqr, w);  // k_j . qr
  for (int64_t r = 0; r < m; ++r) {
    float* row = s + r * n;
    const float* a = qkr + r * w;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t c = R.band_col(r, j, m, n);
      row[j] += a[c] + kqr[j * w + c];
    }
    if (R.mask_upper) {
      for (int64_t j = std::max<int64_t>(i0 + r + 1 - j0, 0); j < n; ++j) row[j] = kNegInf;
    }
  }
}

// (B, H, R, d) fp32 -> (R, H, d) in `dtype`: the sum over the batch, element by element in batch order (a fixed
// order whatever the thread count)
at::Tensor batch_sum_table(const at::Tensor& per_batch, at::ScalarType dtype) {
  const int64_t B = per_batch.size(0), H = per_batch.size(1), R = per_batch.size(2), D = per_batch.size(3);
  at::Tensor total = at::zeros({R, H, D}, per_batch.options());
  const float* src = per_batch.data_ptr<float>();
  float* dst = total.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t h = 0; h < H; ++h) {
        float* o = dst + (r * H + h) * D;
        for (int64_t b = 0; b < B; ++b) {
          const float* x = src + ((b * H + h) * R + r) * D;
          for (int64_t d = 0; d < D; ++d) o[d] += x[d];
        }
      }
  });
  return total.to(dtype);
}

// (H, R, d) view of an (R, H, d) table, as a (1, H, R, d) tensor for Rows
at::Tensor table_view(const at::Tensor& t) { return t.permute({1, 0, 2}).unsqueeze(0); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> relpos_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& qr,
                                                              const at::Tensor& kr, int64_t offset_sign,
                                                              bool mask_upper, bool return_logits) {
  check_relpos("native_relpos_fwd", q, k, v, qr, kr, offset_sign);
  const Relpos R{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3), static_cast<int>(offset_sign),
                 mask_upper};
  at::Tensor out = at::empty({R.B, R.H, R.Nq, R.Dv}, q.options());
  at::Tensor lse = at::empty({R.B, R.H, R.Nq}, q.options().dtype(at::kFloat));
  at::Tensor logits = return_logits ? at::zeros({R.B, R.Nq, R.Nk}, q.options().dtype(at::kFloat))
                                    : at::empty({0}, q.options().dtype(at::kFloat));
  const Rows qs(q), ks(k), vs(v), qrs(table_view(qr)), krs(table_view(kr));
  float* lse_p = lse.data_ptr<float>();
  float* logit_p = return_logits ? logits.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "native_relpos_fwd", [&] {
    scalar_t* out_p = out.data_ptr<scalar_t>();
    at::parallel_for(0, R.B, 1, [&](int64_t begin, int64_t end) {
      const int64_t bn = std::min(kBlock, R.Nk), bm = std::min(kBlock, R.Nq), w = bm + bn - 1;
      std::vector<float> s(bm * bn), qkr(bm * w), kqr(bn * w), acc(bm * R.Dv), mx(bm), l(bm);
      std::vector<float> qbuf, kbuf, vbuf, qrbuf, krbuf;
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t h = 0; h < R.H; ++h) {
          const Block kb = ks.block(b, h, 0, R.Nk, kbuf), vb = vs.block(b, h, 0, R.Nk, vbuf);
          const int64_t rows = R.Nq + R.Nk - 1;
          const Block qrb = qrs.block(0, h, 0, rows, qrbuf), krb = krs.block(0, h, 0, rows, krbuf);
          for (int64_t i0 = 0; i0 < R.Nq; i0 += bm) {
            const int64_t m = std::min(bm, R.Nq - i0);
            const Block qb = qs.block(b, h, i0, m, qbuf);
            const int64_t kend = R.key_end(i0 + m - 1);
            std::fill(acc.begin(), acc.begin() + m * R.Dv, 0.0f);
            std::fill(mx.begin(), mx.end(), kNegInf);
            std::fill(l.begin(), l.end(), 0.0f);
            for (int64_t j0 = 0; j0 < kend; j0 += bn) {
              const int64_t n = std::min(bn, kend - j0);
              block_logits(R, qb, kb, qrb, krb, i0, m, j0, n, s.data(), qkr.data(), kqr.data());
              for (int64_t r = 0; r < m; ++r) {
                float* row = s.data() + r * n;
                if (logit_p != nullptr) {  // head-summed logits; -inf where masked (set once, by head 0)
                  float* lg = logit_p + (b * R.Nq + i0 + r) * R.Nk + j0;
                  for (int64_t j = 0; j < n; ++j) lg[j] += row[j];
                }
                const float m_new = std::max(mx[r], row_max(row, n));
                const float alpha = exp_approx(mx[r] - m_new);
                l[r] = l[r] * alpha + exp_shift_sum(row, n, m_new);
                mx[r] = m_new;
                if (alpha != 1.0f) {
                  float* a = acc.data() + r * R.Dv;
                  for (int64_t d = 0; d < R.Dv; ++d) a[d] *= alpha;
                }
              }
              gemm(false, false, m, R.Dv, n, 1.0f, s.data(), n, vb.p + j0 * vb.ld, vb.ld, 1.0f, acc.data(), R.Dv);
            }
            for (int64_t r = 0; r < m; ++r) {
              scalar_t* o = out_p + ((b * R.H + h) * R.Nq + i0 + r) * R.Dv;
              const float inv = 1.0f / l[r];  // every row sees key 0
              for (int64_t d = 0; d < R.Dv; ++d) o[d] = static_cast<scalar_t>(acc[r * R.Dv + d] * inv);
              lse_p[(b * R.H + h) * R.Nq + i0 + r] = mx[r] + std::log(l[r]);
            }
          }
        }
        if (logit_p != nullptr && R.mask_upper) {  // keys past the causal limit were never visited
          for (int64_t i = 0; i < R.Nq; ++i) {
            float* lg = logit_p + (b * R.Nq + i) * R.Nk;
            for (int64_t j = R.key_end(i); j < R.Nk; ++j) lg[j] = kNegInf;
          }
        }
      }
    });
  });
  return {out, lse, logits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> relpos_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlogits, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& qr, const at::Tensor& kr, const at::Tensor& out, const at::Tensor& lse,
    int64_t offset_sign, bool mask_upper) {
  check_relpos("native_relpos_bwd", q, k, v, qr, kr, offset_sign);
  check_relpos_grad(dout, dlogits, q, v, out, lse);
  const Relpos R{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3), static_cast<int>(offset_sign),
                 mask_upper};
  const int64_t rows = R.Nq + R.Nk - 1;
  at::Tensor dq = at::empty({R.B, R.H, R.Nq, R.D}, q.options());
  at::Tensor dk = at::empty({R.B, R.H, R.Nk, R.D}, k.options());
  at::Tensor dv = at::empty({R.B, R.H, R.Nk, R.Dv}, v.options());
  // table gradients per batch element (fp32), summed over the batch afterwards in index order
  at::Tensor dqr_b = at::zeros({R.B, R.H, rows, R.D}, q.options().dtype(at::kFloat));
  at::Tensor dkr_b = at::zeros({R.B, R.H, rows, R.D}, q.options().dtype(at::kFloat));
  const Rows qs(q), ks(k), vs(v), qrs(table_view(qr)), krs(table_view(kr)), gs(dout), os(out);
  const at::Tensor lse_c = lse.contiguous();
  const float* lse_p = lse_c.data_ptr<float>();
  at::Tensor dlogits_c = dlogits.has_value() ? dlogits->to(at::kFloat).contiguous() : at::Tensor();
  const float* dlg_p = dlogits.has_value() ? dlogits_c.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "native_relpos_bwd", [&] {
    scalar_t *dq_p = dq.data_ptr<scalar_t>(), *dk_p = dk.data_ptr<scalar_t>(), *dv_p = dv.data_ptr<scalar_t>();
    at::parallel_for(0, R.B, 1, [&](int64_t begin, int64_t end) {
      const int64_t bn = std::min(kBlock, R.Nk), bm = std::min(kBlock, R.Nq), w = bm + bn - 1;
      std::vector<float> p(bm * bn), ds(bm * bn), qkr(bm * w), kqr(bn * w), da(bm * w), db(bn * w), delta(bm);
      std::vector<float> dq_acc(R.Nq * R.D), dk_acc(R.Nk * R.D), dv_acc(R.Nk * R.Dv);
      std::vector<float> qbuf, kbuf, vbuf, qrbuf, krbuf, gbuf, obuf;
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t h = 0; h < R.H; ++h) {
          const Block qb = qs.block(b, h, 0, R.Nq, qbuf), kb = ks.block(b, h, 0, R.Nk, kbuf),
                      vb = vs.block(b, h, 0, R.Nk, vbuf), gb = gs.block(b, h, 0, R.Nq, gbuf),
                      ob = os.block(b, h, 0, R.Nq, obuf);
          const Block qrb = qrs.block(0, h, 0, rows, qrbuf), krb = krs.block(0, h, 0, rows, krbuf);
          float* dqr = dqr_b.data_ptr<float>() + (b * R.H + h) * rows * R.D;
          float* dkr = dkr_b.data_ptr<float>() + (b * R.H + h) * rows * R.D;
          std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
          std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
          std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
          for (int64_t i0 = 0; i0 < R.Nq; i0 += bm) {
            const int64_t m = std::min(bm, R.Nq - i0);
            const Block qi{qb.p + i0 * qb.ld, qb.ld}, gi{gb.p + i0 * gb.ld, gb.ld};
            const float* row_lse = lse_p + (b * R.H + h) * R.Nq + i0;
            for (int64_t r = 0; r < m; ++r) delta[r] = dot(ob.p + (i0 + r) * ob.ld, gi.p + r * gi.ld, R.Dv);
            const int64_t kend = R.key_end(i0 + m - 1);
            for (int64_t j0 = 0; j0 < kend; j0 += bn) {
              const int64_t n = std::min(bn, kend - j0), wb = m + n - 1, base = R.band_base(i0, m, j0, n);
              block_logits(R, qi, kb, qrb, krb, i0, m, j0, n, p.data(), qkr.data(), kqr.data());
              for (int64_t r = 0; r < m; ++r) {
                float* row = p.data() + r * n;
                for (int64_t j = 0; j < n; ++j) row[j] = exp_approx(row[j] - row_lse[r]);  // -inf -> 0
              }
              // dV += P^T dO ; dP = dO V^T
              gemm(true, false, n, R.Dv, m, 1.0f, p.data(), n, gi.p, gi.ld, 1.0f, dv_acc.data() + j0 * R.Dv, R.Dv);
              gemm(false, true, m, n, R.Dv, 1.0f, gi.p, gi.ld, vb.p + j0 * vb.ld, vb.ld, 0.0f, ds.data(), n);
              // dS = P (dP - delta) + dlogits (the head-summed logits feed every head); hidden keys get 0
              std::fill(da.begin(), da.begin() + m * wb, 0.0f);
              std::fill(db.begin(), db.begin() + n * wb, 0.0f);
              for (int64_t r = 0; r < m; ++r) {
                float* g = ds.data() + r * n;
                const float* pr = p.data() + r * n;
                const float dr = delta[r];
                const int64_t visible = R.mask_upper ? std::min<int64_t>(i0 + r + 1 - j0, n) : n;
                const float* dl = dlg_p != nullptr ? dlg_p + (b * R.Nq + i0 + r) * R.Nk + j0 : nullptr;
                for (int64_t j = 0; j < n; ++j) {
                  float v_ = pr[j] * (g[j] - dr);
                  if (dl != nullptr) v_ += dl[j];
                  g[j] = j < visible ? v_ : 0.0f;
                }
                // the positional terms' gradients along the band: dA[r, c] = dB[j, c] = dS[r, j]
                float* a = da.data() + r * wb;
                for (int64_t j = 0; j < n; ++j) {
                  const int64_t c = R.band_col(r, j, m, n);
                  a[c] = g[j];
                  db[j * wb + c] = g[j];
                }
              }
              // content: dQ += dS K ; dK += dS^T Q.  positional: dQ += dA KR ; dKR += dA^T Q ; dK += dB QR ;
              // dQR += dB^T K
              gemm(false, false, m, R.D, n, 1.0f, ds.data(), n, kb.p + j0 * kb.ld, kb.ld, 1.0f,
                   dq_acc.data() + i0 * R.D, R.D);
              gemm(true, false, n, R.D, m, 1.0f, ds.data(), n, qi.p, qi.ld, 1.0f, dk_acc.data() + j0 * R.D, R.D);
              gemm(false, false, m, R.D, wb, 1.0f, da.data(), wb, krb.p + base * krb.ld, krb.ld, 1.0f,
                   dq_acc.data() + i0 * R.D, R.D);
              gemm(true, false, wb, R.D, m, 1.0f, da.data(), wb, qi.p, qi.ld, 1.0f, dkr + base * R.D, R.D);
              gemm(false, false, n, R.D, wb, 1.0f, db.data(), wb, qrb.p + base * qrb.ld, qrb.ld, 1.0f,
                   dk_acc.data() + j0 * R.D, R.D);
              gemm(true, false, wb, R.D, n, 1.0f, db.data(), wb, kb.p + j0 * kb.ld, kb.ld, 1.0f, dqr + base * R.D,
                   R.D);
            }
          }
          const int64_t off_q = (b * R.H + h) * R.Nq, off_k = (b * R.H + h) * R.Nk;
          for (int64_t i = 0; i < R.Nq * R.D; ++i) dq_p[off_q * R.D + i] = static_cast<scalar_t>(dq_acc[i]);
          for (int64_t i = 0; i < R.Nk * R.D; ++i) dk_p[off_k * R.D + i] = static_cast<scalar_t>(dk_acc[i]);
          for (int64_t i = 0; i < R.Nk * R.Dv; ++i) dv_p[off_k * R.Dv + i] = static_cast<scalar_t>(dv_acc[i]);
        }
      }
    });
  });
  return {dq, dk, dv, batch_sum_table(dqr_b, qr.scalar_type()), batch_sum_table(dkr_b, kr.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(tlv_fast, CPU, m) {
  m.impl("native_relpos_fwd", &relpos_fwd_cpu);
  m.impl("native_relpos_bwd", &relpos_bwd_cpu);
}

}  // namespace tlv_fast
