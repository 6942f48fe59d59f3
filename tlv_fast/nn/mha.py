import torch
import torch.nn.functional as F
from torch import nn

from .. import backends, reference
from ..ops import scaled_dot_product_attention


def _keep_or_bias(mask, name, dtype):
    """nn.MultiheadAttention's mask conventions (bool True = do NOT attend; float = added) -> SDPA's (bool True =
    attend; float = added)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise ValueError(f"{name} must be bool or floating, got {mask.dtype}")
    return mask.to(dtype)


def _merge(a, b, dtype):
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    to_bias = lambda m: torch.zeros((), dtype=dtype, device=m.device).masked_fill(~m, float("-inf")) \
        if m.dtype == torch.bool else m  # noqa: E731
    return to_bias(a) + to_bias(b)


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` on tlv_fast's fused attention.

    Same constructor (plus ``backend``), same parameters and state_dict keys (it is a subclass), same forward:
    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights or None)`` with torch's conventions
    (sequence-first unless ``batch_first``; unbatched (L, E) inputs; masks where bool True means "do not attend" and
    floats are added; ``attn_mask`` (L, S) or (N * num_heads, L, S); ``is_causal`` a hint that ``attn_mask`` is the
    causal mask). Without masks or with key-padding masks the kernel reads them in place ((N, 1, 1, S): no L x S
    memory); an ``attn_mask`` and a key-padding mask together are merged as torch does.

    ``need_weights=True`` (torch's default) has to return the L x S attention weights, so it is served by the eager
    reference path (as torch's own module falls back to its math path); pass ``need_weights=False`` for the kernel.
    One difference: a query whose keys are all masked gives 0 here, NaN in torch.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, backend="auto"):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first, device=device,
                         dtype=dtype)
        self.backend = backends.validate(backend, ops=("attention",), where="MultiheadAttention: backend")

    @classmethod
    def from_torch(cls, module, backend="auto"):
        """A tlv_fast copy of a torch.nn.MultiheadAttention (same weights, device and dtype)."""
        p = next(module.parameters())
        new = cls(module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
                  add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
                  vdim=module.vdim, batch_first=module.batch_first, device=p.device, dtype=p.dtype, backend=backend)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        L, N, E = query.shape
        S = key.shape[0]
        H, d = self.num_heads, self.head_dim
        if E != self.embed_dim:
            raise ValueError(f"query's embedding dim must be {self.embed_dim}, got {E}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key's sequence and batch dims {tuple(key.shape[:2])} must match value's "
                             f"{tuple(value.shape[:2])}")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch.nn.MultiheadAttention)")
        use_causal = is_causal and key_padding_mask is None and not need_weights

        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)  # (L|S, N, E)

        kpm = key_padding_mask
        am = None if use_causal else attn_mask
        if am is not None and am.dim() == 2 and am.shape != (L, S):
            raise ValueError(f"attn_mask must be (L, S) = {(L, S)} or (N * num_heads, L, S), got {tuple(am.shape)}")
        if am is not None and am.dim() == 3 and am.shape != (N * H, L, S):
            raise ValueError(f"attn_mask must be (N * num_heads, L, S) = {(N * H, L, S)}, got {tuple(am.shape)}")
        if kpm is not None and kpm.shape != (N, S):
            raise ValueError(f"key_padding_mask must be (N, S) = {(N, S)}, got {tuple(kpm.shape)}")
        if self.bias_k is not None:  # one more key/value position holding the learned biases
            k = torch.cat([k, self.bias_k.expand(1, N, E)])
            v = torch.cat([v, self.bias_v.expand(1, N, E)])
            am = F.pad(am, (0, 1)) if am is not None else None
            kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
        q = q.view(L, N, H, d).permute(1, 2, 0, 3)  # (N, H, L, d), a view
        k = k.view(-1, N, H, d).permute(1, 2, 0, 3)
        v = v.view(-1, N, H, d).permute(1, 2, 0, 3)
        if self.add_zero_attn:  # and one more holding zeros
            k = torch.cat([k, k.new_zeros(N, H, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, d)], dim=2)
            am = F.pad(am, (0, 1)) if am is not None else None
            kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
        s_all = k.shape[2]
        kpm = _keep_or_bias(kpm, "key_padding_mask", q.dtype)
        am = _keep_or_bias(am, "attn_mask", q.dtype)
        mask = _merge(am.view(N, H, L, s_all) if am is not None and am.dim() == 3 else am,
                      kpm.view(N, 1, 1, s_all) if kpm is not None else None, q.dtype)
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            out, weights = reference.attention(q, k, v, mask, dropout_p, "top_left" if use_causal else None,
                                               return_weights=True)
            weights = weights.mean(dim=1) if average_attn_weights else weights
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=use_causal,
                                               backend=self.backend)
            weights = None
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(L, N, E))  # (L, N, E)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights
