"""STTR's relative-position attention: the Triton kernel (through the interpreter on a CPU) and the C++ CPU kernel
(backend="native") against the eager reference — output, head-summed logits and all five gradients — and the module
against an eager transcription of the spec's formula."""

import pytest
import torch

import tlv_fast
from tlv_fast import reference
from tlv_fast.kernels.common import force_blocks

from helpers import DEVICE, as_truth, assert_close, assert_fa_rule, dtype_params, spec_relpos_mha


def _inputs(B, H, nq, nk, d, dtype, dv=None, device=DEVICE):
    g = [torch.randn(B, H, nq, d), torch.randn(B, H, nk, d), torch.randn(B, H, nk, dv or d),
         torch.randn(nq + nk - 1, H, d), torch.randn(nq + nk - 1, H, d)]
    return [(t * 0.7).to(device=device, dtype=dtype).requires_grad_() for t in g]


def _check(inputs, sign, mask, dtype, return_logits=True, backend="triton"):
    kw = dict(offset_sign=sign, mask_upper=mask, return_logits=True)
    out, logits = tlv_fast.relpos_attention(*inputs, **kw, backend=backend)
    ref_out, ref_logits = reference.relpos_attention(*inputs, **kw)
    truth_inputs = as_truth(*inputs)
    truth_out, truth_logits = reference.relpos_attention(*truth_inputs, **kw)
    finite = torch.isfinite(truth_logits)
    assert torch.equal(torch.isfinite(logits), finite), "masked pattern of the logits differs"
    assert_fa_rule(out, ref_out, truth_out, dtype, "fwd", "out")
    assert_fa_rule(logits[finite], ref_logits[finite], truth_logits[finite], dtype, "fwd", "logits")
    g = torch.randn_like(out)
    gl = torch.randn_like(logits).masked_fill(~finite, 0.0) if return_logits else None

    def loss(o, lg):
        total = (o.double() * g.double()).sum()
        return total + (lg.masked_fill(~finite, 0.0).double() * gl.double()).sum() if return_logits else total

    grads = torch.autograd.grad(loss(out, logits), inputs)
    ref_grads = torch.autograd.grad(loss(ref_out, ref_logits), inputs)
    truth_grads = torch.autograd.grad(loss(truth_out, truth_logits), truth_inputs)
    for name, a, r, t, x in zip(("dq", "dk", "dv", "dqr", "dkr"), grads, ref_grads, truth_grads, inputs):
        assert a.shape == x.shape and a.dtype == x.dtype, name
        assert_fa_rule(a, r, t, dtype, "bwd", name)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("mask", [False, True], ids=["full", "mask_upper"])
@pytest.mark.parametrize("sign", [1, -1], ids=["sign+", "sign-"])
@pytest.mark.parametrize("nq,nk", [(24, 24), (21, 13), (13, 30)], ids=["square", "Nq>Nk", "Nq<Nk"])
def test_sttr_head_dim_16(nq, nk, sign, mask, dtype):
    _check(_inputs(2, 2, nq, nk, 16, dtype), sign, mask, dtype)


@pytest.mark.parametrize("d", [8, 32, 64, 40])
@pytest.mark.parametrize("sign", [1, -1], ids=["sign+", "sign-"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_other_head_dims(d, sign, dtype):
    _check(_inputs(1, 2, 19, 23, d, dtype), sign, sign == 1, dtype)


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)], ids=lambda b: f"BM{b[0]}-BN{b[1]}")
@pytest.mark.parametrize("sign", [1, -1], ids=["sign+", "sign-"])
def test_unequal_tiles(blocks, sign):
    with force_blocks(*blocks):
        _check(_inputs(1, 2, 37, 29, 16, torch.float32), sign, True, torch.float32)
        _check(_inputs(1, 1, 29, 45, 16, torch.float32), sign, False, torch.float32)


def test_value_head_dim_and_strided_inputs():
    q, k, v, qr, kr = _inputs(2, 2, 17, 17, 16, torch.float32, dv=32)
    base = torch.randn(2, 17, 2, 48, device=DEVICE)  # (R, N, H, C') projection output, viewed per head
    q2 = base[..., :16].transpose(1, 2).detach().requires_grad_()
    _check([q2, k, v, qr, kr], 1, False, torch.float32)


