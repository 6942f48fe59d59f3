"""Attention benchmark: providers side by side in one run, TFLOP/s in the FlashAttention convention
(fwd = 4 * B * H * Nq * Nk * D, halved for causal; fwd+bwd = 3.5 x fwd; a varlen case counts its real lengths).

Cases marked `graph` (the model shapes: small, where host launch overhead shows) are also timed as one CUDA-graph
replay (`graph_ms`, next to do_bench's `ms`). The varlen case is a padded BERT batch: tlv_fast.varlen_attention on
the packed tokens against the other providers on the padded batch with a (B, 1, 1, N) key-padding mask."""
import contextlib
import dataclasses
import importlib.util
import inspect
import math
import os

import torch

import tlv_fast
from tlv_fast import reference

from .common import Unavailable, graph_fields, guarded, interleaved_rows, needs_cuda

METRIC = "tflops"
PROVIDERS = ["tlv_fast", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "flex", "eager", "fa2", "tutorial"]
CPU_PROVIDERS = ["eager", "tlv_fast", "sdpa"]
CUDA_ONLY = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex", "fa2", "tutorial")


CPU_IS_SPEED = True  # tlv_fast runs the C++ kernel on CPU tensors
CPU_PRESETS = ("cpu", "smoke")  # sized for a CPU; the others need a GPU (the runner refuses them without --force)


def default_preset(device):
    return "milestone" if device == "cuda" else "cpu"


@dataclasses.dataclass
class Case:
    name: str
    B: int
    H: int
    Nq: int
    Nk: int
    D: int
    causal: bool = False
    mask: str = "none"  # "none" | "keypad": a bool (B, 1, 1, Nk) key-padding mask | "varlen": the same batch packed
    #                     | "bias-grad": a float (1, H, Nq, Nk) bias that requires grad (its gradient is computed)
    mode: str = "fwd"  # "fwd" | "fwd+bwd"
    Hkv: int = 0
    graph: bool = False  # also time one CUDA-graph replay (forward only)

    def flops(self):
        pairs = self.Nq * self.Nk * self.B
        if self.mask == "varlen":  # the work of the real tokens (the padded providers compute more)
            pairs = sum(n * n for n in lengths_of(self).tolist())
        f = 4.0 * self.H * pairs * self.D * (0.5 if self.causal else 1.0)
        return f * (3.5 if self.mode == "fwd+bwd" else 1.0)

    def io_bytes(self, elt):
        hkv = self.Hkv or self.H
        if self.mask == "varlen":
            tokens = int(lengths_of(self).sum())
            return elt * 2 * tokens * (self.H + hkv) * self.D
        return elt * (2 * self.B * self.H * self.Nq * self.D + 2 * self.B * hkv * self.Nk * self.D)


def memory_needed(case, provider, dtype):
    """A rough peak in bytes of one provider on one case, for the runner's check before a run: the inputs, output
    and (fwd+bwd) their gradients, plus what the provider materialises -- eager and the math paths an Nq x Nk
    score matrix in fp32 and its softmax (twice that kept for a backward), the fused kernels nothing Nq x Nk (a
    float mask's gradient aside)."""
    elt = torch.finfo(dtype).bits // 8
    hkv = case.Hkv or case.H
    io = elt * (2 * case.B * case.H * case.Nq * case.D + 2 * case.B * hkv * case.Nk * case.D)
    scores = 4 * case.B * case.H * case.Nq * case.Nk
    grad = case.mode == "fwd+bwd"
    total = io * (2 if grad else 1)
    if provider == "eager":
        total += scores * (4 if grad else 2)
    elif case.mask == "bias-grad" and grad:
        total += 2 * scores
    return total


def lengths_of(case):
    """The sequence lengths of a keypad case (Nk/2 .. Nk) or a varlen case (Nk/4 .. Nk: 128 .. 512 for BERT's 512),
    drawn from a fixed seed on the CPU, so every provider and every run sees the same batch."""
    g = torch.Generator().manual_seed(0)
    low = case.Nk // 4 if case.mask == "varlen" else case.Nk // 2
    return torch.randint(max(1, low), case.Nk + 1, (case.B,), generator=g)


