"""Whole-model benchmark: tlv_fast's BERT / GPT / ViT side by side with Hugging Face transformers (eager and sdpa
attention) built from the same configs with random weights; ms and peak memory."""
import dataclasses

import torch

from tlv_fast.models import BERT, GPT, ViT

from .common import guarded, interleaved_rows

METRIC = "ms"
PROVIDERS = ["tlv_fast", "hf-sdpa", "hf-eager"]
CPU_PROVIDERS = ["tlv_fast", "hf-sdpa"]


CPU_IS_SPEED = True  # on CPU tensors the attention of tlv_fast's models is the C++ kernel
CPU_PRESETS = ("cpu", "smoke")


def default_preset(device):
    return "anchors" if device == "cuda" else "cpu"


@dataclasses.dataclass
class Case:
    name: str
    model: str  # "bert" | "gpt" | "vit"
    preset: str
    B: int
    N: int  # tokens, or image side for ViT
    mode: str = "fwd"  # "fwd" | "fwd+bwd" | "generate" (greedy, `new` tokens after N prompt tokens, KV cache)
    padded: bool = False  # an attention mask with sequence lengths N, 0.8 N, 0.6 N, ... (BERT)
    new: int = 0


def presets(name):
    if name == "anchors":  # the whole-model anchors of benchmarks/RESULTS.md
        return [Case("BERT-base fwd B32 S512", "bert", "bert-base", 32, 512),
                Case("GPT-2 small fwd+bwd B8 S1024", "gpt", "gpt2-117m", 8, 1024, "fwd+bwd"),
                Case("ViT-B/16 fwd B256 224", "vit", "vit-base-16", 256, 224)]
    if name == "cpu":  # sized for a few CPU cores
        return [Case("BERT-base fwd B4 S256 padded", "bert", "bert-base", 4, 256, padded=True),
                Case("GPT-2 small fwd B1 S512", "gpt", "gpt2-117m", 1, 512),
                Case("GPT-2 small generate B1 S32 +64", "gpt", "gpt2-117m", 1, 32, "generate", new=64),
                Case("ViT-B/16 fwd B8 224", "vit", "vit-base-16", 8, 224)]
    if name == "smoke":
        return [Case("BERT tiny fwd B2 S32", "bert", "tiny", 2, 32), Case("GPT tiny fwd+bwd B2 S32", "gpt", "tiny", 2,
                                                                          32, "fwd+bwd"),
                Case("ViT tiny fwd B2 32", "vit", "tiny", 2, 32)]
    raise ValueError(f"unknown preset {name!r}: anchors, cpu, smoke")


def tiny(case):
    """The same model family and mode with the "tiny" config, batch 2 and 32 tokens (a 32-pixel image)."""
    return dataclasses.replace(case, name=f"{case.name} (tiny)", preset="tiny", B=min(case.B, 2), N=32)


def _build(case, provider, dtype, device):
    cls = {"bert": BERT, "gpt": GPT, "vit": ViT}[case.model]
    kw = {"dropout": 0.0} if case.model != "vit" else {}
    if case.model == "bert":  # transformers' BertModel: embeddings, encoder and pooler, no pretraining heads
        kw["pretraining_heads"] = False
    ours = cls.from_preset(case.preset, **kw)
    if provider == "tlv_fast":
        model = ours
    else:
        import transformers as T
        hf_cls = {"bert": T.BertModel, "gpt": T.GPT2LMHeadModel, "vit": T.ViTModel}[case.model]
        cfg = ours.hf_config()
        cfg._attn_implementation = provider.split("-")[1]
        model = hf_cls(cfg)
    return model.to(device=device, dtype=dtype).train(case.mode != "fwd")


def _inputs(case, device, dtype, vocab):
    g = torch.Generator().manual_seed(0)
    if case.model == "vit":
        return {"pixel_values": torch.randn(case.B, 3, case.N, case.N, generator=g).to(device, dtype)}
    ids = torch.randint(0, vocab, (case.B, case.N), generator=g).to(device)
    inputs = {"input_ids": ids, "labels": ids} if case.mode == "fwd+bwd" else {"input_ids": ids}
    if case.padded:
        lengths = torch.tensor([max(1, int(case.N * (1 - 0.2 * (i % 5)))) for i in range(case.B)])
        inputs["attention_mask"] = (torch.arange(case.N)[None, :] < lengths[:, None]).long().to(device)
    return inputs


def _row(case, provider, dtype):
    return {"case": case.name, "provider": provider, "mode": case.mode, "B": case.B, "N": case.N,
            "dtype": str(dtype).split(".")[-1], "panel": case.model, "size": case.N}


def make_step(case, provider, dtype, device):
    model = _build(case, provider, dtype, device)
    inputs = _inputs(case, device, dtype, getattr(model.config, "vocab_size", 0))

    def loss_of(out):
        return out["loss"] if isinstance(out, dict) else out.loss

    if case.mode == "generate":  # greedy, exactly `new` tokens (no early stop at an end-of-text token)
        ids = inputs["input_ids"]
        if provider == "tlv_fast":
            def step():
                with torch.no_grad():
                    return model.generate(ids, case.new, do_sample=False)
        else:
            def step():
                with torch.no_grad():
                    return model.generate(ids, max_new_tokens=case.new, min_new_tokens=case.new, do_sample=False,
                                          eos_token_id=None, pad_token_id=0, use_cache=True)
    elif case.mode == "fwd":
        def step():
            with torch.no_grad():
                return model(**inputs)
    else:
        def step():
            loss_of(model(**inputs)).backward()
    return step


def run_case(case, provider, dtype, device, bench_ms):
    def measure():
        step = make_step(case, provider, dtype, device)
        step()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = bench_ms(step, device)
        extra = {"ms": ms}
        if device == "cuda":
            extra["peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
        return extra

    return guarded(_row(case, provider, dtype), measure, device)


def run_interleaved(case, providers, dtype, device, rounds):
    def prepare(prov):
        step = make_step(case, prov, dtype, device)
        return step, [], lambda ms: {"ms": ms}
    return interleaved_rows(lambda prov: _row(case, prov, dtype), prepare, providers, device, rounds)
