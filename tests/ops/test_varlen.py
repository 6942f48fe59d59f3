"""varlen_attention: packed sequences of different lengths, against one reference attention per sequence (values,
lse and gradients, FlashAttention's rule), with lengths 0 and 1, lengths that are not multiples of the tile, GQA,
causal (bottom-right per sequence), dropout reproduced from the kernel's keep mask; bad lengths are named."""
import pytest
import torch

import tlv_fast
from tlv_fast import reference, testing

from helpers import DEVICE, as_truth, assert_fa_rule, dtype_params


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _packed(lengths, H, D, dtype, requires_grad=True):
    return torch.randn(sum(lengths), H, D, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


def _check(q, k, v, lq, lk, causal=False, scale=None, dropout_p=0.0, lse_grad=True):
    """Kernel vs reference vs fp64 truth for out, lse and dq, dk, dv."""
    cu_q, cu_k = _cu(lq), _cu(lk)
    dtype = q.dtype
    torch.manual_seed(1)
    with testing.record_dropout_seeds() as seeds:
        out, lse = tlv_fast.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal, scale=scale,
                                             dropout_p=dropout_p, return_lse=True, backend="triton")
    keep = None
    if dropout_p > 0.0:
        full = testing.dropout_keep_mask(seeds[0], len(lq), q.shape[1], max(lq), max(lk), dropout_p)

        def keep(b):
            return full[b:b + 1, :, :lq[b], :lk[b]]
    ref_out, ref_lse = reference.varlen_attention(q, k, v, cu_q, cu_k, causal, scale, dropout_p, keep)
    tq, tk, tv = as_truth(q, k, v)
    truth_out, truth_lse = reference.varlen_attention(tq, tk, tv, cu_q, cu_k, causal, scale, dropout_p, keep)
    assert out.shape == ref_out.shape and out.dtype == dtype and lse.shape == (q.shape[1], q.shape[0])
    assert_fa_rule(out, ref_out, truth_out, dtype, "fwd", "out")
    finite = torch.isfinite(truth_lse)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(truth_lse)), "lse: rows without keys differ"
    assert_fa_rule(lse[finite], ref_lse[finite], truth_lse[finite], dtype, "fwd", "lse")

    g = torch.randn_like(out)
    gl = torch.randn_like(lse).masked_fill(~finite, 0.0)

    def loss(o, lse_):
        total = (o.double() * g.double()).sum()
        return total + (lse_.double() * gl.double()).sum() if lse_grad else total

    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v))
    truth_grads = torch.autograd.grad(loss(truth_out, truth_lse), (tq, tk, tv))
    for name, gr, rg, tg in zip(("dq", "dk", "dv"), grads, ref_grads, truth_grads):
        assert gr.shape == tg.shape and gr.dtype == dtype, name
        assert_fa_rule(gr, rg, tg, dtype, "bwd", name)
    return out, lse


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_self_attention_lengths(causal, dtype):
    lengths = [1, 17, 33, 5]  # 1, and lengths that are not multiples of the 16-row interpreter tile
    q, k, v = (_packed(lengths, 2, 32, dtype) for _ in range(3))
    _check(q, k, v, lengths, lengths, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cross_lengths_gqa_and_odd_head_dims(causal):
    lq, lk = [3, 20, 1, 9], [17, 5, 40, 9]  # n_q > n_k: causal rows with no key (bottom-right), output 0
    q = _packed(lq, 4, 40, torch.float32)
    k = _packed(lk, 2, 40, torch.float32)
    v = _packed(lk, 2, 24, torch.float32)
    out, lse = _check(q, k, v, lq, lk, causal=causal, scale=0.3)
    if causal:  # sequence 1: 20 queries, 5 keys -> the first 15 rows see nothing
        rows = slice(3, 3 + 15)
        assert torch.isneginf(lse[:, rows]).all() and (out[rows] == 0).all()


def test_empty_sequences_and_sequences_without_keys():
    lq, lk = [4, 0, 7, 3], [6, 0, 0, 18]
    q, k, v = _packed(lq, 2, 16, torch.float32), _packed(lk, 2, 16, torch.float32), _packed(lk, 2, 16, torch.float32)
    out, lse = _check(q, k, v, lq, lk)
    assert (out[4:11] == 0).all() and torch.isneginf(lse[:, 4:11]).all()


def test_dropout_matches_reference_with_the_kernels_keep_mask():
    lengths = [9, 20, 2]
    q, k, v = (_packed(lengths, 2, 16, torch.float32) for _ in range(3))
    _check(q, k, v, lengths, lengths, dropout_p=0.3, lse_grad=False)


def test_strided_inputs_read_in_place():
    lengths = [5, 12]
    qkv = torch.randn(sum(lengths), 3, 2, 16, device=DEVICE)  # a fused projection: (total, 3, H, D)
    q, k, v = (qkv[:, i].clone().requires_grad_() for i in range(3))
    dense = _check(q, k, v, lengths, lengths)[0]
    strided = tlv_fast.varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], _cu(lengths), _cu(lengths), 12, 12,
                                        backend="triton")
    assert not qkv[:, 0].is_contiguous()
    torch.testing.assert_close(strided, dense.detach(), rtol=0, atol=0)


