"""Test helpers shared by every test module: where tests run, the two tolerance rules, input builders and the
comparison against the eager reference. Import as ``from helpers import ...`` (tests/ is on pytest's pythonpath)."""
import math
import os

import pytest
import torch

from tlv_fast import reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
INTERPRETED = not HAS_CUDA

# Absolute slack `eps` of the FlashAttention rule per dtype, forward and backward:
#   max|kernel - truth| <= 2 * max|reference_in_dtype - truth| + eps,   truth = reference in float64.
TOLERANCE = {
    torch.float64: {"fwd": 1e-11, "bwd": 1e-10},
    torch.float32: {"fwd": 1e-5, "bwd": 5e-5},
    torch.float16: {"fwd": 2e-3, "bwd": 5e-3},
    torch.bfloat16: {"fwd": 1.6e-2, "bwd": 4e-2},
}


def assert_fa_rule(actual, reference, truth, dtype, kind, name="output"):
    """FlashAttention's test rule: the kernel's error to the fp64 truth is at most twice the eager reference's
    error in the same dtype, plus the table's slack."""
    assert not torch.isnan(actual).any(), f"{name}: NaN in kernel result"
    err = (actual.double() - truth.double()).abs().max().item()
    ref_err = (reference.double() - truth.double()).abs().max().item()
    bound = 2 * ref_err + TOLERANCE[dtype][kind]
    if INTERPRETED and dtype == torch.bfloat16 and truth.numel():
        # Triton's interpreter converts fp32 -> bf16 by truncation (measured: 17.12 -> 17.0, torch gives 17.125):
        # one more bf16 ulp of slack than the reference, which rounds to nearest
        bound += truth.double().abs().max().item() * 2.0 ** -7
    assert err <= bound, f"{name}: max error {err:.3e} > 2 * {ref_err:.3e} + {TOLERANCE[dtype][kind]:.1e}"


def dtype_params():
    """fp32, fp16, bf16. Under the interpreter, bf16 dots are upcast inside the kernel (Triton's interpreter computes
    bf16 tl.dot wrongly, measured; see CONTRIBUTING.md), so there the bf16 case checks everything but the bf16
    tensor-core product; the interpreter also truncates fp32 -> bf16 conversions (assert_fa_rule allows for it)."""
    more = pytest.mark.deep  # the quick run (README) keeps only the fp32 case
    # under the interpreter the bf16 case runs with --all-dtypes only (conftest): its dots are upcast to fp32, so it
    # checks conversions that fp16 and fp32 mostly cover, at the cost of a minute of the default run
    bf16 = pytest.param(torch.bfloat16, id="bf16-interp-upcast" if INTERPRETED else "bf16",
                        marks=[more, pytest.mark.bf16_interp] if INTERPRETED else more)
    return [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16", marks=more), bf16]


def make_qkv(B, Hq, Nq, Nk, D, Dv=None, Hkv=None, dtype=torch.float32, layout="bhsd", requires_grad=True,
             device=DEVICE):
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); layout "bshd" makes them transposed views of
    (B, N, H, D) storage (non-contiguous, as a fused projection produces)."""
    Hkv = Hkv or Hq
    Dv = Dv or D

    def one(h, n, d):
        if layout == "bshd":
            t = torch.randn(B, n, h, d, device=device, dtype=dtype).transpose(1, 2)
        else:
            t = torch.randn(B, h, n, d, device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return one(Hq, Nq, D), one(Hkv, Nk, D), one(Hkv, Nk, Dv)


def as_truth(*tensors):
    """float64 leaf copies of the floating tensors for the truth computation (bool masks stay bool)."""
    return [t.detach().double().requires_grad_(t.requires_grad) if t is not None and t.is_floating_point() else t
            for t in tensors]


def compare_with_reference(q, k, v, attn_mask=None, causal=None, scale=None, dropout_p=0.0, dropout_mask=None,
                           run=None, lse_grad=False):
    """Run `run(q, k, v, mask)` -> (out, lse) (the kernel) and check out, lse and the gradients of every input
    that requires grad against the reference, under the FlashAttention rule.

    causal: None, "top_left" or "bottom_right" (for the reference). Returns the kernel's (out, lse).
    """
    dtype = q.dtype
    inputs = [t for t in (q, k, v, attn_mask) if t is not None]
    out, lse = run(q, k, v, attn_mask)
    kw = dict(causal=causal, scale=scale, dropout_p=dropout_p, dropout_mask=dropout_mask, return_lse=True)
    ref_out, ref_lse = reference.attention(q, k, v, attn_mask, **kw)
    tq, tk, tv, tm = as_truth(q, k, v, attn_mask)
    truth_out, truth_lse = reference.attention(tq, tk, tv, tm, **kw)
    assert out.shape == ref_out.shape and out.dtype == dtype
    assert_fa_rule(out, ref_out, truth_out, dtype, "fwd", "out")
    finite = torch.isfinite(truth_lse)
    if lse is not None:
        assert torch.equal(torch.isneginf(lse), torch.isneginf(truth_lse)), "lse: -inf rows differ"
        assert_fa_rule(lse[finite], ref_lse[finite], truth_lse[finite], dtype, "fwd", "lse")
    if not any(t.requires_grad for t in inputs):
        return out, lse
    g = torch.randn_like(out)
    gl = torch.randn_like(lse).masked_fill(~finite, 0.0) if lse_grad else None

    def loss(o, lse_):
        total = (o.float() * g.float()).sum()
        return total + (lse_.double() * gl.double()).sum() if lse_grad else total

    want = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(loss(out, lse), want)
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), want)
    truth_want = [t for t in (tq, tk, tv, tm) if t is not None and t.requires_grad]
    truth_grads = torch.autograd.grad(loss(truth_out, truth_lse), truth_want)
    names = [n for n, t in zip(("dq", "dk", "dv", "dmask"), (q, k, v, attn_mask)) if t is not None and t.requires_grad]
    for name, t, gr, rg, tg in zip(names, want, grads, ref_grads, truth_grads):
        assert gr.shape == t.shape and gr.dtype == t.dtype, f"{name}: shape/dtype {gr.shape} {gr.dtype}"
        assert_fa_rule(gr, rg, tg, dtype, "bwd", name)
    return out, lse



# The second rule, for whole modules and models compared with another implementation of the same math (transformers,
# torch's MultiheadAttention, the reference backend, an eager transcription), where no fp64 truth is at hand:
#   max|actual - expected| <= rtol * max|expected| + atol      (per dtype; "fwd" for values, "bwd" for gradients)
# Scaling by the largest expected value keeps one number per dtype meaningful for logits and gradients alike.
MODEL_TOLERANCE = {  # (rtol, atol). fp32 measured on CPU: at most 1.5e-6 (values) / 1.8e-6 (gradients) relative,
    # and 1.6e-10 absolute on gradients that are zero in exact arithmetic (key biases); set TLV_TEST_TOLERANCE_LOG
    # to a file path to record what every comparison needed
    torch.float64: {"fwd": (1e-12, 1e-15), "bwd": (1e-11, 1e-15)},
    torch.float32: {"fwd": (2e-5, 1e-7), "bwd": (5e-5, 1e-8)},
    torch.float16: {"fwd": (2e-3, 1e-5), "bwd": (1e-2, 1e-5)},
    torch.bfloat16: {"fwd": (2e-2, 1e-4), "bwd": (5e-2, 1e-4)},
}


def assert_close(actual, expected, kind="fwd", name="", dtype=None):
    """The module/model rule above; dtype defaults to expected's. NaN/inf must sit at the same places."""
    dtype = dtype or expected.dtype
    rtol, atol = MODEL_TOLERANCE[dtype][kind]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    fa, fe = torch.isfinite(actual), torch.isfinite(expected)
    assert torch.equal(fa, fe), f"{name}: non-finite entries differ"
    if not fe.any():
        return
    a, e = actual[fe].double(), expected[fe].double()
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    if os.environ.get("TLV_TEST_TOLERANCE_LOG"):  # calibration: what each comparison needed
        with open(os.environ["TLV_TEST_TOLERANCE_LOG"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}|{name}|{dtype}|{kind}|"
                    f"{err / max(scale, 1e-30):.3e}|{err:.3e}|{scale:.3e}\n")
    assert err <= rtol * scale + atol, f"{name}: max error {err:.3g} > {rtol:g} * {scale:.3g} + {atol:g}"


