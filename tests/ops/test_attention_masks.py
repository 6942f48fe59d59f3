"""attn_mask in the kernel: bool and additive float, every broadcast shape, read through strides; gradient of a
float mask; rows with every key masked."""
import pytest
import torch

import tlv_fast
from tlv_fast.kernels.common import force_blocks

from helpers import DEVICE, assert_close, compare_with_reference, dtype_params, make_qkv

B, H, NQ, NK = 2, 3, 27, 38

MASK_SHAPES = [  # broadcastable to (B, H, Nq, Nk)
    (B, H, NQ, NK),
    (B, 1, 1, NK),   # key padding: one row per sequence, no Nq x Nk memory
    (1, H, NQ, NK),  # per-head bias shared over the batch (relative position bias)
    (NQ, NK),        # 2-D, as torch accepts
    (B, 1, NQ, 1),   # query-side mask
    (1, 1, 1, 1),
]


def _run(causal, mask_requires_grad=False):
    def run(q, k, v, mask):
        return tlv_fast.attention(q, k, v, causal=causal, attn_mask=mask, return_lse=True, backend="triton")
    return run


def _bool_mask(shape):
    m = torch.rand(shape, device=DEVICE) > 0.3
    return m


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_broadcast_shapes(shape, kind):
    q, k, v = make_qkv(B, H, NQ, NK, 32)
    if kind == "bool":
        mask = _bool_mask(shape)
    else:
        mask = torch.randn(shape, device=DEVICE).masked_fill(torch.rand(shape, device=DEVICE) < 0.2, float("-inf"))
    compare_with_reference(q, k, v, attn_mask=mask, run=_run(False))


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_padding_mask_with_causal(causal, dtype):
    q, k, v = make_qkv(B, H, NQ, NK, 40, dtype=dtype)
    lengths = torch.tensor([NK, 11], device=DEVICE)
    mask = (torch.arange(NK, device=DEVICE)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, Nk)
    compare_with_reference(q, k, v, attn_mask=mask, causal="bottom_right" if causal else None, run=_run(causal))


def test_mask_read_in_place_from_strided_view():
    q, k, v = make_qkv(1, 2, 20, 24, 16)
    big = torch.randn(1, 2, 24, 48, device=DEVICE)
    mask = big[:, :, 2:22, ::2]  # strides (.., 48, 2): not contiguous
    assert not mask.is_contiguous()
    compare_with_reference(q, k, v, attn_mask=mask, run=_run(False))


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape", [(B, H, NQ, NK), (1, H, NQ, NK), (NQ, NK), (B, 1, 1, NK)],
                         ids=lambda s: "x".join(map(str, s)))
def test_float_mask_gradient(shape, dtype):
    q, k, v = make_qkv(B, H, NQ, NK, 16, dtype=dtype)
    bias = (0.5 * torch.randn(shape, device=DEVICE, dtype=dtype)).requires_grad_()
    compare_with_reference(q, k, v, attn_mask=bias, causal="bottom_right", run=_run(True))


def test_float_mask_gradient_is_deterministic_and_in_mask_dtype():
    q, k, v = make_qkv(2, 2, 33, 33, 16, requires_grad=False)
    bias = torch.randn(1, 2, 33, 33, device=DEVICE).requires_grad_()
    grads = []
    for _ in range(2):
        out = tlv_fast.attention(q, k, v, attn_mask=bias, backend="triton")
        (g,) = torch.autograd.grad((out * out).sum(), bias)
        grads.append(g)
    assert grads[0].dtype == bias.dtype and grads[0].shape == bias.shape
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("kind", ["bool", "float-inf"])
def test_fully_masked_rows_give_zero_and_zero_grad(kind, dtype):
    q, k, v = make_qkv(B, H, NQ, NK, 32, dtype=dtype)
    keep = torch.rand(B, 1, NQ, NK, device=DEVICE) > 0.4
    keep[:, :, 3] = False  # row 3 of every sequence sees nothing
    keep[1, :, 10:14] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, float("-inf"))
    out, lse = compare_with_reference(q, k, v, attn_mask=mask, run=_run(False))
    assert torch.all(out[:, :, 3] == 0) and torch.all(torch.isneginf(lse[:, :, 3]))
    tlv_fast.attention(q, k, v, attn_mask=mask, backend="triton").sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, 3] == 0)


def test_fully_masked_rows_with_huge_negative_float_mask():
    # additive -1e4 padding (older Hugging Face style) on every key of a row: no inf/NaN from the padded tile
    q, k, v = make_qkv(1, 1, 9, 21, 16)
    mask = torch.zeros(1, 1, 9, 21, device=DEVICE)
    mask[..., 4, :] = -1e4
    compare_with_reference(q, k, v, attn_mask=mask, run=_run(False))


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)], ids=lambda b: f"BM{b[0]}-BN{b[1]}")
def test_masks_with_unequal_tiles(blocks):
    q, k, v = make_qkv(B, H, NQ, NK, 16)
    bias = torch.randn(1, H, NQ, NK, device=DEVICE).requires_grad_()
    pad = _bool_mask((B, 1, 1, NK))
    with force_blocks(*blocks):
        compare_with_reference(q, k, v, attn_mask=bias, causal="bottom_right", run=_run(True))
        compare_with_reference(q, k, v, attn_mask=pad, run=_run(False))


def test_sdpa_matches_torch_with_masks():
    q, k, v = make_qkv(B, H, NQ, NK, 32, requires_grad=False)
    for mask in (_bool_mask((B, 1, 1, NK)), torch.randn(B, H, NQ, NK, device=DEVICE), _bool_mask((NQ, NK)) | True):
        ours = tlv_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="triton")
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert_close(ours, theirs, name="vs torch")