def test_without_logits_and_deterministic_backward():
    inputs = _inputs(2, 2, 20, 20, 16, torch.float32)
    out = tlv_fast.relpos_attention(*inputs, backend="triton")
    assert_close(out, reference.relpos_attention(*inputs), name="out")
    g = torch.randn_like(out)
    a = torch.autograd.grad(tlv_fast.relpos_attention(*inputs, backend="triton"), inputs, g)
    b = torch.autograd.grad(tlv_fast.relpos_attention(*inputs, backend="triton"), inputs, g)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bad_input():
    q, k, v, qr, kr = (t.detach() for t in _inputs(1, 2, 5, 6, 16, torch.float32))
    with pytest.raises(ValueError, match="qr must be"):
        tlv_fast.relpos_attention(q, k, v, qr[:-1], kr)
    with pytest.raises(ValueError, match="offset_sign"):
        tlv_fast.relpos_attention(q, k, v, qr, kr, offset_sign=0)
    with pytest.raises(ValueError, match="k must be"):
        tlv_fast.relpos_attention(q, k[..., :8], v, qr, kr)
    with pytest.raises(ValueError, match="dtype"):
        tlv_fast.relpos_attention(q, k.half(), v, qr, kr)
    with pytest.raises(RuntimeError, match="float64"):
        tlv_fast.relpos_attention(q.double(), k.double(), v.double(), qr.double(), kr.double(), backend="triton")


# ---- the C++ CPU kernel (backend="native") ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("mask", [False, True], ids=["full", "mask_upper"])
@pytest.mark.parametrize("sign", [1, -1], ids=["sign+", "sign-"])
@pytest.mark.parametrize("nq,nk", [(24, 24), (21, 13), (13, 30), (1, 1), (150, 290)],
                         ids=["square", "Nq>Nk", "Nq<Nk", "one", "several-blocks"])
def test_native_matches_reference(nq, nk, sign, mask, dtype):
    _check(_inputs(2, 2, nq, nk, 16, dtype, device="cpu"), sign, mask, dtype, backend="native")


def test_native_mid_sized_head_dims_strides_and_no_logits():
    _check(_inputs(2, 8, 160, 160, 16, torch.float32, device="cpu"), 1, True, torch.float32, backend="native")
    _check(_inputs(1, 2, 33, 47, 40, torch.float32, dv=24, device="cpu"), -1, False, torch.float32,
           return_logits=False, backend="native")
    q, k, v, qr, kr = _inputs(2, 2, 17, 17, 16, torch.float32, dv=32, device="cpu")
    base = torch.randn(2, 17, 2, 48)
    q2 = base[..., :16].transpose(1, 2).detach().requires_grad_()
    _check([q2, k, v, qr, kr], 1, False, torch.float32, backend="native")


def test_native_backward_is_deterministic_and_auto_picks_it_on_cpu():
    inputs = _inputs(3, 2, 40, 40, 16, torch.float32, device="cpu")
    g = torch.randn(3, 2, 40, 16)
    a = torch.autograd.grad(tlv_fast.relpos_attention(*inputs, backend="native"), inputs, g)
    b = torch.autograd.grad(tlv_fast.relpos_attention(*inputs, backend="native"), inputs, g)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    from tlv_fast import backends
    assert backends.choose("relpos_attention", "auto",
                           backends.Inputs(torch.device("cpu"), torch.float32, 16)) == "native"


def test_native_opcheck_and_compile():
    from tlv_fast.ops import relpos
    ops = relpos._native_ops()
    q, k, v, qr, kr = _inputs(2, 2, 9, 7, 16, torch.float32, device="cpu")
    torch.library.opcheck(ops.native_relpos_fwd.default, (q, k, v, qr, kr, -1, True, True))
    torch.library.opcheck(ops.native_relpos_fwd.default, (q, k, v, qr, kr, 1, False, False))
    _compiles_without_graph_break([q, k, v, qr, kr], "native")
    with pytest.raises(RuntimeError, match="qr and kr must be"):
        ops.native_relpos_fwd(q, k, v, qr[:-1], kr, 1, False, False)


