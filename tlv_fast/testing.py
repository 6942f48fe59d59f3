"""Testing hooks: see inside the kernels' randomness, and poison kernel outputs, so tests can catch what a kernel
leaves unwritten or draws differently from the reference. The ops call the two small hooks below; this module imports
nothing of tlv_fast at import time."""
import contextlib

import torch

from ._env import env

_seed_recorders = []  # lists that record_dropout_seeds() hands out; the attention op appends each seed it draws
_poison = []          # stack of poison_outputs() settings; empty: the environment variable TLV_FAST_POISON decides


def poison_enabled():
    """True when kernel outputs are to be filled with NaN before the kernel writes them (read at each call)."""
    return _poison[-1] if _poison else env("TLV_FAST_POISON", "0") == "1"


def poison(t, enabled=None):
    """Fill `t` with NaN when poisoning is on (an output element a kernel forgets then fails a test); return t.
    enabled: the caller's poison_enabled() when it allocates several outputs (one environment read)."""
    if enabled is None:
        enabled = poison_enabled()
    return t.fill_(float("nan")) if enabled and t.is_floating_point() else t


@contextlib.contextmanager
def poison_outputs(enabled=True):
    """Within the block, kernel outputs start as NaN (enabled=True) or uninitialised (False), whatever
    TLV_FAST_POISON says."""
    _poison.append(bool(enabled))
    try:
        yield
    finally:
        _poison.pop()


def record_seed(seed):
    """Called by the ops with every dropout seed tensor they draw."""
    for rec in _seed_recorders:
        rec.append(seed)


@contextlib.contextmanager
def record_dropout_seeds():
    """Collect the seed tensors drawn by attention calls with dropout inside the block (Triton and native).

    >>> with record_dropout_seeds() as seeds:
    ...     out = tlv_fast.attention(q, k, v, dropout_p=0.1, backend="triton")
    >>> keep = dropout_keep_mask(seeds[0], q.shape[0], q.shape[1], q.shape[2], k.shape[2], 0.1)
    """
    seeds = []
    _seed_recorders.append(seeds)
    try:
        yield seeds
    finally:
        _seed_recorders.remove(seeds)


def dropout_keep_mask(seed, batch, heads, n_q, n_k, dropout_p, backend="triton"):
    """Bool (batch, heads, n_q, n_k): True where the attention kernels keep a weight for this seed and p.

    backend: "triton" (the Triton kernels' Philox stream) or "native" (the C++ CPU kernel's counter hash).
    Pass it as ``dropout_mask`` to ``tlv_fast.reference.attention`` to reproduce the kernel's dropout exactly.
    """
    if backend == "native":
        return _native_keep_mask(int(seed.reshape(-1)[0]), batch, heads, n_q, n_k, dropout_p)
    from .kernels import attention as kernels
    return kernels.dropout_keep_mask(seed, batch, heads, n_q, n_k, dropout_p)


def _native_keep_mask(seed, batch, heads, n_q, n_k, dropout_p):
    # csrc/vec_math.h uniform_hash: SplitMix64's finaliser over seed + index * golden, top 24 bits -> [0, 1); kept
    # when >= p. Computed here in wrapping int64 arithmetic (a logical shift is an arithmetic one, masked).
    def signed(c):
        return c - (1 << 64) if c >= 1 << 63 else c

    def lsr(z, s):
        return (z >> s) & ((1 << (64 - s)) - 1)

    idx = torch.arange(batch * heads * n_q * n_k, dtype=torch.int64)
    z = signed(seed % (1 << 64)) + idx * signed(0x9E3779B97F4A7C15)
    z = (z ^ lsr(z, 30)) * signed(0xBF58476D1CE4E5B9)
    z = (z ^ lsr(z, 27)) * signed(0x94D049BB133111EB)
    z = z ^ lsr(z, 31)
    u = lsr(z, 40).to(torch.float32) * (1.0 / 16777216.0)
    return (u >= dropout_p).reshape(batch, heads, n_q, n_k)
