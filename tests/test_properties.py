"""Property-based tests (hypothesis): random shapes, strides, dtypes, masks, causal modes, GQA ratios and backends for
attention, relative-position attention and Sinkhorn, checked against torch (where torch has the op) and against
the reference in float64: values, gradients and where NaN appears.

The examples are derandomised (the same ones every run, so CI is stable) and bounded so that the default run stays
short; TLV_FAST_HYPOTHESIS_EXAMPLES=200 explores more, with fresh examples each run.
"""
import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis", reason="needs hypothesis (the test extra)")
pytestmark = pytest.mark.deep  # randomised sweeps: not in the quick run
st = hypothesis.strategies

import tlv_fast  # noqa: E402
from tlv_fast import reference  # noqa: E402

from helpers import DEVICE, as_truth, assert_fa_rule  # noqa: E402

EXPLORE = int(os.environ.get("TLV_FAST_HYPOTHESIS_EXAMPLES", "0"))


def budget(n):
    return hypothesis.settings(max_examples=EXPLORE or n, deadline=None, derandomize=not EXPLORE,
                               suppress_health_check=list(hypothesis.HealthCheck), database=None)


def _tensor(draw, shape, dtype, layout_seed):
    """A random tensor of `shape`, sometimes a transposed or sliced view (non-contiguous strides)."""
    g = torch.Generator().manual_seed(layout_seed)
    kind = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    if kind == "transposed" and len(shape) == 4:
        t = torch.randn(shape[0], shape[2], shape[1], shape[3], generator=g).transpose(1, 2)
    elif kind == "sliced":
        t = torch.randn(*shape[:-1], shape[-1] + 3, generator=g)[..., 1:shape[-1] + 1]
    else:
        t = torch.randn(*shape, generator=g)
    return t.to(device=DEVICE, dtype=dtype)


@st.composite
def attention_case(draw):
    b, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    nq, nk = draw(st.integers(1, 19)), draw(st.integers(1, 19))
    d, dv = draw(st.sampled_from([8, 16, 24, 40])), draw(st.sampled_from([None, 8, 32]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    seed = draw(st.integers(0, 2**16))
    q = _tensor(draw, (b, hkv * group, nq, d), dtype, seed)
    k = _tensor(draw, (b, hkv, nk, d), dtype, seed + 1)
    v = _tensor(draw, (b, hkv, nk, dv or d), dtype, seed + 2)
    mask_kind = draw(st.sampled_from([None, "key-padding", "bool", "float", "float-broadcast"]))
    g = torch.Generator().manual_seed(seed + 3)
    mask = None
    if mask_kind == "key-padding":
        mask = (torch.rand(b, 1, 1, nk, generator=g) > 0.3).to(DEVICE)
    elif mask_kind == "bool":
        mask = (torch.rand(b, hkv * group, nq, nk, generator=g) > 0.3).to(DEVICE)
    elif mask_kind == "float":
        mask = torch.randn(b, hkv * group, nq, nk, generator=g).to(DEVICE, dtype)
    elif mask_kind == "float-broadcast":
        mask = torch.randn(nq, nk, generator=g).to(DEVICE, dtype)
    causal = draw(st.booleans())
    backend = draw(st.sampled_from(["reference", "triton"]))
    return q, k, v, mask, causal, backend


@budget(30)
@hypothesis.given(attention_case())
def test_sdpa_agrees_with_torch(case):
    q, k, v, mask, causal, backend = case
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    ours = tlv_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa,
                                                 backend=backend)
    # torch rejects a mask together with is_causal; fold the causal mask into a boolean one for it
    tmask = mask
    if causal:
        tri = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=DEVICE).tril()
        tmask = tri if mask is None else (mask & tri if mask.dtype == torch.bool else
                                          mask.masked_fill(~tri, float("-inf")))
    qf, kf, vf = (t.detach().double().requires_grad_() for t in (q, k, v))
    theirs = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=tmask.double() if tmask is not None and
                                            tmask.is_floating_point() else tmask, enable_gqa=gqa)
    # rows without any visible key: torch gives NaN, tlv_fast 0 (documented); compare the rest to torch in fp64
    empty = torch.isnan(theirs).all(-1, keepdim=True)
    assert not torch.isnan(ours).any()
    assert (ours.masked_select(empty) == 0).all()
    want = theirs.masked_fill(empty, 0.0)
    ref = reference.attention(q.detach(), k.detach(), v.detach(), tmask, return_lse=False)
    assert_fa_rule(ours.detach(), ref, want.detach(), q.dtype, "fwd", "out vs torch (fp64)")
    g = torch.randn_like(ours).masked_fill(empty, 0.0)
    grads = torch.autograd.grad(ours, (q, k, v), g)
    truth = torch.autograd.grad(want, (qf, kf, vf), g.double())
    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    ref = reference.attention(qr, kr, vr, tmask)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), g)
    for name, a, r, t in zip(("dq", "dk", "dv"), grads, ref_grads, truth):
        assert_fa_rule(a, r, t, q.dtype, "bwd", name)


