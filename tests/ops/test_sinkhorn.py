"""Batched log-domain Sinkhorn and STTR's optimal transport: the csrc path (C++ on this machine, CUDA under -m gpu)
against the eager unrolled loop in tlv_fast.reference — values and every gradient, masks, shapes, bad input."""
import math

import pytest
import torch

import tlv_fast
from tlv_fast import formulas, reference

from helpers import DEVICE, as_truth, assert_close, assert_fa_rule

FLOAT_DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]


def _problem(batch, m, n, dtype, mask=None, scale=3.0, device=DEVICE):
    scores = scale * torch.randn(*batch, m, n, dtype=dtype, device=device)
    if mask == "upper":  # STTR's last layer: key j > query i masked
        scores = scores.masked_fill(torch.ones(m, n, dtype=torch.bool, device=device).triu(1), float("-inf"))
    elif mask == "empty":  # a whole row and a whole column without a finite score
        scores[..., 1, :] = float("-inf")
        scores[..., :, 2] = float("-inf")
        scores[..., 0, 0] = float("-inf")
    log_mu = torch.log_softmax(torch.randn(*batch, m, dtype=dtype, device=device), -1)
    log_nu = torch.log_softmax(torch.randn(*batch, n, dtype=dtype, device=device), -1)
    return [t.requires_grad_() for t in (scores, log_mu, log_nu)]


def _check(fn_kernel, fn_ref, inputs, dtype):
    """FA rule on the output and on the gradient of every input, truth = reference in float64."""
    out = fn_kernel(*inputs)
    ref = fn_ref(*inputs)
    truth_inputs = as_truth(*inputs)
    truth = fn_ref(*truth_inputs)
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(out), finite), "-inf pattern differs"
    assert_fa_rule(out[finite], ref[finite], truth[finite], dtype, "fwd", "out")
    g = torch.randn_like(out).masked_fill(~finite, 0.0) if out.dtype != torch.float64 else torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g)
    ref_grads = torch.autograd.grad(ref, inputs, g)
    truth_grads = torch.autograd.grad(truth, truth_inputs, g.double())
    for k, (a, r, t) in enumerate(zip(grads, ref_grads, truth_grads)):
        assert torch.isfinite(a).all(), f"grad {k}: not finite"
        assert a.shape == inputs[k].shape and a.dtype == inputs[k].dtype
        assert_fa_rule(a, r, t, dtype, "bwd", f"grad {k}")
    return out


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("order", ["col_first", "row_first"])
@pytest.mark.parametrize("case", [((3,), 7, 5, None), ((2,), 6, 6, "upper"), ((2, 2), 5, 9, "empty"), ((), 4, 3, None),
                                  ((1,), 1, 1, None), ((2,), 33, 17, "upper")],
                         ids=["MneN", "upper-mask", "empty-row-col", "no-batch", "1x1", "33x17"])
def test_sinkhorn_matches_the_unrolled_loop(case, order, dtype):
    batch, m, n, mask = case
    inputs = _problem(batch, m, n, dtype, mask)
    _check(lambda s, a, b: tlv_fast.sinkhorn(s, a, b, iters=6, order=order),
           lambda s, a, b: reference.sinkhorn(s, a, b, iters=6, order=order), inputs, dtype)


@pytest.mark.parametrize("order", ["col_first", "row_first"])
def test_potentials_that_move_far_between_iterations(order):
    # a diagonal plan cannot meet marginals (1, e^-100) and (e^-100, 1): the potentials move by 100 every iteration,
    # so the C++ path's log-sum-exp shift from the previous iteration overflows fp32 and must fall back to the max
    inf = float("-inf")
    scores = torch.tensor([[[0.0, inf, inf], [inf, 0.0, inf], [inf, inf, 0.5]]], device=DEVICE).repeat(2, 1, 1)
    log_mu = torch.tensor([0.0, -100.0, -1.0], device=DEVICE).repeat(2, 1)
    log_nu = torch.tensor([-100.0, 0.0, -1.0], device=DEVICE).repeat(2, 1)
    inputs = [t.requires_grad_() for t in (scores, log_mu, log_nu)]
    _check(lambda s, a, b: tlv_fast.sinkhorn(s, a, b, iters=8, order=order),
           lambda s, a, b: reference.sinkhorn(s, a, b, iters=8, order=order), inputs, torch.float32)
    _, us, vs = torch.ops.tlv_fast.sinkhorn_fwd(scores.detach(), log_mu.detach(), log_nu.detach(), None, 8,
                                                order == "col_first", None)
    assert (us[:, 2:] - us[:, 1:-1]).abs().max() > 90  # the potentials did travel, beyond fp32's exp range


