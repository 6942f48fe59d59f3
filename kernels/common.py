"""What every Triton kernel here shares: tile loads/stores with edge checks, the additive-mask tile, the dot that
works around the interpreter's bf16 bug, head-dim padding, and the launch policy (forced tiles for tests, one small
tile under the interpreter, otherwise the kernel's autotune table).

Whether a kernel is interpreted is a property of the kernel object (Triton decides it when the kernel is created,
from TRITON_INTERPRET), so it is read from the object each time it matters, never cached at import.
"""
import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# attn_mask kinds, and how a mask tile is constant along one axis (read 1-D)
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
BCAST_NONE, BCAST_ALONG_B, BCAST_ALONG_A = 0, 1, 2  # (a, b) tile: values vary along both / along a only / b only
# the same codes for use inside @triton.jit functions (globals there must be constexpr)
C_MASK_NONE, C_MASK_BOOL = tl.constexpr(MASK_NONE), tl.constexpr(MASK_BOOL)
C_ALONG_B, C_ALONG_A = tl.constexpr(BCAST_ALONG_B), tl.constexpr(BCAST_ALONG_A)


def interpreted(kernel):
    """True when `kernel` (a @triton.jit function, possibly wrapped by heuristics/autotune) runs in Triton's CPU
    interpreter."""
    fn = kernel
    while not isinstance(fn, (JITFunction, InterpretedFunction)) and hasattr(fn, "fn"):
        fn = fn.fn
    return isinstance(fn, InterpretedFunction)


def block_dim(d):
    """Padded head-dim tile: next power of two, at least 16 (tl.dot needs K >= 16)."""
    return max(16, triton.next_power_of_2(d))


