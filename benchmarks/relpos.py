"""STTR relative-position attention benchmark: eager (reference: gathered positional logits), FlexAttention with
precomputed positional-logit tables read in score_mod, tlv_fast. Reports ms and peak memory (on a GPU torch's
allocator peak; on a CPU the RSS high-water mark of a fresh process running one call, beyond its inputs)."""
import dataclasses
import os

import torch

import tlv_fast
from tlv_fast import formulas, reference

from .common import cpu_peak_mib, guarded, interleaved_rows, needs_cuda

METRIC = "ms"
PROVIDERS = ["tlv_fast", "eager", "flex-table"]
CPU_PROVIDERS = ["tlv_fast", "eager"]


CPU_IS_SPEED = True  # tlv_fast runs the C++ kernel on CPU tensors
CPU_PRESETS = ("cpu", "smoke")


def default_preset(device):
    return "sttr" if device == "cuda" else "cpu"


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
    if name == "cpu":  # 60 epipolar lines of a 480-pixel-wide image at stride 3
        return [Case("60 seq W160 H8 d16", 60, 8, 160, 16, mode=m) for m in modes] + \
               [Case("60 seq W160 H8 d16 mask+logits", 60, 8, 160, 16, True, True, mode=m) for m in modes]
    if name == "smoke":
        return [Case("8 seq W48 H2 d16", 8, 2, 48, 16, mode=m) for m in modes]
    raise ValueError(f"unknown preset {name!r}: sttr, cpu, smoke")


def memory_needed(case, provider, dtype):
    """A rough peak in bytes (see benchmarks.attention.memory_needed): eager forms the (B, H, W, 2W - 1) positional
    logits twice and the W x W logits and softmax; tlv_fast only the outputs (and the head-summed logits)."""
    elt = torch.finfo(dtype).bits // 8
    io = elt * 4 * case.B * case.H * case.W * case.d
    grad = case.mode == "fwd+bwd"
    total = io * (2 if grad else 1) + (4 * case.B * case.W * case.W if case.logits else 0)
    if provider == "eager":
        total += 4 * case.B * case.H * case.W * (2 * (2 * case.W - 1) + 2 * case.W) * (2 if grad else 1)
    return total


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


def _row(case, provider, dtype):
    return {"case": case.name, "provider": provider, "mode": case.mode, "B": case.B, "H": case.H, "W": case.W,
            "d": case.d, "dtype": str(dtype).split(".")[-1], "panel": case.mode, "size": case.W}


def make_inputs(case, dtype, device):
    g = torch.Generator().manual_seed(0)
    shape = (case.B, case.H, case.W, case.d)
    tabs = (2 * case.W - 1, case.H, case.d)
    grad = case.mode == "fwd+bwd"
    q, k, v = ((0.3 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_(grad) for _ in range(3))
    qr, kr = ((0.3 * torch.randn(tabs, generator=g)).to(device, dtype).requires_grad_(grad) for _ in range(2))
    return q, k, v, qr, kr


def make_step(case, provider, inputs, device):
    """step() runs one timed call (forward under no_grad, or forward+backward); returns the forward's outputs."""
    fn = provider_fn(provider, case, device)
    grad_out = []

    def call():
        res = fn(*inputs, 1, case.mask, case.logits)
        return res if case.logits else (res,)
    if case.mode == "fwd":
        def step():
            with torch.no_grad():
                return call()
    else:
        def step():
            outs = call()
            if not grad_out:
                grad_out.extend(torch.randn_like(o).masked_fill(~torch.isfinite(o), 0) for o in outs)
            torch.autograd.backward(outs, grad_out)
            return outs
    return step


def prepare(case, provider, dtype, device):
    inputs = make_inputs(case, dtype, device)
    step = make_step(case, provider, inputs, device)
    outs = step()
    leaves = list(inputs) if case.mode != "fwd" else []

    def finish(ms):
        extra = {}
        q, k, v, qr, kr = inputs
        want = reference.relpos_attention(*(t.detach()[:1].float() for t in (q, k, v)), qr.detach().float(),
                                          kr.detach().float(), 1, case.mask)
        extra["max_err"] = (outs[0].detach()[:1].float() - want).abs().max().item()
        if device == "cpu":
            extra["peak_MiB"] = cpu_peak_mib("relpos", case, provider, dtype)
        return dict(extra, ms=ms)
    return step, leaves, finish


def run_case(case, provider, dtype, device, bench_ms):
    def measure():
        if device != "cuda":
            step, leaves, finish = prepare(case, provider, dtype, device)
            return finish(bench_ms(step, device, grad_to_none=leaves or None))
        inputs = make_inputs(case, dtype, device)
        step = make_step(case, provider, inputs, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        outs = step()
        ms = bench_ms(step, device, grad_to_none=list(inputs) if case.mode != "fwd" else None)
        extra = {"peak_MiB": (torch.cuda.max_memory_allocated() - base) / 2**20}
        q, k, v, qr, kr = inputs
        want = reference.relpos_attention(*(t.detach()[:1].float() for t in (q, k, v)), qr.detach().float(),
                                          kr.detach().float(), 1, case.mask)
        extra["max_err"] = (outs[0].detach()[:1].float() - want).abs().max().item()
        return dict(extra, ms=ms)

    return guarded(_row(case, provider, dtype), measure, device)


def run_interleaved(case, providers, dtype, device, rounds):
    return interleaved_rows(lambda prov: _row(case, prov, dtype), lambda prov: prepare(case, prov, dtype, device),
                            providers, device, rounds)


def peak_call(case, provider, dtype):
    """For benchmarks.common.cpu_peak_mib's fresh process: the inputs, then one call (what the peak measures)."""
    inputs = make_inputs(case, dtype, "cpu")
    step = make_step(case, provider, inputs, "cpu")
    return step
