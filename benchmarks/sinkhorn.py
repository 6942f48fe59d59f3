"""Sinkhorn benchmark: batched log-domain Sinkhorn (10 iterations), GB/s against the one-read-one-write floor
(forward: read S, write the plan; forward+backward: also read S and the output gradient, write dS)."""
import dataclasses
import math

import torch

import tlv_fast
from tlv_fast import reference

from .common import guarded, needs_cuda

METRIC = "gbps"
PROVIDERS = ["tlv_fast", "eager", "compiled"]
CPU_PROVIDERS = ["tlv_fast", "eager"]


CPU_IS_SPEED = True  # tlv_fast runs the C++ kernel on CPU tensors
CPU_PRESETS = ("cpu", "smoke")  # sized for a CPU (the C++ path); the others need a GPU


def default_preset(device):
    return "h200" if device == "cuda" else "cpu"


@dataclasses.dataclass
class Case:
    name: str
    B: int
    M: int
    N: int
    iters: int = 10
    mode: str = "fwd"

    def floor_bytes(self, elt):
        return elt * self.B * self.M * self.N * (2 if self.mode == "fwd" else 5)


def presets(name):
    modes = ("fwd", "fwd+bwd")
    if name == "cpu":  # the C++ CPU path against the eager loop
        return [Case("B64 321x321 it10", 64, 321, 321, mode=m) for m in modes]
    if name == "h200":  # the anchor's shape: 960 problems of 321 x 321 (STTR at 960 x 540, stride 3)
        return [Case("B960 321x321 it10", 960, 321, 321, mode=m) for m in modes]
    if name == "sizes":  # one CTA, clusters, streaming
        return [Case(f"B{max(1, 2**22 // (n * n))} {n}x{n} it10", max(1, 2**22 // (n * n)), n, n, mode=m)
                for m in modes for n in (128, 321, 500, 1024, 2048)]
    if name == "smoke":
        return [Case("B4 33x33 it10", 4, 33, 33, mode=m) for m in modes]
    raise ValueError(f"unknown preset {name!r}: cpu, h200, sizes, smoke")


def tiny(case):
    """The same case at smoke size: 2 problems of at most 33 x 33."""
    return dataclasses.replace(case, name=f"{case.name} (tiny)", B=min(case.B, 2), M=min(case.M, 33),
                               N=min(case.N, 33))


def provider_fn(name, device):
    if name == "eager":
        return lambda s, a, b, it: reference.sinkhorn(s, a, b, it)
    if name == "compiled":
        needs_cuda(device)
        return torch.compile(lambda s, a, b, it: reference.sinkhorn(s, a, b, it), dynamic=False)
    if name == "tlv_fast":
        return lambda s, a, b, it: tlv_fast.sinkhorn(s, a, b, it, backend="native")
    raise ValueError(f"unknown provider {name!r}")


def run_case(case, provider, dtype, device, bench_ms):
    row = {"case": case.name, "provider": provider, "mode": case.mode, "B": case.B, "M": case.M, "N": case.N,
           "iters": case.iters, "dtype": str(dtype).split(".")[-1], "panel": case.mode, "size": case.N}

    def measure():
        extra = {}
        g = torch.Generator(device="cpu").manual_seed(0)
        s = (3 * torch.randn(case.B, case.M, case.N, generator=g)).to(device=device, dtype=dtype)
        a = torch.full((case.B, case.M), -math.log(case.M), device=device, dtype=dtype)
        b = torch.full((case.B, case.N), -math.log(case.N), device=device, dtype=dtype)
        fn = provider_fn(provider, device)
        if case.mode == "fwd":
            with torch.no_grad():
                out = fn(s, a, b, case.iters)
                ms = bench_ms(lambda: fn(s, a, b, case.iters), device)
        else:
            s.requires_grad_()
            out = fn(s, a, b, case.iters)
            gout = torch.randn_like(out)
            ms = bench_ms(lambda: fn(s, a, b, case.iters).backward(gout), device, grad_to_none=[s])
        want = reference.sinkhorn(s.detach()[:1].double(), a[:1].double(), b[:1].double(), case.iters)
        extra["max_err"] = (out.detach()[:1].double() - want).abs().max().item()
        return dict(extra, ms=ms, gbps=case.floor_bytes(s.element_size()) / ms * 1e-6)

    return guarded(row, measure, device)
