"""The one transformer block shared by BERT (post-norm), GPT and ViT (pre-norm), and its parts."""
import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..ops import attention


def gelu(x, approximate="none"):
    """GELU: "none" (erf; BERT, ViT) or "tanh" (GPT-2's gelu_new)."""
    return F.gelu(x, approximate=approximate)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one packed qkv projection, on tlv_fast.attention.

    forward(x (B, N, C), key_padding_mask=None (B, N) bool, True = a real token, cache=None) -> (B, N, C).
    `causal` masks future keys (bottom-right aligned, so a decode step with a KV cache of T keys and N new queries
    sees its past). With a `cache` (a dict this module fills: "k", "v" of shape (B, H, T, d)) the new keys and values
    are appended and attention runs over all of them. `backend`: see tlv_fast.backends (checked here).
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

    def forward(self, x, key_padding_mask=None, cache=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, d) views
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, d), read in place
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        mask = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
        y = attention(q, k, v, causal=self.causal, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                      backend=self.backend)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


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