def presets(name):
    modes = ("fwd", "fwd+bwd")
    if name == "milestone":  # the milestone shape: B=4, H=16, N=4096; every forward first, then fwd+bwd
        return [Case(f"B4 H16 N4096 D{d}{' causal' if c else ''}", 4, 16, 4096, 4096, d, c, mode=m)
                for m in modes for d in (64, 128) for c in (False, True)]
    if name == "sweep":  # 16k tokens per batch, model width 2048, as FlashAttention's benchmarks
        return [Case(f"N{n} D{d}{' causal' if c else ''}", 16384 // n, 2048 // d, n, n, d, c, mode=m)
                for m in modes for d in (64, 128) for c in (False, True) for n in (512, 1024, 2048, 4096, 8192, 16384)]
    if name == "models":  # small shapes: do_bench and a CUDA-graph replay
        return [Case("ViT-B/16 B256 H12 N197 D64", 256, 12, 197, 197, 64, graph=True),
                Case("BERT-base keypad B32 H12 N512 D64", 32, 12, 512, 512, 64, mask="keypad", graph=True),
                Case("BERT-base varlen B32 H12 N128-512 D64", 32, 12, 512, 512, 64, mask="varlen", graph=True),
                Case("GPT decode B8 H16 Nq1 Nk8192 D128", 8, 16, 1, 8192, 128, graph=True),
                Case("STTR B960 H8 N320 D16", 960, 8, 320, 320, 16, graph=True)]
    if name == "cpu":  # sized for a few CPU cores: the model shapes at small batches, every forward first
        cases = [Case("BERT keypad B4 H12 N512 D64", 4, 12, 512, 512, 64, mask="keypad"),
                 Case("ViT B16 H12 N197 D64", 16, 12, 197, 197, 64),
                 Case("GPT causal B2 H12 N1024 D64", 2, 12, 1024, 1024, 64, causal=True),
                 Case("bias with grad B4 H12 N512 D64", 4, 12, 512, 512, 64, mask="bias-grad"),
                 Case("GQA 4:1 causal B2 H16/4 N1024 D64", 2, 16, 1024, 1024, 64, causal=True, Hkv=4)]
        return [dataclasses.replace(c, mode=m) for m in modes for c in cases
                if not (c.mask == "bias-grad" and m == "fwd")]
    if name == "smoke":
        return [Case(f"smoke B1 H2 N64 D32{' causal' if c else ''}", 1, 2, 64, 64, 32, c, mode=m)
                for m in modes for c in (False, True)]
    raise ValueError(f"unknown preset {name!r}: milestone, sweep, models, cpu, smoke")


def tiny(case):
    """The same case (mode, mask, causal, decode's single query) at a size for Triton's interpreter: B, H <= 2,
    N <= 64, D 16 or 32."""
    return dataclasses.replace(case, name=f"{case.name} (tiny)", B=min(case.B, 2), H=min(case.H, 2),
                               Nq=min(case.Nq, 64), Nk=min(case.Nk, 64), D=16 if case.D <= 64 else 32,
                               Hkv=min(case.Hkv, 2))


def _inputs(case, dtype, device):
    hkv = case.Hkv or case.H
    grad = case.mode == "fwd+bwd"
    q = torch.randn(case.B, case.H, case.Nq, case.D, device=device, dtype=dtype, requires_grad=grad)
    k = torch.randn(case.B, hkv, case.Nk, case.D, device=device, dtype=dtype, requires_grad=grad)
    v = torch.randn(case.B, hkv, case.Nk, case.D, device=device, dtype=dtype, requires_grad=grad)
    lengths = mask = None
    if case.mask == "bias-grad":
        mask = torch.randn(1, case.H, case.Nq, case.Nk, device=device, dtype=dtype, requires_grad=True)
    if case.mask in ("keypad", "varlen"):
        lengths = lengths_of(case).to(device)
        mask = (torch.arange(case.Nk, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    return q, k, v, mask, lengths


def _sdpa(backend_name, device):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(backend_name)
    if backend is not None:
        needs_cuda(device)

    def run(q, k, v, mask, causal):
        ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
        try:
            with ctx:
                gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                                        **gqa)
        except RuntimeError as e:  # this backend does not take these inputs (a mask for flash, a head dim...)
            if "No available kernel" in str(e):
                raise Unavailable(f"sdpa-{backend_name} takes no such input") from e
            raise
    return run


def _flex(case, lengths, device):
    needs_cuda(device)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if case.causal:
        block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, case.Nq, case.Nk, device=device)
    elif case.mask in ("keypad", "varlen"):
        block_mask = create_block_mask(lambda b, h, qi, ki: ki < lengths[b], case.B, None, case.Nq, case.Nk,
                                       device=device)
    return lambda q, k, v, mask, causal: compiled(q, k, v, block_mask=block_mask)


def _fa2(device):
    needs_cuda(device)
    from flash_attn import flash_attn_func  # optional: only if the machine has it

    def run(q, k, v, mask, causal):
        if mask is not None:
            raise Unavailable("flash_attn_func takes no mask")
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)
    return run


