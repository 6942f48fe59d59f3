"""The public surface: torch parity of the drop-in, dispatch, bad input, torch.compile, torch.library.opcheck."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import tlv_fast
from tlv_fast.ops import sdpa as attention_module

from helpers import DEVICE, HAS_CUDA, REPO, assert_close, make_qkv


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", ["plain", "causal", "bool-mask", "float-mask", "gqa", "scale", "3d"])
def test_sdpa_matches_torch_values_and_grads(case, backend):
    q, k, v = make_qkv(2, 4, 23, 23 if case == "causal" else 31, 32, Hkv=2 if case == "gqa" else None)
    kw = {}
    if case == "causal":
        kw["is_causal"] = True
    elif case == "bool-mask":
        kw["attn_mask"] = torch.rand(2, 1, 23, 31, device=DEVICE) > 0.2
    elif case == "float-mask":
        kw["attn_mask"] = torch.randn(4, 23, 31, device=DEVICE)
    elif case == "gqa":
        kw["enable_gqa"] = True
    elif case == "scale":
        kw["scale"] = 0.05
    elif case == "3d":
        q, k, v = (t.detach()[0].requires_grad_() for t in (q, k, v))
    ours = tlv_fast.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
    theirs = F.scaled_dot_product_attention(q, k, v, **kw)
    assert_close(ours, theirs, name="out")
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(theirs, (q, k, v), g)):
        assert_close(a, b, "bwd", name="grad")


def test_auto_on_cpu_uses_the_reference_and_env_forces_triton(monkeypatch):
    if HAS_CUDA:
        pytest.skip("checks the CPU choice of auto")
    calls = []
    real = attention_module._kernels

    def counting():
        calls.append(1)
        return real()

    monkeypatch.setattr(attention_module, "_kernels", counting)
    q, k, v = make_qkv(1, 1, 8, 8, 16, device="cpu", requires_grad=False)
    monkeypatch.delenv("TLV_FAST_BACKEND", raising=False)
    tlv_fast.attention(q, k, v)
    assert calls == []
    monkeypatch.setenv("TLV_FAST_BACKEND", "triton")
    tlv_fast.attention(q, k, v)
    assert calls == [1]
    monkeypatch.setenv("TLV_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="TLV_FAST_BACKEND"):
        tlv_fast.attention(q, k, v)


@pytest.mark.gpu
def test_auto_on_cuda_falls_back_for_fp64_with_one_warning():
    q, k, v = make_qkv(1, 1, 8, 8, 16, dtype=torch.float64, requires_grad=False)
    with pytest.warns(RuntimeWarning, match="float64"):
        tlv_fast.attention(q, k, v)
    with pytest.raises(RuntimeError, match="float64"):
        tlv_fast.attention(q, k, v, backend="triton")


def test_triton_on_cpu_without_interpreter_raises_with_the_reason():
    code = ("import torch, tlv_fast\n"
            "q = torch.randn(1, 1, 4, 16)\n"
            "try:\n    tlv_fast.attention(q, q, q, backend='triton')\n"
            "except RuntimeError as e:\n    print('RAISED', e)\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert "RAISED" in res.stdout and "TRITON_INTERPRET" in res.stdout, res.stdout + res.stderr


BAD_INPUTS = [
    (lambda q, k, v: (q, k.half(), v), {}, ValueError, "dtype"),
    (lambda q, k, v: (q, k[..., :8], v), {}, ValueError, "head dim"),
    (lambda q, k, v: (q, k, v[:, :, :3]), {}, ValueError, "same length"),
    (lambda q, k, v: (q[:, :3], k, v), {}, ValueError, "heads"),
    (lambda q, k, v: (q, k[:1], v[:1]), {}, ValueError, "batch"),
    (lambda q, k, v: (q[0], k, v), {}, ValueError, "number of dims"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), {}, ValueError, "floating"),
    (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(2, 4, 6, 6, dtype=torch.int32)}, ValueError, "attn_mask"),
    (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(3, 1, 6, 7, dtype=torch.bool)}, ValueError, "attn_mask"),
    (lambda q, k, v: (q, k, v), {"dropout_p": 1.0}, ValueError, "dropout_p"),
    (lambda q, k, v: (q, k, v), {"backend": "cudnn"}, ValueError, "backend"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), {"backend": "native"}, RuntimeError,
     "backend 'native' cannot run these inputs"),
    (lambda q, k, v: (q, k, v), {"fp32_precision": "fast"}, ValueError, "fp32_precision"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), {"backend": "triton"}, RuntimeError, "float64"),
    (lambda q, k, v: (q.new_zeros(2, 4, 6, 288), k.new_zeros(2, 4, 7, 288), v), {"backend": "triton"}, RuntimeError,
     "head dim 288"),
    (lambda q, k, v: (q, k.to("meta"), v), {}, ValueError, "device"),
]


@pytest.mark.parametrize("make,kw,exc,match", BAD_INPUTS, ids=[b[3] for b in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(make, kw, exc, match):
    q, k, v = make_qkv(2, 4, 6, 7, 16, requires_grad=False)
    q, k, v = make(q, k, v)
    with pytest.raises(exc, match=match):
        tlv_fast.attention(q, k, v, **kw)


def test_head_dim_above_256_runs_on_the_reference():
    q, k, v = make_qkv(1, 1, 4, 4, 288, requires_grad=False)
    out = tlv_fast.attention(q, k, v, backend="reference")
    assert out.shape == (1, 1, 4, 288) and torch.isfinite(out).all()


class TinyAttention(torch.nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x, pad_mask):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = tlv_fast.attention(q, k, v, causal=True, attn_mask=pad_mask[:, None, None, :], backend="triton")
        return self.out(y.transpose(1, 2).reshape(B, N, C))


def test_torch_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    model = TinyAttention().to(DEVICE)
    x = torch.randn(2, 12, 32, device=DEVICE)
    pad = torch.ones(2, 12, dtype=torch.bool, device=DEVICE)
    pad[1, 9:] = False
    explanation = torch._dynamo.explain(model)(x, pad)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, pad)
    assert_close(out, model(x, pad), name="compiled")
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_opcheck_forward_and_backward_ops():
    q, k, v = make_qkv(1, 2, 10, 12, 16)
    mask = torch.randn(1, 1, 10, 12, device=DEVICE, requires_grad=True)
    seed = torch.tensor([7], device=DEVICE, dtype=torch.int64)
    torch.library.opcheck(torch.ops.tlv_fast.attention_fwd.default,
                          (q, k, v, mask, None, 0.25, "bottom_right", 0.0, "ieee"))
    torch.library.opcheck(torch.ops.tlv_fast.attention_fwd.default,
                          (q, k, v, None, seed, 0.25, "none", 0.1, "ieee"))
    out, lse = torch.ops.tlv_fast.attention_fwd(q, k, v, mask, None, 0.25, "top_left", 0.0, "ieee")
    torch.library.opcheck(torch.ops.tlv_fast.attention_bwd.default,
                          (torch.randn_like(out), None, q.detach(), k.detach(), v.detach(), out.detach(),
                           lse.detach(), mask.detach(), None, 0.25, "top_left", 0.0, "ieee", True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---- torch's numerical rules on every backend ----------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_large_16bit_inputs_do_not_overflow(backend, dtype):
    """q = k = v = 40 with D = 64: q.k = 102400 overflows fp16 unless the scale is applied first (torch's math
    path scales q and k by sqrt(scale)); the result is 40 everywhere."""
    q = torch.full((1, 2, 8, 64), 40.0, device=DEVICE, dtype=dtype)
    ours = tlv_fast.scaled_dot_product_attention(q, q, q, backend=backend)
    theirs = F.scaled_dot_product_attention(q, q, q)
    assert torch.isfinite(ours).all()
    assert_close(ours, theirs, name="large inputs")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_nan_in_a_masked_out_key_propagates_as_in_torch(backend, kind):
    """Masks are additive (bool False = -inf): a NaN score stays NaN (NaN + -inf = NaN), as in torch."""
    q, k, v = make_qkv(1, 2, 5, 6, 16, requires_grad=False)
    k[0, 0, 5] = float("nan")
    keep = torch.ones(1, 1, 1, 6, dtype=torch.bool, device=DEVICE)
    keep[..., 5] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, float("-inf"))
    ours = tlv_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs)) and torch.isnan(ours[0, 0]).all()
    assert not torch.isnan(ours[0, 1]).any()  # the other head never saw the NaN


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_keys_outside_the_causal_window_are_removed(backend):
    """The causal mask removes keys rather than adding -inf: a NaN key a query cannot see does not reach it."""
    q, k, v = make_qkv(1, 1, 6, 6, 16, requires_grad=False)
    k[0, 0, 5] = float("nan")
    out = tlv_fast.attention(q, k, v, causal=True, backend=backend)
    assert torch.isfinite(out[0, 0, :5]).all() and torch.isnan(out[0, 0, 5]).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_head_dim_zero_says_so(backend):
    q = torch.zeros(1, 1, 4, 0, device=DEVICE)
    with pytest.raises(ValueError, match="head dims must be >= 1"):
        tlv_fast.scaled_dot_product_attention(q, q, q, backend=backend)


def test_second_order_gradients_through_the_kernel_raise():
    q, k, v = make_qkv(1, 1, 8, 8, 16)
    out = tlv_fast.attention(q, k, v, backend="triton")
    (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order"):
        g.sum().backward()
