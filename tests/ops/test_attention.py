"""Triton attention vs the reference: forward, lse and every gradient, over dtypes, shapes, causal alignments,
GQA, layouts and tilings (small shapes: these run through Triton's interpreter on a CPU)."""
import pytest
import torch

import tlv_fast
from tlv_fast.kernels.common import force_blocks
from tlv_fast.testing import dropout_keep_mask, record_dropout_seeds

from helpers import DEVICE, assert_close, compare_with_reference, dtype_params, make_qkv


def run_attention(causal=False, **kw):
    def run(q, k, v, mask):
        return tlv_fast.attention(q, k, v, causal=causal, attn_mask=mask, return_lse=True, backend="triton", **kw)
    return run


def run_sdpa(is_causal=False, **kw):
    def run(q, k, v, mask):
        out = tlv_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, backend="triton",
                                                    **kw)
        return out, None  # torch's signature has no lse
    return run


SHAPES = [  # (B, H, Nq, Nk, D)
    (2, 3, 37, 53, 40),   # cross attention, odd lengths, non-power-of-two head dim
    (1, 2, 1, 67, 64),    # one query: a decode step
    (2, 2, 64, 64, 16),   # even tiles, STTR's head dim
    (1, 2, 97, 33, 80),   # Nq > Nk
    (1, 1, 19, 19, 96),
    (1, 1, 8, 24, 128),
    (1, 1, 5, 9, 256),
    (1, 1, 1, 1, 8),      # N = 1 both sides, head dim below 16
]


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_matches_reference(shape, causal, dtype):
    B, H, Nq, Nk, D = shape
    q, k, v = make_qkv(B, H, Nq, Nk, D, dtype=dtype)
    compare_with_reference(q, k, v, causal="bottom_right" if causal else None, run=run_attention(causal))


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_causal_is_top_left(causal, dtype):
    q, k, v = make_qkv(2, 2, 29, 45, 32, dtype=dtype)
    compare_with_reference(q, k, v, causal="top_left" if causal else None, run=run_sdpa(causal))


def test_causal_alignments_agree_when_square_and_differ_otherwise():
    q, k, v = make_qkv(1, 2, 24, 24, 16, requires_grad=False)
    a = tlv_fast.attention(q, k, v, causal=True, backend="triton")
    b = tlv_fast.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
    assert torch.equal(a, b)
    q2 = q[:, :, :10]
    a = tlv_fast.attention(q2, k, v, causal=True, backend="triton")
    b = tlv_fast.scaled_dot_product_attention(q2, k, v, is_causal=True, backend="triton")
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("hkv", [1, 2])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_without_repeating_kv(hkv, causal, dtype):
    q, k, v = make_qkv(2, 4, 33, 41, 32, Hkv=hkv, dtype=dtype)
    compare_with_reference(q, k, v, causal="bottom_right" if causal else None, run=run_attention(causal))


def test_sdpa_enable_gqa():
    q, k, v = make_qkv(1, 6, 17, 17, 16, Hkv=2)
    compare_with_reference(q, k, v, run=run_sdpa(enable_gqa=True))
    with pytest.raises(ValueError, match="enable_gqa"):
        tlv_fast.scaled_dot_product_attention(q, k, v, backend="triton")


@pytest.mark.parametrize("dtype", dtype_params())
def test_value_head_dim_differs(dtype):
    q, k, v = make_qkv(1, 2, 21, 30, 48, Dv=24, dtype=dtype)
    compare_with_reference(q, k, v, causal="bottom_right", run=run_attention(True))


@pytest.mark.parametrize("dtype", dtype_params())
def test_non_contiguous_bshd_views_read_in_place(dtype):
    q, k, v = make_qkv(2, 3, 26, 26, 40, layout="bshd", dtype=dtype)
    assert not q.is_contiguous()
    out, _ = compare_with_reference(q, k, v, causal="top_left", run=run_attention(True))
    # output keeps the BSHD memory order, so .transpose(1, 2).reshape(B, N, H * D) is free
    assert out.transpose(1, 2).is_contiguous()


