"""What every Triton kernel here shares: tile loads/stores with edge checks, the additive-mask tile, the dot that
works around the interpreter's bf16 bug, head-dim padding, and the launch policy (forced tiles for tests, one small
tile under the interpreter, otherwise a pinned tile through a cached launcher, or the autotune table on request).

Whether a kernel is interpreted is a property of the kernel object (Triton decides it when the kernel is created,
from TRITON_INTERPRET), so it is read from the object each time it matters, never cached at import.
"""
import contextlib
import operator

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime import driver
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from tlv_fast._env import env

# attn_mask kinds, and how a mask tile is constant along one axis (read 1-D)
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
BCAST_NONE, BCAST_ALONG_B, BCAST_ALONG_A = 0, 1, 2  # (a, b) tile: values vary along both / along a only / b only
# the same codes for use inside @triton.jit functions (globals there must be constexpr)
C_MASK_NONE, C_MASK_BOOL = tl.constexpr(MASK_NONE), tl.constexpr(MASK_BOOL)
C_ALONG_B, C_ALONG_A = tl.constexpr(BCAST_ALONG_B), tl.constexpr(BCAST_ALONG_A)


_interpreted = {}


def interpreted(kernel):
    """True when `kernel` (a @triton.jit function, possibly wrapped by heuristics/autotune) runs in Triton's CPU
    interpreter (fixed when the kernel object was created, so remembered per object)."""
    known = _interpreted.get(kernel)
    if known is None:
        fn = kernel
        while not isinstance(fn, (JITFunction, InterpretedFunction)) and hasattr(fn, "fn"):
            fn = fn.fn
        known = _interpreted[kernel] = isinstance(fn, InterpretedFunction)
    return known


