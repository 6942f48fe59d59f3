"""Dropout inside the kernel: exact agreement with the reference given the kernel's own mask (testing hook),
statistics of that mask, reproducibility under torch.manual_seed."""
import pytest
import torch

import tlv_fast
from tlv_fast.testing import dropout_keep_mask, record_dropout_seeds

from helpers import DEVICE, compare_with_reference, dtype_params, make_qkv


def _keep_mask_for(seed_value, q, k, p, **kw):
    torch.manual_seed(seed_value)
    with record_dropout_seeds() as seeds:
        tlv_fast.attention(q.detach(), k.detach(), k.detach(), dropout_p=p, backend="triton", **kw)
    assert len(seeds) == 1
    return dropout_keep_mask(seeds[0], q.shape[0], q.shape[1], q.shape[2], k.shape[2], p)


@pytest.mark.deep  # not in the quick run (README)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hkv", [2, 1], ids=["mha", "gqa"])
def test_dropout_matches_reference_with_the_kernels_mask(hkv, causal, dtype):
    p = 0.3
    q, k, v = make_qkv(2, 2, 29, 37, 32, Hkv=hkv, dtype=dtype)
    keep = _keep_mask_for(11, q, k, p)

    def run(q, k, v, mask):
        torch.manual_seed(11)  # same seed tensor as the recorded call
        return tlv_fast.attention(q, k, v, causal=causal, dropout_p=p, return_lse=True, backend="triton")

    compare_with_reference(q, k, v, causal="bottom_right" if causal else None, dropout_p=p, dropout_mask=keep,
                           run=run)


def test_dropout_with_float_mask_gradient():
    p = 0.2
    q, k, v = make_qkv(1, 2, 21, 21, 16)
    bias = torch.randn(1, 2, 21, 21, device=DEVICE).requires_grad_()
    keep = _keep_mask_for(5, q, k, p)

    def run(q, k, v, mask):
        torch.manual_seed(5)
        return tlv_fast.attention(q, k, v, attn_mask=mask, dropout_p=p, return_lse=True, backend="triton")

    compare_with_reference(q, k, v, attn_mask=bias, dropout_p=p, dropout_mask=keep, run=run)


def test_keep_mask_statistics():
    p, B, H, N = 0.3, 2, 3, 64
    seed = torch.tensor([1234], device=DEVICE, dtype=torch.int64)
    keep = dropout_keep_mask(seed, B, H, N, N, p).float()
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    # neighbours are independent: P(keep and keep right neighbour) = (1 - p)^2
    pair = (keep[..., :-1] * keep[..., 1:]).mean().item()
    assert abs(pair - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5 * 2
    # every (batch, head) gets its own stream
    flat = keep.reshape(B * H, -1)
    for i in range(B * H):
        for j in range(i + 1, B * H):
            assert not torch.equal(flat[i], flat[j])
    other = dropout_keep_mask(seed + 1, B, H, N, N, p).float()
    assert (other != keep).float().mean() > 0.3


def test_dropout_is_reproducible_under_manual_seed_and_varies_otherwise():
    q, k, v = make_qkv(1, 2, 16, 16, 16, requires_grad=False)
    torch.manual_seed(3)
    a = tlv_fast.attention(q, k, v, dropout_p=0.5, backend="triton")
    torch.manual_seed(3)
    b = tlv_fast.attention(q, k, v, dropout_p=0.5, backend="triton")
    c = tlv_fast.attention(q, k, v, dropout_p=0.5, backend="triton")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dropout_keeps_the_expectation():
    # E[dropout(P)] V = P V: averaged over many seeds the output approaches the dropout-free one
    q, k, v = make_qkv(1, 1, 4, 16, 16, requires_grad=False)
    ref = tlv_fast.attention(q, k, v, backend="triton")
    mean = torch.stack([tlv_fast.attention(q, k, v, dropout_p=0.25, backend="triton") for _ in range(200)]).mean(0)
    assert (mean - ref).abs().max() < 0.15
    assert not torch.equal(tlv_fast.attention(q, k, v, dropout_p=0.25, backend="triton"), ref)