def test_strided_slices_of_a_packed_projection():
    B, N, H, D = 2, 19, 2, 24
    qkv = torch.randn(B, N, 3, H, D + 8, device=DEVICE)[..., :D]  # every stride irregular, head dim sliced
    q, k, v = (qkv[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    compare_with_reference(q, k, v, run=run_attention())


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32), (64, 16)], ids=lambda b: f"BM{b[0]}-BN{b[1]}")
# bottom-right offsets Nk - Nq = 33 and 65 are 1 mod 16, 32 and 64 (a query block ends one row before a key block's
# first visible row); -2 is BLOCK_N - 2 mod every tile (one row short of seeing a whole key block): the edges of the
# causal range split
@pytest.mark.deep  # not in the quick run (README)
@pytest.mark.parametrize("nq,nk", [(45, 70), (70, 45), (64, 64), (66, 64), (30, 63), (40, 73), (70, 135)])
def test_tilings_with_unequal_blocks(blocks, nq, nk):
    # the GPU autotuner picks BLOCK_M != BLOCK_N; the causal range split must hold for any pair
    q, k, v = make_qkv(1, 2, nq, nk, 16)
    with force_blocks(*blocks):
        compare_with_reference(q, k, v, causal="bottom_right", run=run_attention(True))
        compare_with_reference(q, k, v, causal="top_left", run=run_sdpa(True))


@pytest.mark.parametrize("dtype", dtype_params())
def test_lse_gradient_is_honoured(dtype):
    q, k, v = make_qkv(1, 2, 23, 31, 32, dtype=dtype)
    compare_with_reference(q, k, v, causal="bottom_right", run=run_attention(True), lse_grad=True)


def test_bottom_right_rows_without_keys_are_zero():
    q, k, v = make_qkv(1, 1, 12, 5, 16)  # Nq > Nk: rows 0..6 see no key under bottom-right alignment
    out, lse = compare_with_reference(q, k, v, causal="bottom_right", run=run_attention(True))
    assert torch.all(out[:, :, :7] == 0) and torch.all(torch.isneginf(lse[:, :, :7]))


def test_scale_argument():
    q, k, v = make_qkv(1, 2, 20, 20, 32)
    compare_with_reference(q, k, v, scale=0.3, run=run_attention(scale=0.3))


def test_fp32_tf32_option_runs_close():
    q, k, v = make_qkv(1, 2, 20, 20, 32, requires_grad=False)
    a = tlv_fast.attention(q, k, v, backend="triton", fp32_precision="tf32")
    b = tlv_fast.attention(q, k, v, backend="triton")
    assert_close(a, b, dtype=torch.float16, name="tf32 dots (fp16-like mantissa)")


def test_three_and_five_dim_inputs():
    q, k, v = make_qkv(1, 3, 14, 18, 16, requires_grad=False)
    out3 = tlv_fast.scaled_dot_product_attention(q[0], k[0], v[0], backend="triton")
    assert_close(out3, tlv_fast.attention(q, k, v, backend="reference")[0], name="3-D")
    q5, k5, v5 = (t.reshape(1, 1, 3, *t.shape[2:]) for t in (q, k, v))
    mask = torch.rand(1, 1, 3, 14, 18, device=DEVICE) > 0.3
    out5 = tlv_fast.scaled_dot_product_attention(q5, k5, v5, attn_mask=mask, backend="triton")
    ref5 = tlv_fast.scaled_dot_product_attention(q5, k5, v5, attn_mask=mask, backend="reference")
    assert_close(out5, ref5, name="5-D")


def test_empty_inputs():
    q, k, v = make_qkv(2, 2, 0, 5, 16)
    assert tlv_fast.attention(q, k, v, backend="triton").shape == (2, 2, 0, 16)
    q, k, v = make_qkv(2, 2, 3, 0, 16)
    out, lse = tlv_fast.attention(q, k, v, backend="triton", return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out.sum().backward()
    assert torch.all(q.grad == 0)


# ---- on a GPU at real sizes (`pytest -m gpu`): one pinned tile (conftest) except the autotune test ----------
def _triton_run(causal=False, **kw):
    def run(q, k, v, mask):
        return tlv_fast.attention(q, k, v, causal=causal, attn_mask=mask, return_lse=True, backend="triton", **kw)
    return run


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d,causal", [(torch.bfloat16, 64, False), (torch.bfloat16, 128, True),
                                             (torch.float16, 128, False), (torch.float16, 64, True)], ids=str)