# ----------------------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def load_tile(base, offs_a, offs_b, stride_a, stride_b, N_A, N_B, CHECK_A: tl.constexpr, CHECK_B: tl.constexpr):
    # tile (a, b), zero outside [0, N_A) x [0, N_B) along the axes flagged CHECK_*
    ptrs = base + offs_a[:, None] * stride_a + offs_b[None, :] * stride_b
    if CHECK_A and CHECK_B:
        return tl.load(ptrs, mask=(offs_a[:, None] < N_A) & (offs_b[None, :] < N_B), other=0.0)
    elif CHECK_A:
        return tl.load(ptrs, mask=offs_a[:, None] < N_A, other=0.0)
    elif CHECK_B:
        return tl.load(ptrs, mask=offs_b[None, :] < N_B, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def store_tile(base, val, offs_a, offs_b, stride_a, stride_b, N_A, N_B, CHECK_A: tl.constexpr, CHECK_B: tl.constexpr):
    ptrs = base + offs_a[:, None] * stride_a + offs_b[None, :] * stride_b
    if CHECK_A and CHECK_B:
        tl.store(ptrs, val, mask=(offs_a[:, None] < N_A) & (offs_b[None, :] < N_B))
    elif CHECK_A:
        tl.store(ptrs, val, mask=offs_a[:, None] < N_A)
    elif CHECK_B:
        tl.store(ptrs, val, mask=offs_b[None, :] < N_B)
    else:
        tl.store(ptrs, val)


@triton.jit
def load_vec(base, offs, stride, N, CHECK: tl.constexpr):
    if CHECK:
        return tl.load(base + offs * stride, mask=offs < N, other=0)
    else:
        return tl.load(base + offs * stride)


@triton.jit
def bias_tile(mask_base, offs_a, offs_b, stride_a, stride_b, N_A, N_B,
              MASK_KIND: tl.constexpr, BCAST: tl.constexpr, CHECK_A: tl.constexpr, CHECK_B: tl.constexpr):
    # additive bias in log2 units for a tile (a, b) of a bool (keep) or float (added) mask
    if BCAST == C_ALONG_B:  # one value per a
        m = load_vec(mask_base, offs_a, stride_a, N_A, CHECK_A)[:, None]
    elif BCAST == C_ALONG_A:  # one value per b
        m = load_vec(mask_base, offs_b, stride_b, N_B, CHECK_B)[None, :]
    else:
        m = load_tile(mask_base, offs_a, offs_b, stride_a, stride_b, N_A, N_B, CHECK_A, CHECK_B)
    if MASK_KIND == C_MASK_BOOL:
        return tl.where(m != 0, 0.0, float("-inf"))
    else:
        return m.to(tl.float32) * 1.4426950408889634  # 1/ln 2


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: only under the interpreter, whose bf16 tl.dot is wrong; fp32 math on the bf16 values there
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


def dot_args(kernel, dtype, precision):
    """PRECISION and UPCAST constexprs of `dot` for inputs of `dtype` launched through `kernel`."""
    return dict(PRECISION="tf32" if (precision == "tf32" and dtype == torch.float32) else "ieee",
                UPCAST=interpreted(kernel) and dtype == torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# the backward's first step for softmax attention (FlashAttention-2, Algorithm 2): Delta = rowsum(dO * O) - dLSE
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _delta_kernel(
    Out, DO, DLse, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_lb, stride_lh, stride_lm,
    H, N_Q,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    b = bh // H
    h = bh % H
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    o = load_tile(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, offs_m, offs_d,
                   stride_om, stride_od, N_Q, HEAD_DIM_V, True, HEAD_DIM_V != BLOCK_DV)
    do = load_tile(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh, offs_m, offs_d,
                    stride_dm, stride_dd, N_Q, HEAD_DIM_V, True, HEAD_DIM_V != BLOCK_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        dlse_ptrs = DLse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + offs_m * stride_lm
        delta -= tl.load(dlse_ptrs, mask=offs_m < N_Q, other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)




def backward_delta(out, do, dlse=None):
    """Delta (B, H, Nq) fp32 contiguous = rowsum(dO * O) - dLSE for out, do (B, H, Nq, Dv) of any strides and an
    optional gradient of the logsumexp (B, H, Nq)."""
    B, H, n_q, dv = out.shape
    delta = torch.empty((B, H, n_q), device=out.device, dtype=torch.float32)
    block_dv = block_dim(dv)
    block_m = 16 if interpreted(_delta_kernel) else max(16, min(128, 8192 // block_dv))
    dl = dlse if dlse is not None else delta
    _delta_kernel[(triton.cdiv(n_q, block_m) * B * H,)](
        out, do, dl, delta, *out.stride(), *do.stride(), *dl.stride(), H, n_q,
        HEAD_DIM_V=dv, BLOCK_DV=block_dv, HAS_DLSE=dlse is not None, BLOCK_M=block_m)
    return delta


# ----------------------------------------------------------------------------------------------------------------
# launch policy
# ----------------------------------------------------------------------------------------------------------------
INTERPRETER_TILE = (16, 16, 1, 1)  # (BLOCK_M, BLOCK_N, num_warps, num_stages): small, the interpreter is slow
_forced = []
_tables = {}  # kernel -> (configs, key, prune)
_tuned = {}   # kernel -> its autotuned wrapper, built on first compiled launch


@contextlib.contextmanager
def force_blocks(block_m, block_n, num_warps=4, num_stages=2):
    """Use these tiles for every kernel launched inside the block (skips autotuning)."""
    if block_m < 16 or block_n < 16 or block_m & (block_m - 1) or block_n & (block_n - 1):
        raise ValueError(f"block sizes must be powers of two >= 16, got ({block_m}, {block_n})")
    _forced.append((block_m, block_n, num_warps, num_stages))
    try:
        yield
    finally:
        _forced.pop()


def configs(tuples):
    """[(BLOCK_M, BLOCK_N, num_warps, num_stages), ...] -> triton.Config list."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tuples]


def tuning(kernel, config_tuples, key, prune=None):
    """Declare `kernel`'s autotune table (configs, cache key, optional early prune)."""
    _tables[kernel] = (configs(config_tuples), list(key), prune)
    return kernel


def fixed_tile(kernel):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) when `kernel` runs one tile without autotuning (forced, or
    interpreted), else None."""
    if _forced:
        return _forced[-1]
    if interpreted(kernel):
        return INTERPRETER_TILE
    return None


def launch(kernel, grid, args):
    """Launch `kernel` over grid(meta) (meta holds BLOCK_M / BLOCK_N) with keyword `args`."""
    tile = fixed_tile(kernel)
    if tile is not None:
        bm, bn, warps, stages = tile
        meta = {"BLOCK_M": bm, "BLOCK_N": bn}
        kernel[grid(meta)](**args, **meta, num_warps=warps, num_stages=stages)
        return
    tuned = _tuned.get(kernel)
    if tuned is None:
        table, key, prune = _tables[kernel]
        extra = {"prune_configs_by": {"early_config_prune": prune}} if prune is not None else {}
        tuned = _tuned[kernel] = triton.autotune(table, key=key, **extra)(kernel)
    tuned[grid](**args)
