"""Attention benchmark: providers side by side in one run, TFLOP/s in the FlashAttention convention
(fwd = 4 * B * H * Nq * Nk * D, halved for causal; fwd+bwd = 3.5 x fwd)."""
import contextlib
import dataclasses

import torch

import tlv_fast
from tlv_fast import reference

from .common import guarded

METRIC = "tflops"
PROVIDERS = ["eager", "tlv_fast", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex", "fa2"]
CPU_PROVIDERS = ["eager", "tlv_fast", "sdpa"]


def default_preset(device):
    return "milestone" if device == "cuda" else "smoke"


@dataclasses.dataclass
class Case:
    name: str
    B: int
    H: int
    Nq: int
    Nk: int
    D: int
    causal: bool = False
    mask: str = "none"  # "none" | "keypad": a bool (B, 1, 1, Nk) key-padding mask
    mode: str = "fwd"  # "fwd" | "fwd+bwd"
    Hkv: int = 0

    def flops(self):
        f = 4.0 * self.B * self.H * self.Nq * self.Nk * self.D * (0.5 if self.causal else 1.0)
        return f * (3.5 if self.mode == "fwd+bwd" else 1.0)

    def io_bytes(self, elt):
        hkv = self.Hkv or self.H
        return elt * (2 * self.B * self.H * self.Nq * self.D + 2 * self.B * hkv * self.Nk * self.D)


def presets(name):
    modes = ("fwd", "fwd+bwd")
    if name == "milestone":  # the milestone shape: B=4, H=16, N=4096
        return [Case(f"B4 H16 N4096 D{d}{' causal' if c else ''}", 4, 16, 4096, 4096, d, c, mode=m)
                for m in modes for d in (64, 128) for c in (False, True)]
    if name == "sweep":  # 16k tokens per batch, model width 2048, as FlashAttention's benchmarks
        return [Case(f"N{n} D{d}{' causal' if c else ''}", 16384 // n, 2048 // d, n, n, d, c, mode=m)
                for m in modes for d in (64, 128) for c in (False, True) for n in (512, 1024, 2048, 4096, 8192, 16384)]
    if name == "models":
        return [Case("ViT-B/16 B256 H12 N197 D64", 256, 12, 197, 197, 64),
                Case("BERT-base keypad B32 H12 N512 D64", 32, 12, 512, 512, 64, mask="keypad"),
                Case("GPT decode B8 H16 Nq1 Nk8192 D128", 8, 16, 1, 8192, 128),
                Case("STTR B960 H8 N320 D16", 960, 8, 320, 320, 16)]
    if name == "smoke":
        return [Case(f"smoke B1 H2 N64 D32{' causal' if c else ''}", 1, 2, 64, 64, 32, c, mode=m)
                for m in modes for c in (False, True)]
    raise ValueError(f"unknown preset {name!r}: milestone, sweep, models, smoke")


def _inputs(case, dtype, device):
    hkv = case.Hkv or case.H
    grad = case.mode == "fwd+bwd"
    q = torch.randn(case.B, case.H, case.Nq, case.D, device=device, dtype=dtype, requires_grad=grad)
    k = torch.randn(case.B, hkv, case.Nk, case.D, device=device, dtype=dtype, requires_grad=grad)
    v = torch.randn(case.B, hkv, case.Nk, case.D, device=device, dtype=dtype, requires_grad=grad)
    lengths = mask = None
    if case.mask == "keypad":
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(case.Nk // 2, case.Nk + 1, (case.B,), generator=g).to(device)
        mask = (torch.arange(case.Nk, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    return q, k, v, mask, lengths


def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(backend_name)

    def run(q, k, v, mask, causal):
        ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
        with ctx:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return run


def _flex(case, lengths, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if case.causal:
        block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, case.Nq, case.Nk, device=device)
    elif case.mask == "keypad":
        block_mask = create_block_mask(lambda b, h, qi, ki: ki < lengths[b], case.B, None, case.Nq, case.Nk,
                                       device=device)
    return lambda q, k, v, mask, causal: compiled(q, k, v, block_mask=block_mask)


def _fa2():
    from flash_attn import flash_attn_func  # optional: only if the machine has it

    def run(q, k, v, mask, causal):
        if mask is not None:
            raise RuntimeError("flash_attn_func takes no mask")
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)
    return run


def provider_fn(name, case, lengths, device):
    if name == "eager":
        return lambda q, k, v, mask, causal: reference.attention(q, k, v, mask, causal="top_left" if causal else None)
    if name == "tlv_fast":
        backend = "triton" if device == "cuda" else "auto"
        return lambda q, k, v, mask, causal: tlv_fast.attention(q, k, v, causal=causal, attn_mask=mask,
                                                                backend=backend)
    if name.startswith("sdpa"):
        return _sdpa(name.partition("-")[2])
    if name == "flex":
        return _flex(case, lengths, device)
    if name == "fa2":
        return _fa2()
    raise ValueError(f"unknown provider {name!r}")


def run_case(case, provider, dtype, device, bench_ms):
    """One measurement: a dict with ms, TFLOP/s, GB/s (forward I/O floor) and a status."""
    row = {"case": case.name, "provider": provider, "mode": case.mode, "B": case.B, "H": case.H, "Nq": case.Nq,
           "Nk": case.Nk, "D": case.D, "causal": case.causal, "mask": case.mask, "dtype": str(dtype).split(".")[-1],
           "panel": f"{case.mode} D{case.D}{' causal' if case.causal else ''}"
                    f"{' ' + case.mask if case.mask != 'none' else ''}", "size": case.Nk}

    def measure():
        extra = {}
        q, k, v, mask, lengths = _inputs(case, dtype, device)
        fn = provider_fn(provider, case, lengths, device)
        if case.mode == "fwd":
            def step():
                return fn(q, k, v, mask, case.causal)
            with torch.no_grad():
                out = step()
                ms = bench_ms(step, device)
        else:
            out = fn(q, k, v, mask, case.causal)
            dout = torch.randn_like(out)

            def step():
                fn(q, k, v, mask, case.causal).backward(dout)
            ms = bench_ms(step, device, grad_to_none=[q, k, v])
        # guard: the timed provider computes attention (checked on batch 0, head 0 against fp32 eager)
        m0 = mask[:1] if mask is not None else None
        want = reference.attention(*(t.detach()[:1, :1].float() for t in (q, k, v)), m0,
                                   causal="top_left" if case.causal else None)
        extra["max_err"] = (out.detach()[:1, :1].float() - want).abs().max().item()
        return dict(extra, ms=ms, tflops=case.flops() / ms * 1e-9,
                    gbps=case.io_bytes(q.element_size()) / ms * 1e-6 if case.mode == "fwd" else None)

    return guarded(row, measure, device)
