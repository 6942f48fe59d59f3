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
        batched = _check_shapes(self, query, key, value, key_padding_mask, attn_mask)
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        L, N, E = query.shape
        S = key.shape[0]
        H, d = self.num_heads, self.head_dim
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch.nn.MultiheadAttention)")
        if N == 0:  # an empty batch: empty outputs, as torch returns
            return self._empty(query, L, S, batched, need_weights, average_attn_weights)
        use_causal = is_causal and key_padding_mask is None and not need_weights

        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)  # (L|S, N, E)

        kpm = key_padding_mask
        am = None if use_causal else attn_mask
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

    def _empty(self, query, L, S, batched, need_weights, average_attn_weights):
        out = query.new_zeros((L, 0, self.embed_dim))
        out = out.transpose(0, 1) if self.batch_first else out
        if not need_weights:
            return out, None
        heads = () if average_attn_weights else (self.num_heads,)
        return out, query.new_zeros((0, *heads, L, S))


def _check_shapes(mha, query, key, value, key_padding_mask, attn_mask):
    """torch.nn.MultiheadAttention's shape rules, with errors that name the argument; returns whether batched."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"MultiheadAttention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() not in (2, 3):
        raise ValueError(f"MultiheadAttention: query must be unbatched (L, E) or batched 3-D, got {query.dim()}-D")
    batched = query.dim() == 3
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"MultiheadAttention: key and value must be {query.dim()}-D like query, got {key.dim()}-D "
                         f"and {value.dim()}-D")
    seq_axis = 1 if (batched and mha.batch_first) else 0
    batch = (lambda t: t.shape[1 - seq_axis]) if batched else (lambda t: 1)  # noqa: E731
    L, S, N = query.shape[seq_axis], key.shape[seq_axis], batch(query)
    if query.shape[-1] != mha.embed_dim:
        raise ValueError(f"MultiheadAttention: query's embedding dim must be {mha.embed_dim}, got {query.shape[-1]}")
    if key.shape[-1] != mha.kdim or value.shape[-1] != mha.vdim:
        raise ValueError(f"MultiheadAttention: key and value embedding dims must be kdim = {mha.kdim} and vdim = "
                         f"{mha.vdim}, got {key.shape[-1]} and {value.shape[-1]}")
    if batch(key) != N or batch(value) != N:
        raise ValueError(f"MultiheadAttention: query, key and value must have the same batch size, got {N}, "
                         f"{batch(key)} and {batch(value)}")
    if value.shape[seq_axis] != S:
        raise ValueError(f"MultiheadAttention: key and value must have the same length, got {S} and "
                         f"{value.shape[seq_axis]}")
    for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if m is not None and (not isinstance(m, torch.Tensor) or not (m.dtype == torch.bool or m.is_floating_point())):
            raise ValueError(f"MultiheadAttention: {name} must be a bool or floating tensor, got "
                             f"{getattr(m, 'dtype', type(m).__name__)}")
    if key_padding_mask is not None:
        want = (N, S) if batched else (S,)
        if tuple(key_padding_mask.shape) != want:
            raise ValueError(f"MultiheadAttention: key_padding_mask must be {want}, got "
                             f"{tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        wants = [(L, S), (N * mha.num_heads, L, S)]
        if tuple(attn_mask.shape) not in wants:
            raise ValueError(f"MultiheadAttention: attn_mask must be (L, S) = {wants[0]} or (N * num_heads, L, S) "
                             f"= {wants[1]}, got {tuple(attn_mask.shape)}")
    return batched
