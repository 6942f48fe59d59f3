"""The one transformer block shared by BERT (post-norm), GPT and ViT (pre-norm), and its parts."""
import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..ops import attention, varlen_attention


def gelu(x, approximate="none"):
    """GELU: "none" (erf; BERT, ViT) or "tanh" (GPT-2's gelu_new)."""
    return F.gelu(x, approximate=approximate)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one packed qkv projection, on tlv_fast.attention.

    forward(x (B, N, C), key_padding_mask=None (B, N) bool, True = a real token, cache=None) -> (B, N, C), or
    forward(x (total, C), cu_seqlens=..., max_seqlen=...) -> (total, C) for a packed batch of sequences (tokens of
    sequence b in rows cu_seqlens[b]:cu_seqlens[b+1], see tlv_fast.varlen_attention; no padding is computed).
    `causal` masks future keys (bottom-right aligned, so a decode step with a KV cache of T keys and N new queries
    sees its past). With a `cache` (a dict this module fills: "k", "v" of shape (B, H, T, d)) the new keys and values
    are appended and attention runs over all of them; see :func:`append_kv` for how the cache grows in place.
    `backend`: see tlv_fast.backends (checked here).
    """

    def __init__(self, dim, num_heads, causal=False, dropout=0.0, bias=True, backend="auto", device=None,
                 dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim, self.causal, self.dropout = num_heads, dim // num_heads, causal, dropout
        self.backend = backends.validate(backend, ops=("attention",), where="SelfAttention: backend")
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x, key_padding_mask=None, cache=None, cu_seqlens=None, max_seqlen=None):
        if cu_seqlens is not None:
            return self._packed(x, cu_seqlens, max_seqlen)
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, d) views
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, d), read in place
        if cache is not None:
            k, v = append_kv(cache, k, v)
        mask = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
        y = attention(q, k, v, causal=self.causal, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                      backend=self.backend)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))

    def _packed(self, x, cu_seqlens, max_seqlen):
        total, C = x.shape
        q, k, v = self.qkv(x).view(total, 3, self.num_heads, self.head_dim).unbind(1)  # (total, H, d) views
        name = backends.pick(self.backend, "attention")
        y = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=self.causal,
                             dropout_p=self.dropout if self.training else 0.0,
                             backend=name if name in ("auto", "triton", "reference") else "auto",
                             validate_lengths=False)  # the caller built them from a mask
        return self.proj(y.reshape(total, C))


def append_kv(cache, k, v):
    """Append k, v (B, H, n, d) to a KV cache dict and return all keys and values so far (B, H, T + n, d).

    Without autograd the cache owns buffers (B, H, capacity, d) that new rows are written into in place, so a decode
    step copies only its own rows, not the whole cache (``cache["capacity"]``, if the caller sets it, sizes the
    buffers once; otherwise they double when full). cache["k"] / cache["v"] are the filled views. When k or v
    require grad the cache concatenates instead (new tensors each step), so autograd sees ordinary ops.
    """
    if "k" not in cache:
        old = None
    else:
        old = cache["k"], cache["v"]
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or cache.get("grad")):
        cache["grad"] = True  # stays on the concatenating path: earlier rows may carry gradients
        if old is not None:
            k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
        cache["k"], cache["v"] = k, v
        return k, v
    B, H, n, _ = k.shape
    used = 0 if old is None else old[0].shape[2]
    buf = cache.get("buffers")
    if buf is None or used + n > buf[0].shape[2] or buf[0].shape[:2] != (B, H) or buf[0].dtype != k.dtype:
        capacity = max(int(cache.get("capacity", 0)), 2 * (used + n), 16)
        buf = tuple(t.new_empty((B, H, capacity, t.shape[3])) for t in (k, v))
        if old is not None:
            buf[0][:, :, :used].copy_(old[0])
            buf[1][:, :, :used].copy_(old[1])
        cache["buffers"] = buf
    buf[0][:, :, used:used + n].copy_(k)
    buf[1][:, :, used:used + n].copy_(v)
    cache["k"], cache["v"] = buf[0][:, :, :used + n], buf[1][:, :, :used + n]
    return cache["k"], cache["v"]


class MLP(nn.Module):
    """fc2(gelu(fc1(x))), hidden width `hidden`."""

    def __init__(self, dim, hidden, approximate="none", bias=True, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, dim, bias=bias, device=device, dtype=dtype)
        self.approximate = approximate

    def forward(self, x):
        return self.fc2(gelu(self.fc1(x), self.approximate))


class Block(nn.Module):
    """x + mixer(norm1(x)), then x + mlp(norm2(x)) when norm_first (GPT, ViT); norm1(x + mixer(x)), then
    norm2(x + mlp(x)) otherwise (BERT). Dropout on each branch output.

    The parts are built from factories called with `dim`, as in flash-attention's Block: mixer_cls(dim),
    mlp_cls(dim), norm_cls(dim) (e.g. ``functools.partial(SelfAttention, num_heads=12)``), so a fused norm or
    another mixer drops in without editing this class. The submodules are named mixer, mlp, norm1, norm2.
    """

    def __init__(self, dim, mixer_cls, mlp_cls, norm_cls=nn.LayerNorm, norm_first=True, dropout=0.0):
        super().__init__()
        self.mixer, self.mlp, self.norm_first = mixer_cls(dim), mlp_cls(dim), norm_first
        self.norm1 = norm_cls(dim)
        self.norm2 = norm_cls(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, **mixer_kwargs):
        if self.norm_first:
            x = x + self.drop(self.mixer(self.norm1(x), **mixer_kwargs))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.mixer(x, **mixer_kwargs)))
        return self.norm2(x + self.drop(self.mlp(x)))


def init_weights(module, std=0.02):
    """GPT-2 / BERT / ViT style initialisation: normal(0, std) weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


__all__ = ["Block", "MLP", "SelfAttention", "gelu", "init_weights"]
