"""The arithmetic of the CUDA Sinkhorn forward (csrc/cuda/sinkhorn.cu), emulated on the CPU in float32: the
polynomial exp2 that runs on the FMA pipe (its constants parsed from the kernel source, so that this test cannot
drift from it) and the one-pass log-sum-exp recurrence (previous LSE as the shift, exact recomputation when the sum
leaves its range) against the eager reference, with -inf entries, empty rows and columns and dustbins. These run
everywhere; the kernel itself runs under -m gpu (tests/ops/test_sinkhorn.py)."""
import re

import numpy as np
import pytest
import torch

from tlv_fast import formulas, reference

from helpers import REPO

with open(f"{REPO}/csrc/cuda/sinkhorn.cu") as _f:
    SOURCE = _f.read()


def _block():
    m = re.search(r"// ---- exp2 on the FMA pipe.*?\n(.*?)// ---- end of the exp2 constants", SOURCE, re.S)
    assert m, "the exp2 constants block of csrc/cuda/sinkhorn.cu was not found"
    consts = dict(re.findall(r"constexpr float (kExp2\w+) = ([-+0-9.eE]+)f;", m.group(1)))
    assert set(consts) == {"kExp2C1", "kExp2C2", "kExp2C3", "kExp2C4", "kExp2C5", "kExp2Lo", "kExp2Hi", "kExp2Magic"}
    return {k: np.float32(float(v)) for k, v in consts.items()}


C = _block()
POLY_PERIOD = int(re.search(r"constexpr int kPolyPeriod = (\d+);", SOURCE).group(1))
SUM_LO = np.float32(float(re.search(r"kSumLo = A\(([-+0-9.eE]+)\)", SOURCE).group(1)))
SUM_HI = np.float32(float(re.search(r"kSumHi = A\(([-+0-9.eE]+)\)", SOURCE).group(1)))
CHUNKS = [int(c) for c in re.search(r"kChunkChoices\[\] = \{([0-9, ]+)\}", SOURCE).group(1).split(",")]
F32 = np.float32
LOG2E, LN2 = F32(1.4426950408889634), F32(0.6931471805599453)


