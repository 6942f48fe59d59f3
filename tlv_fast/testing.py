"""Testing hooks: see inside the kernels' randomness so tests can compare against the reference exactly."""
import contextlib

from .ops.attention import _kernels, _seed_recorders


@contextlib.contextmanager
def record_dropout_seeds():
    """Collect the seed tensors drawn by attention calls with dropout inside the block (Triton backend).

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


def dropout_keep_mask(seed, batch, heads, n_q, n_k, dropout_p):
    """Bool (batch, heads, n_q, n_k): True where the attention kernels keep a weight for this seed and p.

    Pass it as ``dropout_mask`` to ``tlv_fast.reference.attention`` to reproduce the kernel's dropout exactly.
    """
    return _kernels().dropout_keep_mask(seed, batch, heads, n_q, n_k, dropout_p)