def test_opcheck_and_compile():
    q, k, v, qr, kr = _inputs(1, 2, 9, 7, 16, torch.float32)
    torch.library.opcheck(torch.ops.tlv_fast.relpos_attention_fwd.default, (q, k, v, qr, kr, -1, True, True, "ieee"))
    _compiles_without_graph_break([q, k, v, qr, kr], "triton")


def _compiles_without_graph_break(inputs, backend):
    torch._dynamo.reset()
    f = torch.compile(lambda *a: tlv_fast.relpos_attention(*a, mask_upper=True, return_logits=True, backend=backend),
                      fullgraph=True, backend="aot_eager")
    out, _ = f(*inputs)
    ref_out, _ = reference.relpos_attention(*inputs, mask_upper=True, return_logits=True)
    assert_close(out, ref_out, name="out")


@pytest.mark.parametrize("backend", ["triton", "reference", pytest.param(
    "native", marks=pytest.mark.skipif(DEVICE != "cpu", reason="the native relpos kernel runs CPU tensors"))])
@pytest.mark.parametrize("sign,mask,cross", [(1, False, False), (1, True, True), (-1, False, True)],
                         ids=["self", "left-query-masked", "right-query"])
def test_module_matches_the_spec_formula(sign, mask, cross, backend):
    torch.manual_seed(0)
    mha = tlv_fast.nn.RelativeMultiheadAttention(32, 4, backend=backend).to(DEVICE).double()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    mha = mha.float()
    x = torch.randn(3, 11, 32, device=DEVICE)
    y = torch.randn(3, 14, 32, device=DEVICE) if cross else x
    out, logits = mha(x, y, y, offset_sign=sign, mask_upper=mask, return_logits=True, pos_scale=3.0)
    want_out, want_logits = spec_relpos_mha(mha, x, y, sign, mask, 3.0)
    assert_close(out, want_out, name="module out")
    finite = torch.isfinite(want_logits)
    assert torch.equal(torch.isfinite(logits), finite)
    assert_close(logits, want_logits, name="module logits")
    out.sum().backward()
    assert mha.in_proj_weight.grad is not None and torch.isfinite(mha.in_proj_weight.grad).all()


def test_module_parameter_names_match_sttr():
    mha = tlv_fast.nn.RelativeMultiheadAttention(128, 8)
    shapes = {k: tuple(v.shape) for k, v in mha.state_dict().items()}
    assert shapes == {"in_proj_weight": (384, 128), "in_proj_bias": (384,), "out_proj.weight": (128, 128),
                      "out_proj.bias": (128,)}


