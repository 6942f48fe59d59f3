"""Batched log-domain Sinkhorn and STTR's optimal-transport head on the csrc ops (``backend="native"``: C++ on CPU
tensors, CUDA kernels on CUDA tensors), with the unrolled iterations' gradient computed in the kernels."""
import math

import torch
from torch import Tensor

from .. import _ext, backends, reference
from ..formulas import dustbin_marginals, empty_transport
from ._common import FLOAT_DTYPES, check_tensor, native_runtime, no_double_backward

_ORDERS = ("col_first", "row_first")
_registered = False


def _acc_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _register():
    """Fake implementations and autograd for the C++ ops (they exist once the library is loaded)."""
    global _registered
    if _registered:
        return

    @torch.library.register_fake("tlv_fast::sinkhorn_fwd")
    def _(scores, log_mu, log_nu, bin_score, iters, col_first, exp_log_scale):
        B, M, N = scores.shape
        bins = int(bin_score is not None)
        acc = _acc_dtype(scores.dtype)
        return (scores.new_empty((B, M + bins, N + bins)), scores.new_empty((B, iters + 1, M + bins), dtype=acc),
                scores.new_empty((B, iters + 1, N + bins), dtype=acc))

    @torch.library.register_fake("tlv_fast::sinkhorn_bwd")
    def _(grad, scores, log_mu, log_nu, bin_score, out, us, vs, col_first, exp_log_scale):
        B, M, N = scores.shape
        bins = int(bin_score is not None)
        d_bin = torch.empty_like(bin_score) if bin_score is not None else scores.new_empty((0,))
        return (scores.new_empty((B, M, N)), scores.new_empty((B, M + bins)), scores.new_empty((B, N + bins)),
                d_bin)

    def setup_context(ctx, inputs, output):
        scores, log_mu, log_nu, bin_score, iters, col_first, exp_log_scale = inputs
        out, us, vs = output
        ctx.save_for_backward(scores, log_mu, log_nu, bin_score, out, us, vs)
        ctx.args = (col_first, exp_log_scale)

    def backward(ctx, grad_out, _grad_us, _grad_vs):  # the potentials are internal outputs: no gradient flows in
        scores, log_mu, log_nu, bin_score, out, us, vs = ctx.saved_tensors
        d_scores, d_mu, d_nu, d_bin = torch.ops.tlv_fast.sinkhorn_bwd(
            grad_out, scores, log_mu, log_nu, bin_score, out, us, vs, *ctx.args)
        return d_scores, d_mu, d_nu, d_bin if bin_score is not None else None, None, None, None

    torch.library.register_autograd("tlv_fast::sinkhorn_fwd", backward, setup_context=setup_context)
    no_double_backward("tlv_fast::sinkhorn_bwd", "sinkhorn / optimal_transport")
    _registered = True


FAMILY = backends.family("sinkhorn", public=("sinkhorn", "optimal_transport"),
                         auto={"cuda": ("native", "reference"), "cpu": ("native", "reference")},
                         features={"zero_marginals": "zero marginals (log_mu or log_nu = -inf)"})
NATIVE = FAMILY.declare(backends.Implementation(
    "sinkhorn", "native", dtypes={"cuda": FLOAT_DTYPES, "cpu": (torch.float32, torch.float64)},
    unsupported=frozenset({"zero_marginals"}), runtime=native_runtime,
    summary="csrc: C++ on CPU, CUDA kernels on GPU",
    notes={"cuda": "16-bit inputs accumulate in fp32", "cpu": "needs a C++ compiler on first use"}))
REFERENCE = FAMILY.declare(backends.Implementation(
    "sinkhorn", "reference", dtypes={"cuda": FLOAT_DTYPES, "cpu": FLOAT_DTYPES}, summary="eager loop"))


def _run(op, scores3, log_mu2, log_nu2, bin_score, iters, col_first, exp_log_scale):
    _ext.load("cuda" if scores3.device.type == "cuda" else "cpu")
    _register()
    return torch.ops.tlv_fast.sinkhorn_fwd(scores3, log_mu2, log_nu2, bin_score, iters, col_first,
                                           exp_log_scale)[0]


def _check_common(op, scores, iters, order):
    check_tensor(op, "scores", scores, 2, "(..., M, N)")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{op}: iters must be an int >= 1, got {iters!r}")
    if order not in _ORDERS:
        raise ValueError(f"{op}: order must be one of {_ORDERS}, got {order!r}")