def test_marginals_broadcast_over_the_batch():
    scores, log_mu, log_nu = _problem((4,), 6, 8, torch.float64)
    mu1 = log_mu[0].detach().requires_grad_()
    _check(lambda s, a, b: tlv_fast.sinkhorn(s, a, b, iters=3), lambda s, a, b: reference.sinkhorn(s, a, b, iters=3),
           [scores, mu1, log_nu], torch.float64)


def test_sinkhorn_strided_scores_read_in_place():
    base = torch.randn(3, 10, 16, dtype=torch.float64, device=DEVICE)
    scores = base[:, 1:8, ::2].detach().requires_grad_()  # (3, 7, 8), non-contiguous
    _, log_mu, log_nu = _problem((3,), 7, 8, torch.float64)
    _check(lambda s, a, b: tlv_fast.sinkhorn(s, a, b), lambda s, a, b: reference.sinkhorn(s, a, b),
           [scores, log_mu, log_nu], torch.float64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("w", [1, 8, 45])
def test_optimal_transport_matches_reference(w, dtype):
    attn = _problem((2,), w, w, dtype, "upper", scale=1.0)[0]
    phi = torch.tensor(0.3, dtype=dtype, device=DEVICE, requires_grad=True)
    T = _check(lambda a, p: tlv_fast.optimal_transport(a, p), lambda a, p: reference.optimal_transport(a, p),
               [attn, phi], dtype)
    assert T.shape == (2, w + 1, w + 1)
    # every real left pixel's row sums to 1 (the row update comes last); the dustbin row carries W
    assert_close(T[:, :w].sum(-1), torch.ones(2, w, dtype=dtype, device=DEVICE), name="real rows sum to 1")
    assert_close(T[:, w].sum(-1), torch.full((2,), float(w), dtype=dtype, device=DEVICE), name="dustbin row")
    assert torch.all(T[:, :w, :w][..., torch.ones(w, w, dtype=torch.bool, device=DEVICE).triu(1)] == 0)


def test_gradcheck_float64():
    scores, log_mu, log_nu = _problem((2,), 4, 5, torch.float64)  # finite log plan: finite differences apply
    assert torch.autograd.gradcheck(lambda s, a, b: tlv_fast.sinkhorn(s, a, b, iters=3), (scores, log_mu, log_nu))
    attn = _problem((1,), 4, 4, torch.float64, "upper")[0]
    phi = torch.tensor(-0.4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, p: tlv_fast.optimal_transport(a, p, iters=3), (attn, phi))


def test_module_owns_phi_with_sttr_name():
    ot = tlv_fast.nn.OptimalTransport(iters=10).to(DEVICE)
    assert list(ot.state_dict()) == ["phi"] and ot.phi.shape == () and ot.phi.item() == 0.0
    attn = torch.randn(3, 6, 6, device=DEVICE)
    T = ot(attn)
    T[:, :6, 6].sum().backward()  # mass sent to the dustbin column depends on phi
    assert ot.phi.grad is not None and ot.phi.grad.abs() > 0


def test_opcheck():
    scores, log_mu, log_nu = _problem((2,), 5, 4, torch.float64, "upper")
    tlv_fast.sinkhorn(scores, log_mu, log_nu)  # loads the library
    mu = log_mu.detach().requires_grad_()
    torch.library.opcheck(torch.ops.tlv_fast.sinkhorn_fwd.default, (scores, mu, log_nu, None, 3, True, None))
    phi = torch.tensor(0.1, dtype=torch.float64, device=DEVICE, requires_grad=True)
    lm, ln = formulas.dustbin_marginals(5, 4, torch.float64, DEVICE)
    torch.library.opcheck(torch.ops.tlv_fast.sinkhorn_fwd.default,
                          (scores, lm.expand(2, 6), ln.expand(2, 5), phi, 2, False, math.log(9)))


def test_torch_compile_fullgraph():
    ot = tlv_fast.nn.OptimalTransport(iters=4).to(DEVICE)
    attn = torch.randn(2, 9, 9, device=DEVICE)
    eager = ot(attn)
    torch._dynamo.reset()
    compiled = torch.compile(ot, fullgraph=True, backend="aot_eager")
    assert_close(compiled(attn), eager, name="compiled")


def test_auto_uses_csrc_and_reference_backend_agrees(monkeypatch):
    scores, log_mu, log_nu = _problem((2,), 5, 6, torch.float64)
    from tlv_fast.ops import transport as sk_module
    calls = []
    real = sk_module._run
    monkeypatch.setattr(sk_module, "_run", lambda *a: calls.append(1) or real(*a))
    out = tlv_fast.sinkhorn(scores, log_mu, log_nu)
    assert calls == [1]
    assert_close(out, tlv_fast.sinkhorn(scores, log_mu, log_nu, backend="reference"), name="auto vs reference")
    assert calls == [1]
    with pytest.raises(RuntimeError, match="not implemented"):
        tlv_fast.sinkhorn(scores, log_mu, log_nu, backend="triton")


BAD = [
    (lambda s, a, b: (s[0, 0], a, b), {}, "scores must be"),
    (lambda s, a, b: (s, a[:, :3], b), {}, "log_mu must be"),
    (lambda s, a, b: (s, a, b[:1, :2]), {}, "log_nu must be"),
    (lambda s, a, b: (s, a.float(), b), {}, "log_mu must be a tensor of the scores' dtype"),
    (lambda s, a, b: (s.long(), a, b), {}, "floating"),
    (lambda s, a, b: (s, a, b), {"iters": 0}, "iters"),
    (lambda s, a, b: (s, a, b), {"order": "rows"}, "order"),
    (lambda s, a, b: (s, a[:1].expand(3, 5), b), {}, "batch dims"),
]


@pytest.mark.parametrize("make,kw,match", BAD, ids=[b[2] for b in BAD])
def test_bad_input(make, kw, match):
    scores, log_mu, log_nu = (t.detach() for t in _problem((2,), 5, 4, torch.float64))
    if "batch dims" in match:
        log_mu = log_mu[:1].expand(3, 5)
    else:
        scores, log_mu, log_nu = make(scores, log_mu, log_nu)
    with pytest.raises(ValueError, match=match):
        tlv_fast.sinkhorn(scores, log_mu, log_nu, **kw)


def test_optimal_transport_bad_phi():
    attn = torch.randn(2, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="phi must be a scalar"):
        tlv_fast.optimal_transport(attn, torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="iters"):
        tlv_fast.optimal_transport(attn, 0.0, iters=0)


def test_backward_op_opcheck():
    scores, log_mu, log_nu = (t.detach() for t in _problem((2,), 5, 4, torch.float64, "upper"))
    out, us, vs = torch.ops.tlv_fast.sinkhorn_fwd(scores, log_mu, log_nu, None, 3, True, None)
    torch.library.opcheck(torch.ops.tlv_fast.sinkhorn_bwd.default,
                          (torch.randn_like(out), scores, log_mu, log_nu, None, out, us, vs, True, None),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU dtype gap of the C++ path")
def test_half_on_cpu_falls_back_to_the_reference_with_a_warning():
    scores, log_mu, log_nu = (t.detach().half() for t in _problem((2,), 5, 4, torch.float64))
    with pytest.warns(RuntimeWarning, match="float16"):
        out = tlv_fast.sinkhorn(scores, log_mu, log_nu)
    assert_close(out, reference.sinkhorn(scores, log_mu, log_nu), name="fallback")
    with pytest.raises(RuntimeError, match="float16"):
        tlv_fast.sinkhorn(scores, log_mu, log_nu, backend="native")


# ---- Sinkhorn / optimal transport on CUDA: every launch path (one CTA, clusters, streaming) --------------------
# ---- edge cases: empty problems, broadcast batch dims, zero marginals, second order ---------------------------
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("m,n", [(0, 4), (4, 0), (0, 0)])
def test_empty_problems_give_empty_plans(backend, m, n):
    s = torch.randn(3, m, n, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mu = torch.zeros(3, m, dtype=torch.float64, device=DEVICE)
    nu = torch.zeros(3, n, dtype=torch.float64, device=DEVICE)
    assert tlv_fast.sinkhorn(s, mu, nu, backend=backend).shape == (3, m, n)
    phi = torch.tensor(0.5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    t = tlv_fast.optimal_transport(s, phi, backend=backend)
    want = torch.zeros(3, m + 1, n + 1, dtype=torch.float64, device=DEVICE)
    want[:, :m, n] = 1.0  # real rows and columns go to their dustbins
    want[:, m, :n] = 1.0
    assert torch.equal(t, want)
    ga, gp = torch.autograd.grad(t.sum(), (s, phi))
    assert ga.shape == s.shape and gp.item() == 0.0


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_marginal_batch_dims_broadcast_with_the_scores(backend):
    scores = torch.randn(2, 4, 5, dtype=torch.float64, device=DEVICE)
    log_mu = torch.log_softmax(torch.randn(3, 2, 4, dtype=torch.float64, device=DEVICE), -1)  # more batch dims
    log_nu = torch.full((5,), -math.log(5), dtype=torch.float64, device=DEVICE)
    out = tlv_fast.sinkhorn(scores, log_mu, log_nu, backend=backend)
    assert out.shape == (3, 2, 4, 5)
    assert_close(out, reference.sinkhorn(scores, log_mu, log_nu), name="broadcast")
    with pytest.raises(ValueError, match="do not broadcast"):
        tlv_fast.sinkhorn(scores, log_mu[:, :1].expand(3, 3, 4), log_nu, backend=backend)


def test_zero_marginals_run_on_the_reference_with_a_warning_and_native_says_why():
    scores, log_mu, log_nu = _problem((2,), 4, 5, torch.float64)
    log_mu = log_mu.detach().clone()
    log_mu[0, 1] = float("-inf")  # a row without mass
    tlv_fast.backends.forget()
    with pytest.warns(RuntimeWarning, match="zero marginals"):
        out = tlv_fast.sinkhorn(scores, log_mu, log_nu)
    want = reference.sinkhorn(scores, log_mu, log_nu)
    assert torch.equal(torch.isneginf(out), torch.isneginf(want))
    g, gw = (torch.autograd.grad((o.exp() * torch.arange(20.0, dtype=o.dtype, device=DEVICE).view(4, 5)).sum(),
                                 scores)[0] for o in (out, want))
    assert torch.isfinite(g).all()
    assert_close(g, gw, "bwd", name="d scores")
    with pytest.raises(RuntimeError, match="log_mu or log_nu = -inf"):
        tlv_fast.sinkhorn(scores, log_mu, log_nu, backend="native")


def test_second_order_gradients_raise_on_native_and_work_on_the_reference():
    attn = torch.randn(1, 4, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    (g,) = torch.autograd.grad(tlv_fast.optimal_transport(attn, 0.0, backend="reference").square().sum(), attn,
                               create_graph=True)
    assert torch.autograd.grad(g.sum(), attn)[0].abs().sum() > 0
    (g,) = torch.autograd.grad(tlv_fast.optimal_transport(attn, 0.0, backend="native").square().sum(), attn,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="second-order"):
        g.sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("b,w,dtype", [
    (4, 321, torch.float32),    # 322 x 322 fp32 = 415 KB: a 2-CTA cluster (bwd: 4)
    (4, 321, torch.float16),    # 207 KB: one CTA
    (2, 321, torch.bfloat16),
    (3, 499, torch.float32),    # 1 MB: an 8-CTA cluster
    (2, 1100, torch.float32),   # 4.8 MB: streams from global memory
    (2, 200, torch.float64),
], ids=str)
def test_optimal_transport_cuda_paths(b, w, dtype):
    attn = _problem((b,), w, w, dtype, "upper", scale=1.0)[0]
    phi = torch.tensor(0.2, dtype=torch.float32 if dtype != torch.float64 else dtype, device="cuda",
                       requires_grad=True)
    _check(lambda a, p: tlv_fast.optimal_transport(a, p), lambda a, p: reference.optimal_transport(a, p), [attn, phi],
           dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,order", [(640, 2049, "row_first"), (97, 1, "col_first"), (1, 1, "col_first")], ids=str)
def test_sinkhorn_cuda_odd_shapes(m, n, order):
    inputs = _problem((2,), m, n, torch.float32, None)
    _check(lambda s, a, c: tlv_fast.sinkhorn(s, a, c, iters=5, order=order),
           lambda s, a, c: reference.sinkhorn(s, a, c, iters=5, order=order), inputs, torch.float32)


@pytest.mark.gpu
def test_optimal_transport_cuda_deterministic():
    attn = torch.randn(8, 321, 321, device="cuda", requires_grad=True)
    phi = torch.tensor(0.0, device="cuda", requires_grad=True)
    grads = [torch.autograd.grad(tlv_fast.optimal_transport(attn, phi).square().sum(), (attn, phi)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
