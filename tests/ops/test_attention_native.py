"""The C++ CPU attention (backend="native", csrc/attention.cpp) against the reference: values, lse and every
gradient under the FlashAttention error rule, over dtypes, shapes (interpreter-sized and one mid-sized), causal
alignments, GQA, masks (broadcast, strided, fully masked rows, float-mask gradient), layouts, empty inputs and
dropout (the kernel's own keep mask through the testing hook); the ops through opcheck; auto's choice on CPU."""
import math

import pytest
import torch
import torch.nn.functional as F

import tlv_fast
from tlv_fast import backends
from tlv_fast.testing import dropout_keep_mask, record_dropout_seeds

from helpers import compare_with_reference, dtype_params, make_qkv

CPU = "cpu"


def run_native(causal=False, **kw):
    def run(q, k, v, mask):
        return tlv_fast.attention(q, k, v, causal=causal, attn_mask=mask, return_lse=True, backend="native", **kw)
    return run


def qkv(*shape, **kw):
    return make_qkv(*shape, device=CPU, **kw)


SHAPES = [  # (B, H, Nq, Nk, D)
    (2, 3, 37, 53, 40),
    (1, 2, 1, 67, 64),
    (1, 2, 97, 33, 80),
    (1, 1, 5, 9, 256),
    (1, 1, 1, 1, 8),
    (1, 2, 130, 600, 16),   # more than one query block and key block (128 x 512 tiles)
]


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, causal, dtype):
    q, k, v = qkv(*shape, dtype=dtype)
    compare_with_reference(q, k, v, causal="bottom_right" if causal else None, run=run_native(causal))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mid_sized_with_padding_and_gqa(causal):
    q, k, v = qkv(2, 8, 300, 300, 64, Hkv=2, layout="bshd")
    lengths = torch.tensor([300, 171])
    mask = (torch.arange(300)[None] < lengths[:, None])[:, None, None, :]
    compare_with_reference(q, k, v, mask, causal="bottom_right" if causal else None, run=run_native(causal),
                           lse_grad=True)


@pytest.mark.parametrize("dtype", dtype_params())
def test_sdpa_top_left_causal_and_value_head_dim(dtype):
    q, k, v = qkv(2, 2, 29, 45, 32, Dv=24, dtype=dtype)

    def run(q, k, v, mask):
        return tlv_fast.scaled_dot_product_attention(q, k, v, is_causal=True, backend="native"), None
    compare_with_reference(q, k, v, causal="top_left", run=run)


@pytest.mark.parametrize("shape", [(2, 3, 27, 38), (2, 1, 1, 38), (1, 3, 27, 38), (27, 38), (2, 1, 27, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["bool", "float", "float-grad"])
def test_masks_broadcast(shape, kind):
    q, k, v = qkv(2, 3, 27, 38, 32)
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
        mask[..., 0] = True
    else:
        mask = torch.randn(shape).requires_grad_(kind == "float-grad")
    compare_with_reference(q, k, v, mask, run=run_native())


def test_mask_read_in_place_from_a_strided_view():
    q, k, v = qkv(2, 2, 20, 30, 16)
    big = torch.randn(2, 2, 40, 60)
    mask = big[:, :, ::2, ::2]
    assert not mask.is_contiguous()
    compare_with_reference(q, k, v, mask, run=run_native())


def test_float_mask_gradient_is_deterministic_and_in_mask_dtype():
    q, k, v = qkv(1, 2, 40, 50, 16)
    bias = torch.randn(1, 2, 40, 50, dtype=torch.float64, requires_grad=True)
    grads = []
    for _ in range(2):
        out = tlv_fast.attention(q, k, v, attn_mask=bias, backend="native")
        grads.append(torch.autograd.grad(out.sum(), bias)[0])
    assert grads[0].dtype == torch.float64 and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("kind", ["bool", "float-inf"])
def test_fully_masked_rows_give_zero_and_zero_grad(kind):
    q, k, v = qkv(1, 2, 6, 9, 16)
    keep = torch.ones(1, 2, 6, 9, dtype=torch.bool)
    keep[:, :, 2] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, -math.inf)
    out, lse = tlv_fast.attention(q, k, v, attn_mask=mask, return_lse=True, backend="native")
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2])) and torch.isneginf(lse[:, :, 2]).all()
    dq, = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(dq).all() and torch.equal(dq[:, :, 2], torch.zeros_like(dq[:, :, 2]))
    compare_with_reference(q, k, v, mask, run=run_native())


def test_causal_rows_above_the_diagonal_of_a_short_key_range_are_empty():
    q, k, v = qkv(1, 1, 10, 4, 8)  # top-left with Nq > Nk is fine; bottom-right hides rows 0..5
    out, lse = tlv_fast.attention(q, k, v, causal=True, return_lse=True, backend="native")
    assert torch.isneginf(lse[0, 0, :6]).all() and torch.isfinite(lse[0, 0, 6:]).all()
    compare_with_reference(q, k, v, causal="bottom_right", run=run_native(True))


@pytest.mark.parametrize("shape", [(0, 2, 5, 7, 8), (1, 2, 0, 7, 8), (1, 2, 5, 0, 8)],
                         ids=["B0", "Nq0", "Nk0"])