def sinkhorn(scores, log_mu, log_nu, iters=10, order="col_first", backend="auto"):
    """Entropic optimal transport in the log domain for a batch of independent problems.

    Args:
        scores: (..., M, N) scores S (negative costs); -inf entries are excluded from the plan.
        log_mu: (..., M) log row marginals; log_nu: (..., N) log column marginals; the leading dims of the three
            broadcast together (the result has the broadcast batch shape). A marginal of 0 (log -inf) is a row or
            column without mass: the reference runs those ("auto" moves there with a warning; "native" raises, its
            backward divides by the marginals). Checking for them reads the marginals (one device sync on CUDA).
        iters: number of unrolled iteration pairs, from potentials u = v = 0.
        order: "col_first" (v then u in each iteration, as STTR) or "row_first" (u then v, as SuperGlue).
        backend: "auto" (csrc on CPU and CUDA tensors), "native" (csrc: C++ on CPU tensors, CUDA kernels on CUDA
            tensors) or "reference" (the eager loop in tlv_fast.reference); see tlv_fast.backends.

    Each iteration computes v_j = log_nu_j - logsumexp_i(S_ij + u_i) and u_i = log_mu_i - logsumexp_j(S_ij + v_j)
    in `order`; the result is the log plan S_ij + u_i + v_j, the same numbers (up to rounding) as autograd through
    that Python loop, and so are the gradients with respect to scores, log_mu and log_nu. A row or column with no
    finite score keeps potential 0 (no mass, no NaN). The backward replays the iterations from the stored
    potentials (O(iters (M + N)) per problem) instead of keeping an autograd graph; second-order gradients through
    the native backend raise (the reference has them). M = 0 or N = 0 gives an empty plan.

    Returns:
        (..., M, N) log plan, in the scores' dtype.
    """
    _check_common("sinkhorn", scores, iters, order)
    *sbatch, m, n = scores.shape
    for name, t, size in (("log_mu", log_mu, m), ("log_nu", log_nu, n)):
        if not isinstance(t, Tensor) or t.dtype != scores.dtype or t.device != scores.device:
            raise ValueError(f"sinkhorn: {name} must be a tensor of the scores' dtype {scores.dtype} and device "
                             f"{scores.device}")
        if t.ndim < 1 or t.shape[-1] != size:
            raise ValueError(f"sinkhorn: {name} must be (..., {size}) for scores {tuple(scores.shape)}, got "
                             f"{tuple(t.shape)}")
    try:
        batch = torch.broadcast_shapes(tuple(sbatch), log_mu.shape[:-1], log_nu.shape[:-1])
    except RuntimeError:
        raise ValueError(f"sinkhorn: the batch dims of scores {tuple(sbatch)}, log_mu {tuple(log_mu.shape[:-1])} "
                         f"and log_nu {tuple(log_nu.shape[:-1])} do not broadcast") from None
    # a zero marginal (log = -inf) is a row or column without mass; the native kernels' backward needs them finite
    zero_mass = bool(torch.isneginf(log_mu).any() or torch.isneginf(log_nu).any())
    inputs = backends.Inputs(scores.device, scores.dtype, features=frozenset({"zero_marginals"} if zero_mass else ()))
    chosen = backends.choose("sinkhorn", backend, inputs)
    if chosen == "reference" or m == 0 or n == 0:  # an empty problem has nothing to compute: the formula's shape
        return reference.sinkhorn(scores, log_mu, log_nu, iters, order).expand(*batch, m, n)
    acc = _acc_dtype(scores.dtype)  # marginals and potentials of 16-bit problems are fp32
    scores3 = scores.expand(*batch, m, n).reshape(-1, m, n)
    mu2 = log_mu.to(acc).expand(*batch, m).reshape(-1, m)
    nu2 = log_nu.to(acc).expand(*batch, n).reshape(-1, n)
    out = _run("sinkhorn", scores3, mu2, nu2, None, iters, order == "col_first", None)
    return out.reshape(*batch, m, n)


def optimal_transport(attn, phi, iters=10, backend="auto"):
    """STTR's optimal-transport head (Li et al., 2021, §3.3; SuperGlue's dustbins).

    Args:
        attn: (..., M, N) raw matching scores (STTR: the last cross-attention layer's head-summed logits, -inf where
            masked). M == N == W for STTR.
        phi: the dustbin score, a scalar tensor (learnable: its gradient is computed) or a float.
        iters: Sinkhorn iterations (columns first).
        backend: as in :func:`sinkhorn`.

    The scores are augmented with a dustbin row and column holding phi (in the kernel: the augmented matrix is never
    formed in memory), the marginals are 1/(M+N) per pixel and N/(M+N), M/(M+N) for the dustbins, and the result is
    the plan times M + N, T = exp(log plan + log(M + N)), so that every real row sums to 1. With M = 0 or N = 0
    every real row and column goes to its dustbin (T = 1 there, the corner 0).

    Returns:
        T (..., M+1, N+1), probabilities in attn's dtype.
    """
    _check_common("optimal_transport", attn, iters, "col_first")
    *batch, m, n = attn.shape
    if not isinstance(phi, Tensor):
        phi = torch.tensor(float(phi), dtype=attn.dtype, device=attn.device)
    if phi.numel() != 1:
        raise ValueError(f"optimal_transport: phi must be a scalar, got shape {tuple(phi.shape)}")
    if phi.device != attn.device:
        raise ValueError(f"optimal_transport: phi must be on attn's device {attn.device}, got {phi.device}")
    chosen = backends.choose("optimal_transport", backend, backends.Inputs(attn.device, attn.dtype))
    if m == 0 or n == 0:
        return empty_transport(attn, phi)
    if chosen == "reference":
        return reference.optimal_transport(attn, phi.to(attn.dtype), iters)
    acc = _acc_dtype(attn.dtype)
    log_mu, log_nu = dustbin_marginals(m, n, acc, attn.device)
    b = math.prod(batch)
    out = _run("optimal_transport", attn.reshape(-1, m, n), log_mu.expand(b, m + 1), log_nu.expand(b, n + 1),
               phi.to(acc).reshape(()), iters, True, math.log(m + n))
    return out.reshape(*batch, m + 1, n + 1)
