"""Compile statistics of the attention and relative-position kernels for sm_90 (H100/H200), without a GPU: every
tile the launcher may pick (the pinned one and the autotuner's candidates after pruning), compiled through the same
launch path and specialisations as a real call (benchmarks/sm90.py). Facts about code, not speed.

    python -m benchmarks compile-stats [--dims 64,128] [--dtype bf16] [--which pinned|all] [--out bench_out]

Prints, per kernel and tile: registers, spill bytes, shared memory, wgmma, and the innermost loop's instruction
count with its tensor-core (HGMMA), exp2 (MUFU.EX2) and FP32 (FFMA/FMUL/FADD) instructions; writes a CSV.
"""
import argparse
import os
import sys

import torch

from . import sm90
from .common import environment, write_csv

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _captured_launches(module, call):
    """The (kernel, grid function, args) that `module`'s launch() or signature_launch() receives during call()."""
    seen, real = [], {name: getattr(module, name, None) for name in ("launch", "signature_launch")}

    def by_signature(kernel, key, tensors, build, scalars=None, grid=None):
        grid_fn, args = build()
        seen.append((kernel, grid or grid_fn, {**args, **tensors, **(scalars or {})}))
    module.launch = lambda kernel, grid, args: seen.append((kernel, grid, dict(args)))
    module.signature_launch = by_signature
    try:
        call()
    finally:
        for name, fn in real.items():
            if fn is None:
                delattr(module, name)
            else:
                setattr(module, name, fn)
    return seen


def attention_launches(d, dtype, n=4096, causal=False, mask="none", dropout=0.0, varlen=False):
    """The forward, dK/dV and dQ launches of an attention call (B4 H16 N4096 by default). mask: "none", "keypad"
    (bool (B, 1, 1, N)) or "float" (a float (1, H, N, N) bias whose gradient is formed); varlen: the same batch
    packed (four sequences of n rows, kernels' VARLEN variant)."""
    from tlv_fast.kernels import attention as ka
    B, H = 4, 16
    dtype = DTYPES.get(dtype, dtype)
    if varlen:
        packed = torch.empty((B * n, H, d), dtype=dtype).unsqueeze(0).transpose(1, 2)
        lse = torch.empty(1, H, B * n)
        cu = torch.arange(0, B * n + 1, n, dtype=torch.int32)
        kw = dict(varlen=(cu, cu, n, n))
        fwd = _captured_launches(ka, lambda: ka.attention_fwd(packed, packed, packed, torch.empty_like(packed), lse,
                                                              None, None, d ** -0.5, 0 if causal else None, **kw))
        bwd = _captured_launches(ka, lambda: ka.attention_bwd(
            packed, None, packed, packed, packed, packed, lse, torch.empty_like(packed), torch.empty_like(packed),
            torch.empty_like(packed), None, None, None, d ** -0.5, 0 if causal else None, **kw))
        return fwd + bwd
    q = torch.empty((B, H, n, d), dtype=dtype)
    out, lse = torch.empty_like(q), torch.empty(B, H, n)
    m = dm = None
    if mask == "keypad":
        m = torch.ones(B, 1, 1, n, dtype=torch.bool).expand(B, H, n, n)
    elif mask == "float":
        m = torch.empty(1, H, n, n, dtype=dtype).expand(B, H, n, n)
        dm = torch.empty(B, H, n, n)
    seed = torch.zeros(1, dtype=torch.int64) if dropout else None
    offset = 0 if causal else None
    fwd = _captured_launches(ka, lambda: ka.attention_fwd(q, q, q, out, lse, m, seed, d ** -0.5, offset, dropout))
    bwd = _captured_launches(ka, lambda: ka.attention_bwd(q, None, q, q, q, out, lse, torch.empty_like(q),
                                                          torch.empty_like(q), torch.empty_like(q), dm, m, seed,
                                                          d ** -0.5, offset, dropout))
    return fwd + bwd


def decode_launches(d=128, dtype=torch.bfloat16, B=8, H=16, h_kv=16, n_k=8192):
    """The split-KV launch of one decode step (one query row against an n_k-row cache)."""
    from tlv_fast.kernels import attention as ka
    from tlv_fast.kernels import decode
    dtype = DTYPES.get(dtype, dtype)
    q = torch.empty((B, H, 1, d), dtype=dtype)
    kv = torch.empty((B, h_kv, n_k, d), dtype=dtype)
    return _captured_launches(decode, lambda: ka.attention_fwd(q, kv, kv, torch.empty_like(q), torch.empty(B, H, 1),
                                                              sm_scale=d ** -0.5))