@st.composite
def relpos_case(draw):
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    nq, nk, d = draw(st.integers(1, 18)), draw(st.integers(1, 18)), draw(st.sampled_from([8, 16, 24]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    seed = draw(st.integers(0, 2**16))
    q, k, v = (_tensor(draw, (b, h, n, d), dtype, seed + i) * 0.7 for i, n in enumerate((nq, nk, nk)))
    qr, kr = (_tensor(draw, (nq + nk - 1, h, d), dtype, seed + 5 + i) * 0.7 for i in range(2))
    sign, mask = draw(st.sampled_from([1, -1])), draw(st.booleans())
    return [q, k, v, qr, kr], sign, mask and nq == nk


@budget(20)
@hypothesis.given(relpos_case())
def test_relpos_triton_agrees_with_the_fp64_reference(case):
    inputs, sign, mask = case
    inputs = [t.requires_grad_() for t in inputs]
    out, logits = tlv_fast.relpos_attention(*inputs, offset_sign=sign, mask_upper=mask, return_logits=True,
                                            backend="triton")
    ref_out, ref_logits = reference.relpos_attention(*inputs, sign, mask, True)
    truth_in = as_truth(*inputs)
    t_out, t_logits = reference.relpos_attention(*truth_in, sign, mask, True)
    dtype = inputs[0].dtype
    assert_fa_rule(out, ref_out, t_out, dtype, "fwd", "out")
    fin = torch.isfinite(t_logits)
    assert torch.equal(torch.isfinite(logits), fin)
    assert_fa_rule(logits[fin], ref_logits[fin], t_logits[fin], dtype, "fwd", "logits")
    g = torch.randn_like(out)
    gl = torch.randn_like(logits).masked_fill(~fin, 0.0)

    def loss(o, lg):
        return (o.float() * g.float()).sum() + (lg.masked_fill(~fin, 0.0).double() * gl.double()).sum()
    grads = torch.autograd.grad(loss(out, logits), inputs)
    ref_grads = torch.autograd.grad(loss(ref_out, ref_logits), inputs)
    truth = torch.autograd.grad(loss(t_out, t_logits), truth_in)
    for name, a, r, t in zip(("dq", "dk", "dv", "dqr", "dkr"), grads, ref_grads, truth):
        assert_fa_rule(a, r, t, dtype, "bwd", name)


@st.composite
def sinkhorn_case(draw):
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    m, n = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    scores = (3 * torch.randn(*batch, m, n, generator=g)).to(DEVICE, dtype)
    holes = draw(st.sampled_from(["none", "upper", "random"]))
    if holes == "upper" and m and n:
        scores = scores.masked_fill(torch.ones(m, n, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    elif holes == "random":
        scores = scores.masked_fill((torch.rand(*batch, m, n, generator=g) < 0.3).to(DEVICE), float("-inf"))
    log_mu = torch.log_softmax(torch.randn(*batch, m, generator=g), -1).to(DEVICE, dtype) if m else \
        torch.zeros(*batch, 0, device=DEVICE, dtype=dtype)
    log_nu = torch.log_softmax(torch.randn(n, generator=g), -1).to(DEVICE, dtype) if n else \
        torch.zeros(0, device=DEVICE, dtype=dtype)
    iters, order = draw(st.integers(1, 4)), draw(st.sampled_from(["col_first", "row_first"]))
    return scores, log_mu, log_nu, iters, order


@budget(40)
@hypothesis.given(sinkhorn_case())
def test_sinkhorn_native_agrees_with_the_reference(case):
    scores, log_mu, log_nu, iters, order = case
    dtype = scores.dtype
    inputs = [t.requires_grad_() for t in (scores, log_mu, log_nu)]
    out = tlv_fast.sinkhorn(*inputs, iters=iters, order=order, backend="native")
    ref = reference.sinkhorn(*inputs, iters=iters, order=order)
    assert out.shape == ref.shape
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref)) and not torch.isnan(out).any()
    fin = torch.isfinite(ref)
    if not fin.any():
        return
    truth_in = as_truth(*inputs)
    truth = reference.sinkhorn(*truth_in, iters=iters, order=order)
    assert_fa_rule(out[fin], ref[fin], truth[fin], dtype, "fwd", "log plan")
    w = torch.randn_like(out)

    def loss(x):
        return (x.exp() * w.to(x.dtype)).sum()  # through exp: the -inf entries carry no gradient
    grads = torch.autograd.grad(loss(out), inputs)
    ref_grads = torch.autograd.grad(loss(ref), inputs)
    truth_grads = torch.autograd.grad(loss(truth), truth_in)
    for name, a, r, t in zip(("d scores", "d log_mu", "d log_nu"), grads, ref_grads, truth_grads):
        assert not torch.isnan(a).any(), name
        assert_fa_rule(a, r, t, dtype, "bwd", name)
