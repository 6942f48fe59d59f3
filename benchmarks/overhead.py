"""Host overhead per call: everything from the public function to the kernel launch, with the launch itself stubbed
(a stand-in sm_90 driver; the kernels compile once for real). Measured on the CPU, where the host path runs.

    python -m benchmarks overhead [--reps 400] [--out bench_out]

Each row is the median over interleaved repetitions, in microseconds per call, for a cached signature (after the
first call compiled the kernel). Baselines in the same run: a trivial @triton.jit launch through Triton's own path
and two tensor allocations.
"""
import argparse
import os
import statistics
import sys
import time

import torch

from . import sm90  # sets TRITON_INTERPRET=0: triton is imported below, after it
from .common import environment, write_csv


def cases():
    """name -> zero-argument callable. The host path does not depend on sizes, but CPU allocations do (large ones are
    system calls, unlike a GPU's caching allocator), so the tensors stay small: B2 H4 N128 D64 bf16 (64 KB)."""
    import tlv_fast
    from tlv_fast.ops import transport
    q = torch.randn(2, 4, 128, 64, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    qg = q.clone().requires_grad_()
    pad = torch.ones(2, 1, 1, 128, dtype=torch.bool)
    rq = torch.randn(4, 8, 64, 16, dtype=torch.float16)
    table = torch.randn(127, 8, 16, dtype=torch.float16)
    scores = torch.randn(8, 32, 32)
    dq = torch.randn(8, 4, 1, 64, dtype=torch.bfloat16)  # a decode step: one query row, a 1024-row cache, GQA 4/2
    cache = torch.randn(8, 2, 1024, 64, dtype=torch.bfloat16)
    grow_buf = torch.randn(8, 2, 8192, 64, dtype=torch.bfloat16)
    step = [1024]

    def growing():  # a KV cache one row longer at every call (views of one buffer, as GPT.generate's cache)
        step[0] = step[0] + 1 if step[0] < 8000 else 1024
        kv = grow_buf[:, :, :step[0]]
        tlv_fast.attention(dq, kv, kv, backend="triton")
    packed = torch.randn(256, 4, 64, dtype=torch.bfloat16)
    cu = torch.tensor([0, 100, 130, 256], dtype=torch.int32)
    mu, nu = torch.full((8, 32), -32 ** 0.5), torch.full((8, 32), -32 ** 0.5)

    trivial = sm90.trivial_kernel

    def stub_run(op, scores3, *args):  # the C++ op itself is not part of the host path being measured
        return scores3
    transport._run = stub_run

    def nograd(fn):
        def call():
            with torch.no_grad():
                fn()
        return call

    return {
        "attention fwd, no grad": nograd(lambda: tlv_fast.attention(q, k, v, backend="triton")),
        "scaled_dot_product_attention fwd, no grad": nograd(
            lambda: tlv_fast.scaled_dot_product_attention(q, k, v, backend="triton")),
        "attention fwd, key padding mask, no grad": nograd(
            lambda: tlv_fast.attention(q, k, v, attn_mask=pad, backend="triton")),
        "attention fwd, inputs require grad (autograd node)": lambda: tlv_fast.attention(qg, k, v, backend="triton"),
        "attention decode step (split-KV + combine), no grad": nograd(
            lambda: tlv_fast.attention(dq, cache, cache, backend="triton")),
        "attention decode step, cache one row longer each call, no grad": nograd(growing),
        "varlen_attention fwd, no grad (lengths not validated)": nograd(
            lambda: tlv_fast.varlen_attention(packed, packed, packed, cu, cu, 126, 126, backend="triton",
                                              validate_lengths=False)),
        "relpos_attention fwd, no grad": nograd(
            lambda: tlv_fast.relpos_attention(rq, rq, rq, table, table, backend="triton")),
        "sinkhorn (C++ op stubbed), no grad": nograd(lambda: tlv_fast.sinkhorn(scores, mu, nu, backend="native")),
        "baseline: trivial @triton.jit launch (Triton's path)": lambda: trivial[(1,)](q, 16, BLOCK=16),
        "baseline: two tensor allocations": lambda: (torch.empty((2, 4, 128, 64), dtype=torch.bfloat16),
                                                     torch.empty((2, 4, 128))),
    }


def measure(reps=400, rounds=5):
    """{name: median us per call}: `rounds` interleaved passes of `reps` calls each, after a warm-up call."""
    sm90.install()
    calls = cases()
    for fn in calls.values():  # compiles (first call) and warms the caches
        fn()
        fn()
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples[name].append((time.perf_counter() - t0) / reps * 1e6)
    return {name: statistics.median(s) for name, s in samples.items()}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=400, help="calls per timed pass (5 interleaved passes)")
    p.add_argument("--out", default="bench_out", help="folder for the CSV")
    args = p.parse_args(argv)
    env = environment()
    print(f"host overhead per call, launch stubbed (sm_90 compiles), on {env['device']} "
          f"(torch {env['torch']}, triton {env['triton']}); median us over interleaved passes")
    res = measure(args.reps)
    rows = []
    for name, us in res.items():
        print(f"{us:8.1f} us  {name}")
        rows.append({"case": name, "us_per_call": round(us, 2), **env})
    path = write_csv(rows, os.path.join(args.out, "overhead.csv"))
    print(f"CSV: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
