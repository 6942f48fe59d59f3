"""Checks of the fast launcher (kernels/common.fast_launch), run in a fresh process by tests/kernels/test_launch.py
with Triton's real compiler for sm_90 and launches recorded (benchmarks/sm90.py). Prints one JSON line.

1. The cache key: for random argument values, equal launch keys imply equal specialisations from Triton's own
   binder (what the compiled kernel depends on).
2. The launch: the fast path calls CompiledKernel.run with the same kernel, grid and arguments as Triton's
   JITFunction.run does for the same call, over a set of shapes, strides, masks and dtypes.
3. The per-signature path (common.signature_launch, what attention_fwd uses): its first call (which records the
   signature) and a second call with other tensors of the same signature issue exactly what fast_launch issues.
"""
import json
import random
import sys

import torch

import benchmarks.sm90 as sm90  # sets TRITON_INTERPRET=0; triton is imported after it, inside the checks


def key_consistency(trials=3000):
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from tlv_fast.kernels import attention as ka
    from tlv_fast.kernels import common
    fn = common._plan(ka._attn_fwd_kernel, [])[0]
    binder = create_function_from_signature(fn.signature, fn.params, make_backend(sm90.TARGET))
    q = torch.randn(1, 2, 16, 16, dtype=torch.bfloat16)  # a real call's argument types, values drawn below
    _, real = ka._common_args(q, q, q, None, None, 0.125, None, 0.0, "ieee", None, q[0])
    real.update(Out=q, Lse=q, stride_ob=1, stride_oh=1, stride_om=1, stride_od=1, BLOCK_M=16, BLOCK_N=16,
                EVEN_M=True, EVEN_N=True, FOLD_SCALE=True)
    rng = random.Random(0)
    buf = torch.empty(4096, dtype=torch.bfloat16)
    def draw(p):
        like = real[p.name]
        if p.is_constexpr:
            return rng.choice([16, 64]) if p.name.startswith(("BLOCK", "HEAD")) else like
        if isinstance(like, torch.Tensor):  # offsets 0 and 8 (16 bytes) are aligned, 1 and 4 are not
            return buf[rng.choice([0, 1, 4, 8]):]
        if isinstance(like, float):
            return rng.random()
        return rng.choice([16, 32, 17, 18, 1, 2**31, 2**40])  # 16/32/2**31 alike, 17/18 alike, 1, 2**40
    base = [draw(p) for p in fn.params]
    seen = {}
    for _ in range(trials):  # a base draw with two parameters redrawn: many draws share a key
        vals = list(base)
        for i in rng.sample(range(len(vals)), 2):
            vals[i] = draw(fn.params[i])
        key = common.launch_key(ka._attn_fwd_kernel, vals)
        _, spec, _ = binder(*vals)
        spec = repr(spec)
        if key in seen and seen[key] != spec:
            return {"ok": False, "key": repr(key), "specialisations": [seen[key], spec]}
        seen[key] = spec
    return {"ok": True, "keys": len(seen), "draws": trials}