def _tutorial(device):
    """Triton's fused-attention tutorial (python/tutorials/06-fused-attention.py in Triton's repository), when a copy
    is named by $TLV_TUTORIAL_ATTENTION; the triton package does not ship it."""
    needs_cuda(device)
    path = os.environ.get("TLV_TUTORIAL_ATTENTION", "")
    if not os.path.isfile(path):
        raise Unavailable("tutorial not present (set TLV_TUTORIAL_ATTENTION to 06-fused-attention.py)")
    spec = importlib.util.spec_from_file_location("triton_tutorial_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(q, k, v, mask, causal):
        if mask is not None:
            raise Unavailable("the tutorial takes no mask")
        return module.attention(q, k, v, causal, 1.0 / math.sqrt(q.shape[-1]))
    return run


def _tlv_backend(device):
    """The Triton kernels: compiled on a GPU, through the interpreter on a CPU under TRITON_INTERPRET=1 (the dry
    run); otherwise the backend tlv_fast picks for CPU tensors (the C++ kernel)."""
    return "triton" if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "auto"


def provider_fn(name, case, lengths, device):
    """fn(q, k, v, mask, causal) -> out on the padded (B, H, N, D) batch."""
    if name == "eager":
        return lambda q, k, v, mask, causal: reference.attention(q, k, v, mask, causal="top_left" if causal else None)
    if name == "tlv_fast":
        backend = _tlv_backend(device)
        return lambda q, k, v, mask, causal: tlv_fast.attention(q, k, v, causal=causal, attn_mask=mask,
                                                                backend=backend)
    if name == "sdpa" or name.startswith("sdpa-"):
        return _sdpa(name.partition("-")[2], device)
    if name == "flex":
        return _flex(case, lengths, device)
    if name == "fa2":
        return _fa2(device)
    if name == "tutorial":
        return _tutorial(device)
    raise ValueError(f"unknown provider {name!r}")


def _varlen_call(q, k, v, lengths, causal, device):
    """tlv_fast.varlen_attention on the valid tokens of the padded batch, packed (total, H, D) as FlashAttention's
    varlen functions take them: call() -> packed out, the packed leaves, and out -> batch 0, head 0."""
    if not hasattr(tlv_fast, "varlen_attention"):
        raise Unavailable("no varlen_attention")
    params = inspect.signature(tlv_fast.varlen_attention).parameters
    kw = {"backend": _tlv_backend(device)} if "backend" in params else {}
    if "validate_lengths" in params:  # the lengths built here are right: no host sync in the timed call or graph
        kw["validate_lengths"] = False
    keep = (torch.arange(q.shape[2], device=q.device)[None, :] < lengths[:, None])
    qp, kp, vp = (t.detach().transpose(1, 2)[keep].requires_grad_(t.requires_grad) for t in (q, k, v))
    cu = torch.zeros(len(lengths) + 1, device=q.device, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    longest = int(lengths.max())

    def call():
        return tlv_fast.varlen_attention(qp, kp, vp, cu, cu, longest, longest, causal=causal, **kw)
    n0 = int(lengths[0])
    return call, [qp, kp, vp], lambda out: out[:n0, 0]


def _row(case, provider, dtype):
    return {"case": case.name, "provider": provider, "mode": case.mode, "B": case.B, "H": case.H, "Nq": case.Nq,
            "Nk": case.Nk, "D": case.D, "causal": case.causal, "mask": case.mask, "dtype": str(dtype).split(".")[-1],
            "panel": f"{case.mode} D{case.D}{' causal' if case.causal else ''}"
                     f"{' ' + case.mask if case.mask != 'none' else ''}", "size": case.Nk}


def prepare(case, provider, dtype, device):
    """The timed callable of one provider on one case (fresh inputs; fwd under no_grad, fwd+bwd with the leaves'
    grads reset), the leaves whose grads the timer resets, and finish(ms) -> the row's measured fields (ms, TFLOP/s,
    GB/s, graph_ms for `graph` cases, and the error on batch 0 head 0 against fp32 eager)."""
    q, k, v, mask, lengths = _inputs(case, dtype, device)
    n0 = int(lengths[0]) if case.mask == "varlen" else case.Nq  # batch 0's real query rows
    if case.mask == "varlen" and provider == "tlv_fast":
        call, leaves, head0 = _varlen_call(q, k, v, lengths, case.causal, device)
    else:
        fn = provider_fn(provider, case, lengths, device)

        def call():
            return fn(q, k, v, mask, case.causal)
        leaves = [q, k, v] + ([mask] if case.mask == "bias-grad" else [])

        def head0(out):
            return out[0, 0, :n0]
    if case.mode == "fwd":
        with torch.no_grad():
            out = call()

        def timed():
            with torch.no_grad():
                return call()
    else:
        out = call()
        dout = torch.randn_like(out)

        def timed():
            call().backward(dout)

    def finish(ms):
        extra = {}
        if case.mode == "fwd" and case.graph:
            extra.update(graph_fields(call, device))
        # guard: the timed provider computes attention (checked on batch 0, head 0 against fp32 eager)
        nk0 = n0 if case.mask == "varlen" else case.Nk
        m0 = {"keypad": lambda: mask[:1], "bias-grad": lambda: mask.detach()[:1, :1].float()}.get(case.mask)
        want = reference.attention(q.detach()[:1, :1, :n0].float(), k.detach()[:1, :1, :nk0].float(),
                                   v.detach()[:1, :1, :nk0].float(), m0() if m0 else None,
                                   causal="top_left" if case.causal else None)
        extra["max_err"] = (head0(out.detach()).float() - want[0, 0]).abs().max().item()
        return dict(extra, ms=ms, tflops=case.flops() / ms * 1e-9,
                    gbps=case.io_bytes(q.element_size()) / ms * 1e-6 if case.mode == "fwd" else None)
    return timed, leaves, finish


def run_case(case, provider, dtype, device, bench_ms):
    """One measurement: a dict with ms (do_bench), graph_ms (CUDA graph, forward of `graph` cases), TFLOP/s, GB/s
    (forward I/O floor), the error on batch 0 head 0 against fp32 eager, and a status."""
    def measure():
        timed, leaves, finish = prepare(case, provider, dtype, device)
        return finish(bench_ms(timed, device, grad_to_none=leaves if case.mode != "fwd" else None))

    return guarded(_row(case, provider, dtype), measure, device)


def run_interleaved(case, providers, dtype, device, rounds):
    """The CPU measurement: every provider of one case prepared, warmed up, then timed once per round in turn for
    `rounds` rounds (a shared, noisy machine drifts alike for all of them); ms is each one's median."""
    return interleaved_rows(lambda prov: _row(case, prov, dtype),
                            lambda prov: prepare(case, prov, dtype, device), providers, device, rounds)