def spec_relpos_mha(mha, x_q, x_kv, sign, mask, pos_scale):
    """Eager transcription of docs/sttr.md §2.1-2.2 with per-pair positional encodings p_ij (N x N x C), for a
    RelativeMultiheadAttention `mha` on batch-first (R, N, C) inputs: (out_proj(out), head-summed logits)."""
    C, H = mha.embed_dim, mha.num_heads
    d = C // H
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    n_q, n_k = x_q.shape[1], x_kv.shape[1]
    i = torch.arange(n_q, device=x_q.device)[:, None]
    j = torch.arange(n_k, device=x_q.device)[None, :]
    offset = (sign * (i - j)).double() * pos_scale  # (Nq, Nk) pixels
    omega = torch.pow(10000.0, -torch.arange(0, C, 2, device=x_q.device).double() / C)
    ang = offset[..., None] * omega
    p = torch.stack([ang.sin(), ang.cos()], -1).reshape(n_q, n_k, C).to(x_q.dtype)  # p[i, j] = PE(delta_ij)
    q = (x_q @ w_q.t() + b_q) / math.sqrt(d)
    k = x_kv @ w_k.t() + b_k
    v = x_kv @ w_v.t() + b_v
    qr = (p @ w_q.t() + b_q) / math.sqrt(d)  # (Nq, Nk, C)
    kr = p @ w_k.t() + b_k
    heads = lambda t: t.view(*t.shape[:-1], H, d)  # noqa: E731
    qh, kh, vh, qrh, krh = heads(q), heads(k), heads(v), heads(qr), heads(kr)
    logits = (torch.einsum("rihd,rjhd->rhij", qh, kh) + torch.einsum("rihd,ijhd->rhij", qh, krh)
              + torch.einsum("ijhd,rjhd->rhij", qrh, kh))
    if mask:
        logits = logits.masked_fill(torch.ones(n_q, n_k, dtype=torch.bool, device=x_q.device).triu(1), float("-inf"))
    attn = torch.softmax(logits, -1)
    out = torch.einsum("rhij,rjhd->rihd", attn, vh).reshape(x_q.shape[0], n_q, C)
    return mha.out_proj(out), logits.sum(1)