def same_launches(full):
    """(number of calls compared, mismatches) between the fast path and Triton's own path."""
    from tlv_fast.kernels import attention as ka
    from tlv_fast.kernels import common
    cases = []
    shapes = ((2, 4, 128, 128, 64, 64), (1, 2, 97, 33, 40, 40), (1, 8, 1, 300, 128, 128), (2, 2, 64, 64, 256, 128))
    for dtype in (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16,):
        for (B, H, nq, nk, d, dv) in shapes if full else shapes[:2]:
            q = torch.randn(B, H, nq, d, dtype=dtype)
            k = torch.randn(B, H, nk, d, dtype=dtype)
            v = torch.randn(B, H, nk, dv, dtype=dtype)
            cases.append((q, k, v, None, None))
            cases.append((q.transpose(1, 2).contiguous().transpose(1, 2), k, v,  # BSHD views
                          torch.ones(B, 1, 1, nk, dtype=torch.bool).expand(B, H, nq, nk), 0))
            cases.append((q[..., 1:, :], k, v, torch.randn(1, H, nq - 1 or 1, nk, dtype=dtype).expand(
                B, H, max(nq - 1, 1), nk) if nq > 1 else None, None))
    packed = torch.randn(1, 4, 50, 32).transpose(1, 2).contiguous().transpose(1, 2)  # (1, H, total, D) of a pack
    cases.append((packed, packed, packed, None, 0, (torch.tensor([0, 20, 50], dtype=torch.int32),) * 2 + (30, 30)))
    compared, mismatches = 0, []
    for q, k, v, mask, causal, *varlen in cases:
        varlen = varlen[0] if varlen else None
        if mask is not None and mask.shape[2] != q.shape[2]:
            mask = None
        out = torch.empty(q.shape[:3] + (v.shape[3],), dtype=q.dtype)
        lse = torch.empty(q.shape[:3])
        B, args = ka._common_args(q, k, v, mask, None, 0.125, causal, 0.0, "ieee", varlen, lse)
        ob, oh, om, od = out.stride()
        args.update(Out=out, Lse=lse, stride_ob=0 if varlen else ob, stride_oh=oh, stride_om=om, stride_od=od,
                    FOLD_SCALE=mask is None)
        bm, bn, warps, stages = common.fixed_tile(ka._attn_fwd_kernel, args)
        meta = {"BLOCK_M": bm, "BLOCK_N": bn}
        grid = ka._grid(args["N_Q"], "BLOCK_M", B * q.shape[1])(meta)
        sm90.LAUNCHES.clear()
        common.fast_launch(ka._attn_fwd_kernel, grid, {**args, **meta}, warps, stages)
        ka._attn_fwd_kernel[grid](**args, **meta, num_warps=warps, num_stages=stages)  # Triton's own path
        # the per-signature path, twice: the recording call, then one with fresh tensors of the same signature
        ka.attention_fwd(q, k, v, out, lse, mask, None, 0.125, causal, 0.0, "ieee", varlen, split_kv=False)
        fresh = [q, k, v, out, lse]  # a packed batch: the same tensors (the cu_seqlens are fixed above)
        if varlen is None:  # new storage, the same strides
            fresh = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t) for t in fresh]
        ka.attention_fwd(*fresh, mask, None, 0.125, causal, 0.0, "ieee", varlen, split_kv=False)
        launches = list(sm90.LAUNCHES)
        (k1, g1, a1), (k2, g2, a2), (k3, g3, a3), (k4, g4, a4) = launches
        compared += 1
        if not _same((k1, g1, a1), (k2, g2, a2)):
            mismatches.append(f"fast_launch {tuple(q.shape)} {q.dtype} mask={mask is not None}")
        if not _same((k1, g1, a1), (k3, g3, a3)):
            mismatches.append(f"signature (recording) {tuple(q.shape)} {q.dtype} mask={mask is not None}")
        swapped = list(a1)
        for old, new in zip((q, k, v, out, lse), fresh):
            swapped = [new if x is old else x for x in swapped]
        if not _same((k1, g1, swapped), (k4, g4, a4)):
            mismatches.append(f"signature (cached) {tuple(q.shape)} {q.dtype} mask={mask is not None}")
    return compared, mismatches


def _view(t):
    """What a kernel sees of a tensor argument: storage address, dtype, shape, strides."""
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _same(a, b):
    (k1, g1, a1), (k2, g2, a2) = a, b
    return k1 is k2 and g1 == g2 and len(a1) == len(a2) and all(
        _view(x) == _view(y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
        else (not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor) and x == y)
        for x, y in zip(a1, a2))


if __name__ == "__main__":
    sm90.install()
    result = {"key": key_consistency(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)}
    result["compared"], result["mismatches"] = same_launches(full="--full" in sys.argv)
    print(json.dumps(result))