def fma32(a, b, c):
    """fmaf: the float64 product of two floats is exact; one rounding of the sum to float32 (a double rounding
    through float64 first, which differs from the single rounding only on exact float32 ties: never met here)."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(F32)


def exp2_poly(x):
    """exp2_poly of sinkhorn.cu, operation by operation in float32 (the exponent add in uint32, modulo 2^32)."""
    x0 = np.asarray(x, F32)
    x = np.where(x0 < C["kExp2Lo"], C["kExp2Lo"], x0)                 # x < lo ? lo : x (NaN stays NaN)
    x = np.where(x > C["kExp2Hi"], C["kExp2Hi"], x).astype(F32)       # x > hi ? hi : x
    t = (np.floor(x.astype(np.float64)) + float(C["kExp2Magic"])).astype(F32)  # __fadd_rd: exact floor + magic
    f = (x - (t - C["kExp2Magic"])).astype(F32)                       # two float32 subtractions
    q = fma32(f, C["kExp2C5"], C["kExp2C4"])
    for k in ("kExp2C3", "kExp2C2", "kExp2C1"):
        q = fma32(f, q, C[k])
    q = fma32(f, q, F32(1.0))
    bits = (q.view(np.uint32).astype(np.uint64) + (t.view(np.uint32).astype(np.uint64) << 23)) & 0xFFFFFFFF
    y = bits.astype(np.uint32).view(F32)
    return fma32(f, F32(0), y)                                        # f * 0 + y: y exactly, NaN for a NaN x


def exp2_mufu(x):
    """MUFU.EX2 with flush-to-zero, up to its ~2 ulp: exp2 rounded to float32, results below 2^-126 flushed."""
    with np.errstate(over="ignore"):
        y = np.exp2(np.asarray(x, np.float64)).astype(F32)
    return np.where(y < F32(2.0 ** -126), F32(0), y).astype(F32)


# ---- the polynomial exp2 -------------------------------------------------------------------------------------------
def test_exp2_poly_relative_error_over_the_kernel_range():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-126, 127, 2_000_001, dtype=F32), rng.uniform(-126, 127, 1_000_000).astype(F32),
                        np.linspace(-1, 1, 1_000_001, dtype=F32), np.arange(-126, 128, dtype=F32),
                        np.nextafter(np.arange(-125, 128, dtype=F32), F32(-200))])  # just below integers
    got = exp2_poly(x).astype(np.float64)
    rel = np.abs(got / np.exp2(x.astype(np.float64)) - 1)
    print(f"exp2_poly max relative error on [-126, 127]: {rel.max():.3e}")
    assert rel.max() < 2e-7
    # integers are exact: p(0) = 1 and the exponent is added exactly
    ints = np.arange(-126, 128, dtype=F32)
    assert np.array_equal(exp2_poly(ints), np.exp2(ints.astype(np.float64)).astype(F32))


def test_exp2_poly_underflow_and_overflow():
    neg = np.array([-np.inf, -1e30, -1000.0, -200.0, -127.0], dtype=F32)
    out = exp2_poly(neg)
    assert np.array_equal(out, np.zeros_like(out)) and not np.signbit(out).any()  # exactly +0, as flush-to-zero
    tiny = exp2_poly(np.linspace(-127, -126, 1001, dtype=F32)[1:-1])
    assert (tiny >= 0).all() and (tiny < F32(2.0 ** -126)).all()  # below the normal range: 0 under flush-to-zero
    big = exp2_poly(np.array([127.0, 128.0, 1e6, np.inf], dtype=F32))
    assert np.isfinite(big).all() and (big > SUM_HI).all()  # clamped to 2^127: the one-pass sum falls back


def test_exp2_poly_propagates_nan_as_mufu():
    nan = np.array([np.nan, -np.nan, np.float32(np.nan) * F32(-1)], dtype=F32)
    assert np.isnan(exp2_poly(nan)).all() and np.isnan(exp2_mufu(nan)).all()
    # the clamp alone (fmaxf returns the other operand) would make a NaN term an exact 0 on the polynomial columns:
    # the kernel clamps by compare-selects that keep a NaN and ends with f * 0 + y (NaN in f, NaN out); the exponent
    # add is unsigned (no signed-shift overflow)
    body = re.search(r"float exp2_poly\(float x\) \{(.*?)\n\}", SOURCE, re.S).group(1)
    assert "x < kExp2Lo ? kExp2Lo : x" in body and "fmaxf" not in body and "return fmaf(f, 0.0f, y);" in body
    assert "__float_as_int" not in body and "__float_as_uint(t) << 23" in body


def test_the_constants_parse_and_the_shared_limits():
    assert C["kExp2Magic"] == 1.5 * 2 ** 23 and C["kExp2Lo"] == -127 and C["kExp2Hi"] == 127
    assert SUM_LO == F32(2.0 ** -64) and SUM_HI == F32(2.0 ** 64) and POLY_PERIOD >= 2


# ---- the one-pass recurrence ---------------------------------------------------------------------------------------
def _chunks(na):
    return next((c for c in CHUNKS if 32 * c >= na), 16)


class Emulated:
    """sinkhorn_fwd_kernel's potentials in float32: the same order of operations per element, exponential unit by
    chunk (column j is lane j % 32 of chunk (j % 32 NCH) // 32; every kPolyPeriod-th chunk uses the polynomial),
    previous LSE (log2) as shift, exact maximum pass when the sum leaves [2^-64, 2^64]. Sums are float64-accumulated
    here (the kernel's summation order differs: two accumulators and a warp tree), which is below fp32 rounding."""

    def __init__(self, S, lmu, lnu):
        self.S = np.asarray(S, F32)
        self.lmu, self.lnu = np.asarray(lmu, F32), np.asarray(lnu, F32)
        ma, na = self.S.shape
        chunk = (np.arange(na) % (32 * _chunks(na))) // 32
        self.poly_col = chunk % POLY_PERIOD == POLY_PERIOD - 1
        self.u, self.v = np.zeros(ma, F32), np.zeros(na, F32)
        self.rsh, self.csh = np.full(ma, np.inf, F32), np.full(na, np.inf, F32)
        self.fallbacks = 0

    def exp2(self, x, poly):
        return np.where(poly, exp2_poly(x), exp2_mufu(x))

    def _lse(self, arg, shift, poly, axis):  # sum of 2^(arg - shift) over axis, float32 terms
        x = (arg - shift).astype(F32)
        return self.exp2(x, poly).astype(np.float64).sum(axis).astype(F32)

    def row_update(self):
        arg = fma32(self.S, LOG2E, (LOG2E * self.v).astype(F32)[None, :])  # fma(S, L, v2)
        for i in range(self.S.shape[0]):
            shift = self.rsh[i]
            if shift == -np.inf:
                self.u[i] = 0
                continue
            s, ok = F32(0), False
            if shift != np.inf:
                s = self._lse(arg[i], shift, self.poly_col, 0)
                ok = not (s < SUM_LO or s > SUM_HI)  # a NaN sum is kept (NaN potential), as the kernel
            if not ok:
                self.fallbacks += shift != np.inf
                shift = np.fmax.reduce(arg[i], initial=-np.inf)  # fmax from -inf: NaN ignored, as the kernel
                if shift != -np.inf:
                    s = self._lse(arg[i], shift, self.poly_col, 0)
            if shift == -np.inf:
                self.u[i], self.rsh[i] = 0, shift
                continue
            shift = F32(shift + np.log2(s, dtype=F32))
            self.rsh[i] = shift
            self.u[i] = F32(self.lmu[i] - F32(LN2 * shift))

    def col_update(self, first):
        u2 = (LOG2E * self.u).astype(F32)[:, None]
        exact = first
        if not exact:
            empty = self.csh == -np.inf
            ns = np.where(np.isfinite(self.csh), -self.csh, F32(0)).astype(F32)
            x = (fma32(self.S, LOG2E, ns[None, :]) + u2).astype(F32)  # fma(S, L, -shift) + u2
            s = self.exp2(x, self.poly_col[None, :]).astype(np.float64).sum(0).astype(F32)
            ok = empty | ~((s < SUM_LO) | (s > SUM_HI))
            exact = not ok.all()
            self.fallbacks += exact
            shift = self.csh
        if exact:
            shift = np.fmax.reduce(fma32(self.S, LOG2E, u2), axis=0, initial=-np.inf).astype(F32)
            ns = np.where(shift == -np.inf, F32(0), -shift).astype(F32)
            x = (fma32(self.S, LOG2E, ns[None, :]) + u2).astype(F32)
            s = self.exp2(x, self.poly_col[None, :]).astype(np.float64).sum(0).astype(F32)
        with np.errstate(divide="ignore"):
            new = np.where(shift == -np.inf, F32(-np.inf), (shift + np.log2(s, dtype=F32)).astype(F32)).astype(F32)
        self.csh = new
        self.v = np.where(new == -np.inf, F32(0), (self.lnu - (LN2 * new).astype(F32)).astype(F32)).astype(F32)

    def run(self, iters, col_first):
        for t in range(1, iters + 1):
            if col_first:
                self.col_update(t == 1)
                self.row_update()
            else:
                self.row_update()
                self.col_update(t == 1)
        return (self.S + self.u[:, None] + self.v[None, :]).astype(F32)


def _compare(S, lmu, lnu, iters, order, atol=2e-5):
    em = Emulated(S.numpy(), lmu.numpy(), lnu.numpy())
    with np.errstate(invalid="ignore"):
        got = torch.from_numpy(em.run(iters, order == "col_first")).double()
    want = reference.sinkhorn(S.double(), lmu.double(), lnu.double(), iters, order)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), "-inf pattern differs"
    err = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= atol * max(1.0, want[finite].abs().max().item()), f"max error {err:.3e}"
    return em


@pytest.mark.parametrize("order", ["col_first", "row_first"])
@pytest.mark.parametrize("m,n,mask", [(7, 5, None), (33, 17, "upper"), (9, 12, "empty"), (40, 70, None),
                                      (1, 1, None)], ids=str)
def test_one_pass_recurrence_matches_the_reference(m, n, mask, order):
    g = torch.Generator().manual_seed(m * 100 + n)
    S = 3.0 * torch.randn(m, n, generator=g)
    if mask == "upper":
        S = S.masked_fill(torch.ones(m, n, dtype=torch.bool).triu(1), float("-inf"))
    elif mask == "empty":
        S[1, :] = float("-inf")
        S[:, 2] = float("-inf")
        S[0, 0] = float("-inf")
    lmu = torch.log_softmax(torch.randn(m, generator=g), -1)
    lnu = torch.log_softmax(torch.randn(n, generator=g), -1)
    _compare(S, lmu, lnu, 6, order)


@pytest.mark.parametrize("w", [8, 45, 321])
def test_one_pass_recurrence_with_dustbins(w):
    g = torch.Generator().manual_seed(w)
    attn = torch.randn(w, w, generator=g).masked_fill(torch.ones(w, w, dtype=torch.bool).triu(1), float("-inf"))
    S = formulas.add_dustbins(attn, torch.tensor(0.3))
    lmu, lnu = formulas.dustbin_marginals(w, w)
    em = _compare(S, lmu, lnu, 10, "col_first")
    assert em.fallbacks == 0  # the previous LSE is a good shift: one pass per half-step after the first


@pytest.mark.parametrize("order", ["col_first", "row_first"])
def test_potentials_that_move_far_take_the_exact_pass(order):
    # as tests/ops/test_sinkhorn.py: marginals (1, e^-100) and (e^-100, 1) move the potentials by ~100 (144 bits) an
    # iteration, beyond the one-pass range: the exact pass must take over, with the same numbers as the reference
    inf = float("-inf")
    S = torch.tensor([[0.0, inf, inf], [inf, 0.0, inf], [inf, inf, 0.5]])
    em = _compare(S, torch.tensor([0.0, -100.0, -1.0]), torch.tensor([-100.0, 0.0, -1.0]), 8, order)
    assert em.fallbacks > 0


@pytest.mark.parametrize("order", ["col_first", "row_first"])
@pytest.mark.parametrize("col", [5, 100], ids=["mufu_column", "poly_column"])
def test_a_nan_score_gives_nan_potentials_on_every_column(order, col, monkeypatch):
    # as the reference: one NaN score makes every potential, and so the whole plan, NaN, whichever exponential unit
    # its column uses (110 columns: NCH 4, column 100 is in chunk 3, the polynomial one; column 5 in chunk 0, MUFU)
    m, n = 9, 110
    assert _chunks(n) == 4 and POLY_PERIOD == 4
    g = torch.Generator().manual_seed(col)
    S = 2.0 * torch.randn(m, n, generator=g)
    S[3, col] = float("nan")
    lmu = torch.log_softmax(torch.randn(m, generator=g), -1)
    lnu = torch.log_softmax(torch.randn(n, generator=g), -1)
    em = Emulated(S.numpy(), lmu.numpy(), lnu.numpy())
    assert em.poly_col[col] == (col == 100)
    for iters in (1, 3):
        em = Emulated(S.numpy(), lmu.numpy(), lnu.numpy())
        with np.errstate(invalid="ignore"):
            got = em.run(iters, order == "col_first")
        want = reference.sinkhorn(S.double(), lmu.double(), lnu.double(), iters, order)
        assert torch.isnan(want).all() and np.isnan(got).all(), (iters, np.isnan(got).mean())
        if iters > 1:  # (after one col_first iteration only v of the NaN column is NaN, as in the reference)
            assert np.isnan(em.u).all() and np.isnan(em.v).all() and np.isnan(em.rsh).all() and np.isnan(em.csh).all()
    if col == 100:  # the test tells: without the select, the polynomial column's NaN term is 0 and nothing is NaN
        poly = exp2_poly
        monkeypatch.setitem(globals(), "exp2_poly",  # the kernel before: fmaxf clamped a NaN to kExp2Lo, a 0 term
                            lambda x: poly(np.fmax(np.asarray(x, F32), C["kExp2Lo"])))
        em = Emulated(S.numpy(), lmu.numpy(), lnu.numpy())
        with np.errstate(invalid="ignore"):
            got = em.run(3, order == "col_first")
        assert not np.isnan(got).all()