def relpos_launches(dtype=torch.float16):
    from tlv_fast.kernels import relpos_attention as kr
    q = torch.empty(960, 8, 320, 16, dtype=dtype)
    table = torch.empty(639, 8, 16, dtype=dtype)
    out, lse = torch.empty_like(q), torch.empty(960, 8, 320)
    fwd = _captured_launches(kr, lambda: kr.relpos_attention_fwd(q, q, q, table, table, out, lse,
                                                             torch.empty(960, 320, 320), 1, True))
    bwd = _captured_launches(kr, lambda: kr.relpos_attention_bwd(q, torch.empty(960, 320, 320), q, q, q, table, table,
                                                             out, lse, None, torch.empty_like(q),
                                                             torch.empty_like(q), 1, True))
    return fwd + bwd


def candidates(kernel, args, which):
    """[(tile, labels)]: the pinned tile and, with which="all", every config the autotuner keeps after pruning."""
    from tlv_fast.kernels import common
    table, _, prune, pinned = common._tables[kernel]
    pinned_tile = tuple(pinned(args))
    out = {pinned_tile: ["pinned"]}
    if which == "all":
        kept = prune(table, args) if prune is not None else table
        for c in kept:
            tile = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            out.setdefault(tile, []).append("autotune")
    return list(out.items())


def compile_tile(kernel, grid, args, tile):
    """Compile `kernel` with `tile` through the fast launcher (the real specialisations); its CompiledKernel."""
    from tlv_fast.kernels import common
    bm, bn, warps, stages = tile
    meta = {"BLOCK_M": bm, "BLOCK_N": bn}
    sm90.LAUNCHES.clear()
    common.fast_launch(kernel, grid(meta), {**args, **meta}, warps, stages)
    return sm90.LAUNCHES[-1][0]


_KIND = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq"}


def rows(dims=(64, 128), dtype="bf16", which="pinned", relpos=True, causal=(False,), variants=(), decode=True):
    """Compile statistics, one dict per (launch, tile). variants: extra (label, attention_launches kwargs)."""
    sm90.install()
    from tlv_fast.kernels import attention as ka
    from tlv_fast.kernels import common
    out = []
    groups = [(f"attention D{d}{' causal' if c else ''} {dtype}", attention_launches(d, DTYPES[dtype], causal=c))
              for d in dims for c in causal]
    groups += [(label, attention_launches(**kw)) for label, kw in variants]
    if decode:
        groups.append(("decode B8 H16 Nq1 Nk8192 D128 bf16", decode_launches()))
        groups.append(("decode GQA B8 H32/8 Nq1 Nk8192 D128 bf16", decode_launches(H=32, h_kv=8)))
    if relpos:
        groups.append(("relpos STTR 960x320 d16 fp16", relpos_launches()))
    for label, launches in groups:
        for kernel, grid, args in launches:
            if kernel not in common._tables:
                continue
            for tile, tags in candidates(kernel, args, which):
                compiled = compile_tile(kernel, grid, args, tile)
                st = sm90.stats(compiled)
                loop = st["inner_loop"]
                kind = _KIND.get(compiled.metadata.name)
                formula = ka.smem_bytes(kind, tile, args["Q"].element_size(), args["BLOCK_D"], args["BLOCK_DV"],
                                        *ka._mask_smem(args)) if kind else None
                out.append({"case": label, "kernel": compiled.metadata.name, "tile": "x".join(map(str, tile[:2])),
                            "warps": tile[2], "stages": tile[3], "picked_by": "+".join(tags), "regs": st["regs"],
                            "spill_bytes": st["spill_bytes"], "smem_KiB": round(st["smem"] / 1024, 1),
                            "smem_formula_KiB": None if formula is None else round(formula / 1024, 1),
                            "wgmma": st["wgmma"], "loop_instr": loop.get("n", 0), "loop_HGMMA": loop.get("HGMMA", 0),
                            "loop_MUFU.EX2": loop.get("MUFU.EX2", 0),
                            "loop_fp32": sum(loop.get(k, 0) for k in ("FFMA", "FMUL", "FADD"))})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks compile-stats", description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", default="64,128", help="head dims (comma-separated)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--which", default="pinned", choices=["pinned", "all"],
                   help="the pinned tile only, or also every autotune candidate kept after pruning")
    p.add_argument("--causal", action="store_true", help="also the causal variants")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    env = environment()
    print(f"compile statistics for sm_90 (triton {env['triton']}, compiled here without a GPU; not speed)")
    result = rows(tuple(int(d) for d in args.dims.split(",")), args.dtype, args.which,
                  causal=(False, True) if args.causal else (False,))
    cols = ["case", "kernel", "tile", "warps", "stages", "picked_by", "regs", "spill_bytes", "smem_KiB", "wgmma",
            "loop_instr", "loop_HGMMA", "loop_MUFU.EX2", "loop_fp32"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in result:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"CSV: {write_csv(result, os.path.join(args.out, 'compile-stats.csv'))}")
    return 1 if any(r["spill_bytes"] for r in result) else 0


if __name__ == "__main__":
    sys.exit(main())