def next_pow2(n):
    """Smallest power of two >= n (>= 1); plain Python (triton.next_power_of_2 is a JIT callable, ~2 us a call)."""
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def cdiv(a, b):
    return -(-a // b)


def block_dim(d):
    """Padded head-dim tile: next power of two, at least 16 (tl.dot needs K >= 16)."""
    return max(16, next_pow2(d))


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
    _delta_kernel[(cdiv(n_q, block_m) * B * H,)](
        out, do, dl, delta, *out.stride(), *do.stride(), *dl.stride(), H, n_q,
        HEAD_DIM_V=dv, BLOCK_DV=block_dv, HAS_DLSE=dlse is not None, BLOCK_M=block_m)
    return delta


# ----------------------------------------------------------------------------------------------------------------
# launch policy
#   - force_blocks(): tests pin a tile;
#   - an interpreted kernel runs one small tile (the interpreter is slow);
#   - on a GPU, by default, the kernel's pinned tile (a heuristic of the shapes: no benchmarking, a compile per
#     specialisation only), launched through a per-signature cache of compiled kernels that skips Triton's binder;
#   - TLV_FAST_AUTOTUNE=1 (read at each launch) benchmarks the kernel's config table once per key instead, with the
#     choice cached on disk in Triton's cache (TRITON_CACHE_DIR), so a later process does not repeat it.
# ----------------------------------------------------------------------------------------------------------------
INTERPRETER_TILE = (16, 16, 1, 1)  # (BLOCK_M, BLOCK_N, num_warps, num_stages): small, the interpreter is slow
_forced = []
_tables = {}  # kernel -> (configs, key, prune, pinned)
_tuned = {}   # kernel -> its autotuned wrapper, built on first use


@contextlib.contextmanager
def force_blocks(block_m, block_n, num_warps=4, num_stages=2):
    """Use these tiles for every kernel launched inside the block (skips autotuning and the pinned table)."""
    if block_m < 16 or block_n < 16 or block_m & (block_m - 1) or block_n & (block_n - 1):
        raise ValueError(f"block sizes must be powers of two >= 16, got ({block_m}, {block_n})")
    _forced.append((block_m, block_n, num_warps, num_stages))
    try:
        yield
    finally:
        _forced.pop()


def autotuning():
    """True when TLV_FAST_AUTOTUNE=1: launches benchmark the config table (once per key, cached on disk)."""
    return env("TLV_FAST_AUTOTUNE", "0") == "1"


def configs(tuples):
    """[(BLOCK_M, BLOCK_N, num_warps, num_stages), ...] -> triton.Config list."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tuples]


def tuning(kernel, config_tuples, key, prune=None, pinned=None):
    """Declare `kernel`'s launch table: the configs the autotuner may try, its cache key, an optional early prune,
    and `pinned(args) -> (BLOCK_M, BLOCK_N, num_warps, num_stages)`, the tile used without autotuning (default:
    the first config)."""
    _tables[kernel] = (configs(config_tuples), list(key), prune, pinned or (lambda args: tuple(config_tuples[0])))
    return kernel


def fixed_tile(kernel, args=None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the next launch of `kernel` uses, or None when it autotunes."""
    if _forced:
        return _forced[-1]
    if interpreted(kernel):
        return INTERPRETER_TILE
    if autotuning():
        return None
    return tuple(_tables[kernel][3](args or {}))


def launch(kernel, grid, args):
    """Launch `kernel` over grid(meta) (meta holds BLOCK_M / BLOCK_N) with keyword `args`."""
    tile = fixed_tile(kernel, args)
    if tile is None:
        tuned = _tuned.get(kernel)
        if tuned is None:
            table, key, prune, _ = _tables[kernel]
            extra = {"prune_configs_by": {"early_config_prune": prune}} if prune is not None else {}
            tuned = _tuned[kernel] = triton.autotune(table, key=key, cache_results=True, **extra)(kernel)
        tuned[grid](**args)
        return
    bm, bn, warps, stages = tile
    meta = {"BLOCK_M": bm, "BLOCK_N": bn}
    if interpreted(kernel):
        kernel[grid(meta)](**args, **meta, num_warps=warps, num_stages=stages)
    else:
        fast_launch(kernel, grid(meta), {**args, **meta}, warps, stages)


def launch_untiled(kernel, grid, args, num_warps=4, num_stages=1):
    """Launch a kernel without a tile table (its block sizes are arguments) through the same fast path."""
    if interpreted(kernel):
        kernel[grid](**args, num_warps=num_warps, num_stages=num_stages)
    else:
        fast_launch(kernel, grid, dict(args), num_warps, num_stages)


# ---- the fast launcher: Triton's own launch protocol, without its per-call binder ------------------------------
_jit_info = {}   # kernel -> (JITFunction, [heuristics dicts], {kind: picker of that kind's values})
_compiled = {}   # (JITFunction, device, key) -> CompiledKernel
_recent = {}     # exact argument values seen lately -> CompiledKernel


def _plan(kernel, values):
    """Unwrap heuristics; sort the JIT function's runtime parameters by how Triton specialises them (from the types of
    a first call's values: our launchers always pass the same types per parameter)."""
    heur, fn = [], kernel
    while not isinstance(fn, JITFunction):
        if hasattr(fn, "values"):  # triton.heuristics
            heur.append(fn.values)
        fn = fn.fn
    kinds = {"const": [], "tensor": [], "int": [], "plain": []}
    for i, (p, v) in enumerate(zip(fn.params, values)):
        if p.is_constexpr:
            kinds["const"].append(i)
        elif isinstance(v, torch.Tensor):
            kinds["tensor"].append(i)
        elif isinstance(v, int) and not isinstance(v, bool) and not p.do_not_specialize:
            kinds["int"].append(i)
        else:  # floats, bools, None, unspecialised ints: only their type and width matter
            kinds["plain"].append(i)
    return fn, heur, {k: _picker(idx) for k, idx in kinds.items()}


def _picker(idx):
    """vals -> tuple(vals[i] for i in idx), fast (operator.itemgetter)."""
    if len(idx) >= 2:
        return operator.itemgetter(*idx)
    if len(idx) == 1:
        i = idx[0]
        return lambda vals: (vals[i],)
    return lambda vals: ()


def launch_key(kernel, values):
    """The fast launcher's cache key for the positional `values` of `kernel`'s JIT function: what Triton's binder
    specialises on -- constexpr values, tensor dtypes and 16-byte alignment, integers equal to 1 or divisible by 16,
    integer widths (tests/kernels/test_launch.py checks the key against the binder)."""
    info = _jit_info.get(kernel)
    if info is None:
        info = _jit_info[kernel] = _plan(kernel, values)
    pick = info[2]
    ints = pick["int"](values)
    small = all(-0x80000000 <= v < 0x80000000 for v in ints)
    return (pick["const"](values), tuple((t.dtype, t.data_ptr() & 15 == 0) for t in pick["tensor"](values)),
            tuple((v == 1) + 2 * (v & 15 == 0) for v in ints),
            small or tuple((-0x80000000 <= v < 0x80000000, v < 0x8000000000000000) for v in ints),
            tuple(v if v is None or isinstance(v, bool) else (type(v), -0x80000000 <= v < 0x80000000)
                  if isinstance(v, int) else type(v) for v in pick["plain"](values)))


def _resolve(kernel, kwargs):
    """(JIT function, positional values, pickers) for keyword `kwargs`, the heuristics' constexprs filled in."""
    info = _jit_info.get(kernel)
    if info is None:  # first launch: the heuristics decide some constexprs, so plan from complete values
        fn, heuristics, _ = _plan(kernel, [])
        for values in heuristics:
            for name, rule in values.items():
                kwargs[name] = rule(kwargs)
        info = _jit_info[kernel] = _plan(kernel, [kwargs[name] for name in fn.arg_names])
    else:
        for values in info[1]:
            for name, rule in values.items():
                kwargs[name] = rule(kwargs)
    return info[0], [kwargs[name] for name in info[0].arg_names], info[2]


def _compiled_for(kernel, fn, vals, pick, grid, device, num_warps, num_stages):
    """The CompiledKernel for these values: from the specialisation key, compiling on a miss."""
    key = (fn, device, num_warps, num_stages, launch_key(kernel, vals))
    compiled = _compiled.get(key)
    if compiled is None:
        compiled = fn.run(*vals, grid=grid, warmup=True, num_warps=num_warps, num_stages=num_stages)
        if hasattr(compiled, "result"):  # an asynchronous compile
            compiled = compiled.result()
        _compiled[key] = compiled
    return compiled


def _run(compiled, grid, vals, device):
    stream = driver.active.get_current_stream(device)
    g = tuple(grid) + (1, 1)
    compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata,  # loads on first use
                 compiled.launch_metadata(grid, stream, *vals), knobs.runtime.launch_enter_hook,
                 knobs.runtime.launch_exit_hook, *vals)


