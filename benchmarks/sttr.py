"""STTR end to end: the published architecture with tlv_fast's kernels (relative-position attention in Triton,
Sinkhorn in csrc) against the same model and weights with backend="reference" (eager everything: positional logits
gathered, the Sinkhorn unrolled by autograd). Inference and a training step (AdamW), under fp16 autocast as the
published model was trained (apex O1). Reports median ms and peak memory."""
import dataclasses

import torch

from tlv_fast.models import STTR, sttr_loss
from tlv_fast.stereo.synthetic import synthetic_batch

from .common import cpu_peak_mib, guarded, interleaved_rows

METRIC = "ms"
PROVIDERS = ["tlv_fast", "reference"]
CPU_PROVIDERS = PROVIDERS


CPU_IS_SPEED = True  # on CPU tensors tlv_fast runs its C++ kernels (relative-position attention, Sinkhorn)
CPU_PRESETS = ("cpu", "memory", "smoke")
INTERLEAVED_PRESETS = ("cpu", "memory")  # timed in turns, with the peak memory of a fresh process
CPU_ROUNDS = 2  # the reference takes tens of seconds per call on a CPU


def default_preset(device):
    return "h200" if device == "cuda" else "cpu"


@dataclasses.dataclass
class Case:
    name: str
    H: int
    W: int
    mode: str = "infer"  # or "train"
    preset: str = "sttr"
    stride: int = 3
    batch: int = 1
    chunked: bool = True  # STTRConfig's inference chunking (tokenizer rows, transformer lines, CAL rows) or none


def presets(name):
    if name == "h200":  # 960 x 540 inference side by side, 1080p (target: under 10 GB), a training step on crops
        return [Case("960x540 s3", 540, 960), Case("640x384 s3", 384, 640, "train"),
                Case("1920x1080 s3", 1080, 1920)]
    if name == "cpu":  # the published config at 480 x 270, one inference
        return [Case("480x270 s3", 270, 480)]
    if name == "memory":  # inference memory with and without the inference chunking (run with --providers tlv_fast)
        return [Case("960x540 s3 chunked", 540, 960), Case("960x540 s3 unchunked", 540, 960, chunked=False)]
    if name == "smoke":
        return [Case("192x128 s3 small", 128, 192, preset="small"),
                Case("192x128 s3 small", 128, 192, "train", preset="small")]
    raise ValueError(f"unknown preset {name!r}: h200, cpu, memory, smoke")


def tiny(case):
    """The same mode with the "tiny" config on a 128 x 128 pair (the smallest STTR takes is 121 x 121)."""
    return dataclasses.replace(case, name=f"{case.name} (tiny)", preset="tiny", H=128, W=128)


def _row(case, provider, dtype):
    return {"case": case.name, "provider": provider, "mode": case.mode, "H": case.H, "W": case.W,
            "dtype": str(dtype).split(".")[-1], "panel": case.mode, "size": case.H * case.W}


def make_step(case, provider, dtype, device):
    """The model (fixed seed: both providers get the same weights), its inputs, and step(): one inference, or one
    training step (AdamW)."""
    torch.manual_seed(0)
    backend = "reference" if provider == "reference" else "auto"
    off = {} if case.chunked else dict(tokenizer_chunk_rows=0, transformer_chunk_lines=0, cal_chunk_rows=0)
    model = STTR.from_preset(case.preset, backend=backend, stride=case.stride, **off).to(device)
    data = {k: v.to(device) for k, v in synthetic_batch(case.batch, case.H, case.W, seed=1).items()}
    left, right = STTR.preprocess(data["left"]), STTR.preprocess(data["right"])
    amp = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    if case.mode == "infer":
        model.eval()

        def step():
            with torch.no_grad(), amp:
                return model(left, right)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with amp:
                out = model(left, right)
            loss = sttr_loss(out, data["disp"], data["occ_mask"], data["occ_mask_right"])["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return out
    return step


def _check(out):
    if not torch.isfinite(out["disparity"]).all():
        raise RuntimeError("non-finite disparity")


def run_case(case, provider, dtype, device, bench_ms):
    def measure():
        extra = {}
        step = make_step(case, provider, dtype, device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        _check(step())
        ms = bench_ms(step, device)
        if device == "cuda":
            extra["peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return dict(extra, ms=ms)

    return guarded(_row(case, provider, dtype), measure, device)


def prepare(case, provider, dtype, device):
    step = make_step(case, provider, dtype, device)

    def timed():
        _check(step())

    def finish(ms):
        return {"ms": ms, "peak_MiB": cpu_peak_mib("sttr", case, provider, dtype)}
    return timed, [], finish


def run_interleaved(case, providers, dtype, device, rounds):
    return interleaved_rows(lambda prov: _row(case, prov, dtype), lambda prov: prepare(case, prov, dtype, device),
                            providers, device, min(rounds, CPU_ROUNDS))


def peak_call(case, provider, dtype):
    """For benchmarks.common.cpu_peak_mib's fresh process: model and inputs built, then one step."""
    return make_step(case, provider, dtype, "cpu")