# ---- STTR relative-position attention at STTR's shape class ------------------------------------------------------
def test_second_order_gradients_through_the_kernel_raise():
    q, k, v, qr, kr = _inputs(1, 1, 8, 8, 16, torch.float32)
    (g,) = torch.autograd.grad(tlv_fast.relpos_attention(q, k, v, qr, kr, backend="triton").square().sum(), q,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="second-order"):
        g.sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("sign,mask", [(1, False), (-1, False), (1, True)], ids=["self", "right-query", "masked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_relpos_sttr_shape(sign, mask, dtype):
    _check(_inputs(8, 8, 320, 320, 16, dtype), sign, mask, dtype)


@pytest.mark.gpu
def test_relpos_memory_is_linear_in_width():
    q, k, v, qr, kr = (t.detach() for t in _inputs(960, 8, 320, 320, 16, torch.float16))
    tlv_fast.relpos_attention(q, k, v, qr, kr)  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tlv_fast.relpos_attention(q, k, v, qr, kr)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 1.2 * (q.numel() * 2 + 960 * 8 * 320 * 4), f"{extra / 2**20:.0f} MiB"  # out + lse


# ---- the kernel's launch modes: key/query parts of the backward, table tiles, idempotent outputs -----------------
def _reference_grads(inputs, sign, mask, g, gl):
    out, logits = reference.relpos_attention(*inputs, offset_sign=sign, mask_upper=mask, return_logits=True)
    finite = torch.isfinite(logits)
    loss = (out.double() * g.double()).sum() + (logits.masked_fill(~finite, 0.0).double() * gl.double()).sum()
    return out, logits, torch.autograd.grad(loss, inputs)


@pytest.mark.deep  # not in the quick run (README)
@pytest.mark.parametrize("parts,sign,mask", [(1, 1, True), (2, 1, True), (None, -1, False), (3, -1, False)],
                         ids=["parts1-sign+masked", "parts2-sign+masked", "auto-sign-", "parts3-sign-"])
def test_backward_parts_match_reference_and_are_deterministic(parts, sign, mask):
    """The backward split over key tiles (by-key kernel) and query tiles (by-query kernel) into private partials:
    every split gives the reference's gradients, and the same split gives bit-identical results twice."""
    from tlv_fast.kernels import relpos_attention as kr
    torch.manual_seed(1)
    inputs = _inputs(2, 2, 53, 45, 16, torch.float32)
    q, k, v, qr, kr_ = (t.detach() for t in inputs)
    with force_blocks(16, 16):
        out, lse = torch.empty_like(q), torch.empty(2, 2, 53, device=q.device)
        logits = torch.empty(2, 53, 45, device=q.device)
        kr.relpos_attention_fwd(q, k, v, qr, kr_, out, lse, logits, sign, mask)
        g = torch.randn_like(out)
        gl = torch.randn_like(logits).masked_fill(~torch.isfinite(logits), 0.0)
        runs = []
        for _ in range(2):
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            dq, dqr, dkr = kr.relpos_attention_bwd(g, gl, q, k, v, qr, kr_, out, lse, None, dk, dv, sign, mask,
                                                   parts=parts)
            runs.append((dq, dk, dv, dqr, dkr))
    ref_out, ref_logits, ref_grads = _reference_grads(inputs, sign, mask, g, gl)
    assert_close(out, ref_out, name="out")
    for name, a, again, r in zip(("dq", "dk", "dv", "dqr", "dkr"), runs[0], runs[1], ref_grads):
        assert_close(a, r, name=name)
        assert torch.equal(a, again), f"{name} differs between two identical calls"


def test_key_split_policy():
    from tlv_fast.kernels.relpos_attention import BWD_PROGRAMS, key_split
    assert key_split(BWD_PROGRAMS, 4096, 64) == 1            # batch x heads fill the GPU: one part
    assert key_split(960 * 8, 320, 32) == 1                  # STTR's shape
    assert key_split(8, 320, 64) == 5                        # few sequences: one part per key tile
    assert key_split(8, 4096, 64) == -(-BWD_PROGRAMS // 8)   # long ones: enough parts for the GPU
    from tlv_fast.kernels import relpos_attention as kr
    q, k, v, qr, kr_ = (t.detach() for t in _inputs(1, 1, 8, 8, 16, torch.float32))
    with pytest.raises(ValueError, match="parts must be"):
        kr.relpos_attention_bwd(q, None, q, k, v, qr, kr_, q, torch.zeros(1, 1, 8), None, k, v, parts=0)


@pytest.mark.parametrize("blocks", [(64, 64), (32, 64), (64, 32), (32, 32)], ids=lambda b: f"BM{b[0]}-BN{b[1]}")
def test_table_tiles(blocks):
    """The tiles of the launch tables (kernels/relpos_attention.py), forced, on shapes with ragged edges."""
    with force_blocks(*blocks):
        _check(_inputs(1, 2, 70, 45, 16, torch.float16), 1, True, torch.float16)
        _check(_inputs(1, 1, 40, 75, 16, torch.float32), -1, False, torch.float32)


def test_logits_need_no_zero_fill():
    """The forward writes every logit (the first head stores, the others add): a buffer of garbage is fine."""
    from tlv_fast.kernels import relpos_attention as kr
    inputs = [t.detach() for t in _inputs(2, 3, 19, 23, 16, torch.float32)]
    q, k, v, qr, kr_ = inputs
    out, lse = torch.empty_like(q), torch.empty(2, 3, 19, device=q.device)
    logits = torch.full((2, 19, 23), float("nan"), device=q.device)
    kr.relpos_attention_fwd(q, k, v, qr, kr_, out, lse, logits, 1, True)
    ref_out, ref_logits = reference.relpos_attention(*inputs, offset_sign=1, mask_upper=True, return_logits=True)
    finite = torch.isfinite(ref_logits)
    assert torch.equal(torch.isfinite(logits), finite)
    assert_close(logits[finite], ref_logits[finite], name="logits")
    assert_close(out, ref_out, name="out")