def fast_launch(kernel, grid, kwargs, num_warps, num_stages):
    """Launch as JITFunction.run does (the same CompiledKernel.run call, stream and hooks), but find the compiled
    kernel from a cheap key of the arguments' specialisation instead of running Triton's binder on every call."""
    fn, vals, pick = _resolve(kernel, kwargs)
    device = driver.active.get_current_device()
    # first level: the exact non-tensor values and tensor dtypes/alignments (a hit costs a tuple and a hash);
    # second level, on a miss: the specialisation key, which shape changes (a growing KV cache) do not alter
    raw = (device, num_warps, num_stages, pick["const"](vals), pick["int"](vals), pick["plain"](vals),
           tuple((t.dtype, t.data_ptr() & 15) for t in pick["tensor"](vals)))
    compiled = _recent.get(raw)
    if compiled is None:
        compiled = _compiled_for(kernel, fn, vals, pick, grid, device, num_warps, num_stages)
        if len(_recent) > 4096:
            _recent.clear()
        _recent[raw] = compiled
    _run(compiled, grid, vals, device)


# ---- per-signature launches: a call whose non-tensor arguments are all decided by a caller's key ---------------
_signatures = {}  # (device, caller's key) -> (compiled, grid, positional values without tensors, tensor slots)


def signature_launch(kernel, key, tensors, build, scalars=None, grid=None):
    """Launch `kernel` for a call described by `key` with the tensor arguments `tensors` ({parameter: tensor}, every
    tensor parameter of the kernel). `key` must be hashable and determine every other argument (except `scalars`),
    the tensors' dtypes and their 16-byte alignment. On a miss, build() returns (grid function, keyword arguments)
    as for :func:`launch`; on a hit the recorded positional values are reused with this call's tensors put in place:
    no argument dict, no heuristics, no specialisation key. The record holds no tensor.

    scalars: {parameter: int} that change from call to call without changing the compiled kernel (a growing KV
    cache's length): substituted like the tensors, their specialisation (== 1, divisible by 16) added to the key;
    build() must not read them except into the arguments, and `grid` (a function of the tile's meta-parameters,
    called at every launch) must then give the grid. Forced tiles, the interpreter and autotuning go through
    :func:`launch`."""
    scalars = scalars or {}
    if _forced or interpreted(kernel) or autotuning():
        grid_fn, args = build()
        launch(kernel, grid or grid_fn, {**args, **tensors, **scalars})
        return
    device = driver.active.get_current_device()
    if scalars:
        key = (key, tuple((v == 1) + 2 * (v & 15 == 0) for v in scalars.values()))
    entry = _signatures.get((device, key))
    if entry is None:
        grid_fn, args = build()
        args = {**args, **tensors, **scalars}
        bm, bn, warps, stages = fixed_tile(kernel, args)
        meta = {"BLOCK_M": bm, "BLOCK_N": bn}
        fn, vals, pick = _resolve(kernel, {**args, **meta})
        compiled = _compiled_for(kernel, fn, vals, pick, (grid or grid_fn)(meta), device, warps, stages)
        slots = tuple((fn.arg_names.index(name), name) for name in tensors)
        stray = [n for i, n in enumerate(fn.arg_names) if isinstance(vals[i], torch.Tensor) and n not in tensors]
        if stray:
            raise RuntimeError(f"signature_launch: tensor parameters {stray} of {fn.__name__} must be in `tensors`")
        for i, _ in slots:
            vals[i] = None
        if len(_signatures) > 4096:
            _signatures.clear()
        entry = _signatures[(device, key)] = (compiled, None if grid else grid_fn(meta), tuple(vals), slots,
                                              tuple((fn.arg_names.index(name), name) for name in scalars), meta)
    compiled, fixed_grid, vals, slots, scalar_slots, meta = entry
    vals = list(vals)
    for i, name in slots:
        vals[i] = tensors[name]
    for i, name in scalar_slots:
        vals[i] = scalars[name]
    _run(compiled, grid(meta) if grid is not None else fixed_grid, vals, device)