def test_same_as_padded_attention_with_key_padding():
    lengths = [7, 16, 3]
    B, H, N, D = len(lengths), 2, max(lengths), 16
    x = torch.randn(B, N, H, D, device=DEVICE)
    keep = torch.arange(N, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    padded = tlv_fast.attention(x.transpose(1, 2), x.transpose(1, 2), x.transpose(1, 2),
                                attn_mask=keep[:, None, None, :], backend="triton").transpose(1, 2)
    packed = x[keep]
    out = tlv_fast.varlen_attention(packed, packed, packed, _cu(lengths), _cu(lengths), N, N, backend="triton")
    torch.testing.assert_close(out, padded[keep], rtol=1e-5, atol=1e-6)


def test_reference_backend_and_auto_on_cpu():
    lengths = [3, 8]
    q, k, v = (_packed(lengths, 2, 8, torch.float64) for _ in range(3))
    out = tlv_fast.varlen_attention(q, k, v, _cu(lengths), _cu(lengths), 8, 8, causal=True, backend="reference")
    want = reference.varlen_attention(q, k, v, _cu(lengths), _cu(lengths), True)[0]
    torch.testing.assert_close(out, want)
    if DEVICE == "cpu":
        torch.testing.assert_close(tlv_fast.varlen_attention(q, k, v, _cu(lengths), _cu(lengths), 8, 8, True), want)


def _bad_call(**over):
    lengths = [3, 5]
    args = dict(q=torch.randn(8, 2, 16, device=DEVICE), k=torch.randn(8, 2, 16, device=DEVICE),
                v=torch.randn(8, 2, 16, device=DEVICE), cu_seqlens_q=_cu(lengths), cu_seqlens_k=_cu(lengths),
                max_seqlen_q=5, max_seqlen_k=5)
    args.update(over)
    return lambda: tlv_fast.varlen_attention(**args, backend="triton")


@pytest.mark.parametrize("over,words", [
    (dict(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)), ["cu_seqlens_q", "start at 0"]),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 7], dtype=torch.int32)), ["cu_seqlens_k", "end"]),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 3, 8], dtype=torch.int32),
          cu_seqlens_k=torch.tensor([0, 3, 5, 8], dtype=torch.int32)), ["cu_seqlens_q", "nondecreasing"]),
    (dict(max_seqlen_q=4), ["max_seqlen_q", "longest"]),
    (dict(max_seqlen_k=-1), ["max_seqlen_k", ">= 0"]),
    (dict(cu_seqlens_q=torch.tensor([0.0, 3.0, 8.0])), ["cu_seqlens_q", "int32"]),
    (dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)), ["same batch"]),
    (dict(q=torch.randn(1, 8, 2, 16)), ["q", "(total, heads, head_dim)"]),
    (dict(k=torch.randn(8, 3, 16), v=torch.randn(8, 3, 16)), ["multiple"]),
    (dict(v=torch.randn(7, 2, 16)), ["k and v"]),
    (dict(dropout_p=1.0), ["dropout_p"]),
])
def test_bad_arguments_are_named(over, words):
    over = {key: (val.to(DEVICE) if isinstance(val, torch.Tensor) else val) for key, val in over.items()}
    with pytest.raises((ValueError, TypeError)) as e:
        _bad_call(**over)()
    for w in words:
        assert w in str(e.value), str(e.value)


def test_opcheck():
    lengths = [3, 18]
    q, k, v = (_packed(lengths, 2, 16, torch.float32) for _ in range(3))
    cu = _cu(lengths)
    with testing.poison_outputs(False):
        torch.library.opcheck(torch.ops.tlv_fast.varlen_attention_fwd.default,
                              (q, k, v, cu, cu, 18, 18, None, 0.25, True, 0.0, "ieee"))