def test_empty_inputs(shape):
    q, k, v = qkv(*shape)
    out, lse = tlv_fast.attention(q, k, v, return_lse=True, backend="native")
    ref, ref_lse = tlv_fast.attention(q, k, v, return_lse=True, backend="reference")
    assert out.shape == ref.shape and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_strided_inputs_and_output_layout():
    base = torch.randn(2, 30, 4, 3, 16)  # fused projection storage: (B, N, H, [q|k|v], D)
    q, k, v = (base[..., i, :].transpose(1, 2).requires_grad_() for i in range(3))
    q.retain_grad()
    out = tlv_fast.scaled_dot_product_attention(q, k, v, backend="native")
    assert out.transpose(1, 2).is_contiguous()  # BSHD memory, as torch's SDPA gives for BSHD inputs
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    compare_with_reference(q2, k2, v2, run=run_native())


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hkv", [2, 1], ids=["mha", "gqa"])
def test_dropout_matches_reference_with_the_kernels_mask(hkv, causal):
    p = 0.3
    q, k, v = qkv(2, 2, 29, 37, 32, Hkv=hkv)
    torch.manual_seed(11)
    with record_dropout_seeds() as seeds:
        tlv_fast.attention(q.detach(), k.detach(), v.detach(), dropout_p=p, backend="native")
    keep = dropout_keep_mask(seeds[0], 2, 2, 29, 37, p, backend="native")
    assert 0.6 < keep.float().mean() < 0.8

    def run(q, k, v, mask):
        torch.manual_seed(11)
        return tlv_fast.attention(q, k, v, causal=causal, dropout_p=p, return_lse=True, backend="native")
    compare_with_reference(q, k, v, causal="bottom_right" if causal else None, dropout_p=p, dropout_mask=keep,
                           run=run)


def test_dropout_reproducible_under_manual_seed():
    q, k, v = qkv(1, 2, 16, 16, 8, requires_grad=False)
    torch.manual_seed(3)
    a = tlv_fast.attention(q, k, v, dropout_p=0.5, backend="native")
    torch.manual_seed(3)
    b = tlv_fast.attention(q, k, v, dropout_p=0.5, backend="native")
    c = tlv_fast.attention(q, k, v, dropout_p=0.5, backend="native")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_opcheck():
    q, k, v = qkv(1, 4, 9, 11, 8, Hkv=2)
    mask = torch.randn(1, 1, 9, 11).expand(1, 4, 9, 11)
    seed = torch.tensor([7])
    ops = tlv_fast.ops.sdpa._native_ops()
    torch.library.opcheck(ops.native_attention_fwd.default, (q, k, v, mask, seed, 0.3, 2, 0.1))
    torch.library.opcheck(ops.native_attention_fwd.default, (q, k, v, None, None, 0.3, None, 0.0))
    out, lse = ops.native_attention_fwd(q.detach(), k.detach(), v.detach(), mask, None, 0.3, None, 0.0)
    torch.library.opcheck(ops.native_attention_bwd.default,
                          (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(), out,
                           lse, mask, None, 0.3, None, 0.0, True), test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_has_no_graph_break():
    q, k, v = qkv(1, 2, 12, 12, 8, requires_grad=False)
    fn = torch.compile(lambda q, k, v: tlv_fast.scaled_dot_product_attention(q, k, v, backend="native") * 2,
                       fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(q, k, v), F.scaled_dot_product_attention(q, k, v) * 2)


def test_auto_runs_native_on_cpu_and_the_op_rejects_bad_inputs():
    inputs = backends.Inputs(torch.device("cpu"), torch.float32, 64, frozenset({"mask", "causal", "lse"}))
    assert backends.choose("attention", "auto", inputs) == "native"
    assert backends.choose("attention", "auto", backends.Inputs(torch.device("cpu"), torch.float64, 64)) == \
        "reference"
    ops = tlv_fast.ops.sdpa._native_ops()
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        ops.native_attention_fwd(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), None, None, 1.0, None, 0.0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops.native_attention_fwd(q.double(), q.double(), q.double(), None, None, 1.0, None, 0.0)
    with pytest.raises(RuntimeError, match="mask must be"):
        ops.native_attention_fwd(q, q, q, torch.ones(1, 3, 4, 5, dtype=torch.bool), None, 1.0, None, 0.0)
    with pytest.raises(RuntimeError, match="dropout_p > 0 needs"):
        ops.native_attention_fwd(q, q, q, None, None, 1.0, None, 0.5)


def test_the_portable_gemm_without_blas_gives_the_same_results():
    """TLV_FAST_CPU_GEMM=portable runs the loop that a torch build without BLAS would use (attention and relpos)."""
    import os
    import subprocess
    import sys

    from helpers import REPO
    code = """
import torch, tlv_fast
from tlv_fast import reference
torch.manual_seed(0)
q, k, v = (torch.randn(2, 4, 70, 24, requires_grad=True) for _ in range(3))
mask = torch.randn(2, 1, 70, 70, requires_grad=True)
out = tlv_fast.attention(q, k, v, causal=True, attn_mask=mask, backend="native")
ref = reference.attention(q, k, v, mask, causal="bottom_right")
g = torch.autograd.grad(out.sum(), (q, k, v, mask))
gr = torch.autograd.grad(ref.sum(), (q, k, v, mask))
errs = [(out - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(g, gr)]
t = [torch.randn(1, 2, 30, 16, requires_grad=True) for _ in range(3)] + \\
    [torch.randn(59, 2, 16, requires_grad=True) for _ in range(2)]
o, lg = tlv_fast.relpos_attention(*t, mask_upper=True, return_logits=True, backend="native")
ro, rl = reference.relpos_attention(*t, mask_upper=True, return_logits=True)
errs.append((o - ro).abs().max().item())
errs += [(a - b).abs().max().item() for a, b in zip(torch.autograd.grad(o.sum(), t), torch.autograd.grad(ro.sum(), t))]
print("MAXERR", max(errs))
"""
    env = {**os.environ, "TLV_FAST_CPU_GEMM": "portable"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.split("MAXERR")[1]) < 1e-4
