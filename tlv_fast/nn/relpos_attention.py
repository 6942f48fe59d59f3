import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..ops import relpos_attention


def sinusoidal_table(offsets, dim):
    """STTR's positional encoding (docs/sttr.md §2.1) of signed offsets (any float tensor, in pixels): rows of
    PE[2m] = sin(o / t_m), PE[2m + 1] = cos(o / t_m), t_m = 10000^(2m / dim). Returns (len(offsets), dim). Computed
    in float32 with the published code's operations (a division by t_m), so its rounding is the same."""
    t = 10000 ** (torch.arange(0, dim, 2, device=offsets.device, dtype=torch.float32) / dim)
    angles = offsets.float()[:, None] / t[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(len(offsets), dim)


class RelativeMultiheadAttention(nn.Module):
    """STTR's attention layer (MultiheadAttentionRelative): multi-head attention whose logits add content-dependent
    relative-position terms, logit = q_i.k_j + q_i.kr_ij + qr_ij.k_j (docs/sttr.md §2.2), on the fused kernel.

    Parameters are named and shaped as in the published checkpoint (and torch.nn.MultiheadAttention):
    in_proj_weight (3C, C) = [W_q; W_k; W_v], in_proj_bias (3C), out_proj.weight (C, C), out_proj.bias (C). The
    positional table is projected with the content path's own W_q, b_q (scaled by 1/sqrt(d)) and W_k, b_k.

    forward(query (R, Nq, C), key (R, Nk, C) = query, value = key, offset_sign=1, mask_upper=False,
    return_logits=False, pos_scale=1.0, need_output=True) -> out (R, Nq, C) [, head-summed logits (R, Nq, Nk)];
    with return_logits and need_output=False, only the logits. Sequences are
    batch-first. The offset of query i and key j is offset_sign * (i - j) tokens, times `pos_scale` pixels (STTR:
    W / W' with attention stride); offset_sign = +1 for self attention and the left-query cross attention, -1 for the
    right-query one (both measure x_L - x_R). The sinusoidal table and its projections are built once per call on the
    Nq + Nk - 1 offsets only.
    """

    def __init__(self, embed_dim=128, num_heads=8, backend="auto", device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even for the sinusoidal table, got {embed_dim}")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.backend = backends.validate(backend, ops=("relpos_attention",),
                                         where="RelativeMultiheadAttention: backend")
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **kw))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **kw))
        self.out_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def positional_tables(self, n_q, n_k, offset_sign=1, pos_scale=1.0, dtype=None):
        """QR, KR (Nq + Nk - 1, H, d) for the ascending offsets tlv_fast.relpos_attention expects."""
        C, H, d = self.embed_dim, self.num_heads, self.head_dim
        device = self.in_proj_weight.device
        lo = -(n_k - 1) if offset_sign == 1 else -(n_q - 1)
        offsets = torch.arange(lo, lo + n_q + n_k - 1, device=device, dtype=torch.float32) * pos_scale
        pe = sinusoidal_table(offsets, C).to(dtype or self.in_proj_weight.dtype)
        w_q, w_k, _ = self.in_proj_weight.chunk(3)
        b_q, b_k, _ = self.in_proj_bias.chunk(3)
        qr = F.linear(pe, w_q, b_q) * float(d) ** -0.5
        kr = F.linear(pe, w_k, b_k)
        return qr.view(-1, H, d), kr.view(-1, H, d)

    def forward(self, query, key=None, value=None, offset_sign=1, mask_upper=False, return_logits=False,
                pos_scale=1.0, need_output=True):
        key = query if key is None else key
        value = key if value is None else value
        if query.ndim != 3 or key.ndim != 3 or value.ndim != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query, key, value must be (R, N, {self.embed_dim}), got {tuple(query.shape)}, "
                             f"{tuple(key.shape)}, {tuple(value.shape)}")
        if not (need_output or return_logits):
            raise ValueError("RelativeMultiheadAttention: need_output=False needs return_logits=True")
        R, n_q, C = query.shape
        n_k = key.shape[1]
        H, d = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = (F.linear(query, w_q, b_q) * float(d) ** -0.5).view(R, n_q, H, d).transpose(1, 2)  # (R, H, Nq, d) view
        k = F.linear(key, w_k, b_k).view(R, n_k, H, d).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(R, n_k, H, d).transpose(1, 2)
        qr, kr = self.positional_tables(n_q, n_k, offset_sign, pos_scale, dtype=q.dtype)
        res = relpos_attention(q, k, v, qr, kr, offset_sign, mask_upper, return_logits, backend=self.backend)
        out, logits = res if return_logits else (res, None)
        if not need_output:  # logits only (STTR's last layer): skip the output projection
            return logits
        out = self.out_proj(out.transpose(1, 2).reshape(R, n_q, C))
        return (out, logits) if return_logits else out
