"""STTR relative-position attention benchmark: eager (reference: gathered positional logits), FlexAttention with
precomputed positional-logit tables read in score_mod, tlv_fast. Reports ms and peak memory."""
import dataclasses
import os

import torch

import tlv_fast
from tlv_fast import formulas, reference

from .common import guarded, needs_cuda

METRIC = "ms"
PROVIDERS = ["tlv_fast", "eager", "flex-table"]
CPU_PROVIDERS = ["tlv_fast", "eager"]


def default_preset(device):
    return "sttr" if device == "cuda" else "smoke"


@dataclasses.dataclass
class Case:
    name: str
    B: int
    H: int
    W: int
    d: int
    mask: bool = False
    logits: bool = False
    mode: str = "fwd"


def presets(name):
    modes = ("fwd", "fwd+bwd")
    if name == "sttr":  # 960 x 540 at stride 3: 960 lines (180 rows x 2 images... per call), W' = 320, 8 x 16
        return [Case("960 seq W320 H8 d16", 960, 8, 320, 16, mode=m) for m in modes] + \
               [Case("960 seq W320 H8 d16 mask+logits", 960, 8, 320, 16, True, True, mode=m) for m in modes]
    if name == "smoke":
        return [Case("8 seq W48 H2 d16", 8, 2, 48, 16, mode=m) for m in modes]
    raise ValueError(f"unknown preset {name!r}: sttr, smoke")


def tiny(case):
    """The same case at a size for Triton's interpreter: 2 sequences, 2 heads, W <= 32."""
    return dataclasses.replace(case, name=f"{case.name} (tiny)", B=min(case.B, 2), H=min(case.H, 2),
                               W=min(case.W, 32))


def _flex(case, device):
    needs_cuda(device)
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, qr, kr, sign, mask, logits):
        if logits:
            raise RuntimeError("FlexAttention returns no logits")
        rows = formulas.relpos_rows(case.W, case.W, sign, q.device)
        tq = q @ kr.permute(1, 2, 0)  # (B, H, W, 2W - 1) positional logit tables
        tk = k @ qr.permute(1, 2, 0)

        def score_mod(score, b, h, qi, ki):
            r = rows[qi, ki]
            s = score + tq[b, h, qi, r] + tk[b, h, ki, r]
            return torch.where(ki > qi, float("-inf"), s) if mask else s
        return compiled(q, k, v, score_mod=score_mod, scale=1.0)
    return run


def provider_fn(name, case, device="cuda"):
    if name == "eager":
        return lambda q, k, v, qr, kr, sign, mask, logits: reference.relpos_attention(q, k, v, qr, kr, sign, mask,
                                                                                      logits)
    if name == "tlv_fast":  # the Triton kernel; on a CPU through the interpreter when TRITON_INTERPRET=1 (dry run)
        backend = "triton" if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "auto"
        return lambda q, k, v, qr, kr, sign, mask, logits: tlv_fast.relpos_attention(q, k, v, qr, kr, sign, mask,
                                                                                     logits, backend=backend)
    if name == "flex-table":
        return _flex(case, device)
    raise ValueError(f"unknown provider {name!r}")


def run_case(case, provider, dtype, device, bench_ms):
    row = {"case": case.name, "provider": provider, "mode": case.mode, "B": case.B, "H": case.H, "W": case.W,
           "d": case.d, "dtype": str(dtype).split(".")[-1], "panel": case.mode, "size": case.W}

    def measure():
        extra = {}
        g = torch.Generator().manual_seed(0)
        shape = (case.B, case.H, case.W, case.d)
        tabs = (2 * case.W - 1, case.H, case.d)
        grad = case.mode == "fwd+bwd"
        q, k, v = ((0.3 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_(grad) for _ in range(3))
        qr, kr = ((0.3 * torch.randn(tabs, generator=g)).to(device, dtype).requires_grad_(grad) for _ in range(2))
        fn = provider_fn(provider, case, device)

        def call():
            res = fn(q, k, v, qr, kr, 1, case.mask, case.logits)
            return res if case.logits else (res,)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        if not grad:
            with torch.no_grad():
                outs = call()
                ms = bench_ms(call, device)
        else:
            outs = call()
            gouts = [torch.randn_like(o).masked_fill(~torch.isfinite(o), 0) for o in outs]

            def step():
                torch.autograd.backward(call(), gouts)
            ms = bench_ms(step, device, grad_to_none=[q, k, v, qr, kr])
        if device == "cuda":
            extra["peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        want = reference.relpos_attention(*(t.detach()[:1].float() for t in (q, k, v)), qr.detach().float(),
                                          kr.detach().float(), 1, case.mask)
        extra["max_err"] = (outs[0].detach()[:1].float() - want).abs().max().item()
        return dict(extra, ms=ms)

    return guarded(row, measure, device)