def test_real_sizes_match_reference(dtype, d, causal):
    q, k, v = make_qkv(2, 4, 1025, 1025, d, dtype=dtype)
    compare_with_reference(q, k, v, causal="bottom_right" if causal else None, run=_triton_run(causal))


@pytest.mark.gpu
@pytest.mark.autotune
def test_autotuned_kernels_match_reference():
    q, k, v = make_qkv(2, 16, 2048, 2048, 128, dtype=torch.bfloat16)
    compare_with_reference(q, k, v, causal="bottom_right", run=_triton_run(True))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 4, 197, 197, 64), (1, 8, 300, 1100, 80), (1, 8, 1, 4097, 128),
                                   (4, 8, 320, 320, 16), (1, 2, 513, 257, 256)], ids=str)
def test_model_shapes_bf16(shape):
    B, H, nq, nk, d = shape
    q, k, v = make_qkv(B, H, nq, nk, d, dtype=torch.bfloat16, layout="bshd")
    compare_with_reference(q, k, v, causal="bottom_right", run=_triton_run(True))


@pytest.mark.gpu
def test_keypad_gqa_dropout_and_float_bias():
    q, k, v = make_qkv(2, 8, 512, 512, 64, Hkv=2, dtype=torch.bfloat16)
    lengths = torch.tensor([512, 301], device="cuda")
    pad = (torch.arange(512, device="cuda")[None] < lengths[:, None])[:, None, None, :]
    compare_with_reference(q, k, v, attn_mask=pad, run=_triton_run())
    bias = torch.randn(1, 8, 512, 512, device="cuda", dtype=torch.bfloat16).requires_grad_()
    compare_with_reference(q, k, v, attn_mask=bias, causal="bottom_right", run=_triton_run(True))
    torch.manual_seed(1)
    with record_dropout_seeds() as seeds:
        tlv_fast.attention(q.detach(), k.detach(), v.detach(), dropout_p=0.1, backend="triton")
    keep = dropout_keep_mask(seeds[0], 2, 8, 512, 512, 0.1)

    def run(q, k, v, mask):
        torch.manual_seed(1)
        return tlv_fast.attention(q, k, v, dropout_p=0.1, return_lse=True, backend="triton")
    compare_with_reference(q, k, v, dropout_p=0.1, dropout_mask=keep, run=run)


@pytest.mark.gpu
def test_backward_is_deterministic():
    q, k, v = make_qkv(2, 8, 777, 777, 64, Hkv=2, dtype=torch.bfloat16)
    bias = torch.randn(1, 8, 777, 777, device="cuda", dtype=torch.float32).requires_grad_()
    grads = []
    for _ in range(2):
        torch.manual_seed(0)  # same dropout seed both times
        out = tlv_fast.attention(q, k, v, causal=True, attn_mask=bias, dropout_p=0.1, backend="triton")
        grads.append(torch.autograd.grad(out, (q, k, v, bias), torch.ones_like(out)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_key_padding_mask_costs_no_quadratic_memory():
    B, H, N, D = 4, 16, 8192, 64
    q, k, v = make_qkv(B, H, N, N, D, dtype=torch.bfloat16, requires_grad=False)
    pad = torch.ones(B, 1, 1, N, dtype=torch.bool, device="cuda")
    pad[:, :, :, N // 2:] = False
    tlv_fast.attention(q, k, v, attn_mask=pad, backend="triton")  # autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tlv_fast.attention(q, k, v, attn_mask=pad, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    out_bytes = q.numel() * q.element_size() + B * H * N * 4  # out + lse
    quadratic = B * H * N * N * 2 / 2**30
    assert extra <= out_bytes * 1.1, f"{extra / 2**20:.0f} MiB beyond the inputs (N x N: {quadratic:.0f} GiB)"


@pytest.mark.gpu
def test_inductor_compile_fullgraph():
    model = torch.nn.Linear(64, 3 * 64).cuda().to(torch.bfloat16)

    def f(x):
        q, k, v = model(x).view(2, 128, 3, 4, 16).permute(2, 0, 3, 1, 4)
        return tlv_fast.attention(q, k, v, causal=True)
    x = torch.randn(2, 128, 64, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(f, fullgraph=True)
    assert_close(compiled(x), f(x), name="inductor")
