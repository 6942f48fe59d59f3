"""Drop-in everywhere: the Hugging Face attention backend, patch() of torch.nn.MultiheadAttention, the
F.scaled_dot_product_attention override, fullgraph compile, DDP / FSDP2 training, the GPU CI workflow."""
import os
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tlv_fast
from tlv_fast.models import BERT, GPT, ViT

from helpers import DEVICE, REPO, assert_close


@pytest.fixture
def hf():
    T = pytest.importorskip("transformers", reason="needs transformers")
    T.logging.set_verbosity_error()
    import tlv_fast.integrations.transformers as integration
    return T, integration


def _count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _both(model, run):
    model.set_attn_implementation("sdpa")
    want = run()
    model.set_attn_implementation("tlv_fast")
    return want, run()


@pytest.mark.parametrize("triton", [False, True], ids=["auto", "triton"])
def test_hf_backend_bert_with_padding(hf, monkeypatch, triton):
    T, integration = hf
    if triton:
        monkeypatch.setenv("TLV_FAST_BACKEND", "triton")
    calls = _count_calls(monkeypatch, integration, "scaled_dot_product_attention")
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=48)
    model = T.AutoModel.from_config(cfg, attn_implementation="tlv_fast").to(DEVICE).eval()
    assert model.config._attn_implementation == "tlv_fast"
    ids = torch.randint(0, 97, (3, 13), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    want, got = _both(model, lambda: model(ids, attention_mask=mask).last_hidden_state)
    keep = mask.bool()
    assert_close(got[keep], want[keep], name="bert")
    assert len(calls) == 2  # one per layer: the registered function really ran


def test_hf_backend_gpt2_causal_with_padding(hf, monkeypatch):
    T, integration = hf
    calls = _count_calls(monkeypatch, integration, "scaled_dot_product_attention")
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=48))
    model = model.to(DEVICE).eval()
    ids = torch.randint(0, 97, (3, 11), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    for m in (mask, None):
        want, got = _both(model, lambda: model(ids, attention_mask=m).logits)
        keep = (m if m is not None else torch.ones_like(ids)).bool()
        assert_close(got[keep], want[keep], name="gpt2")
    assert len(calls) == 4


def test_hf_backend_vit(hf, monkeypatch):
    T, integration = hf
    calls = _count_calls(monkeypatch, integration, "scaled_dot_product_attention")
    torch.manual_seed(0)
    model = T.ViTModel(T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64)).to(DEVICE).eval()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    want, got = _both(model, lambda: model(x).last_hidden_state)
    assert_close(got, want, name="vit")
    assert len(calls) == 2


@pytest.mark.parametrize("training", [False, True])
def test_patch_transformer_encoder(monkeypatch, training):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    ref = nn.TransformerEncoder(layer, num_layers=2).to(DEVICE).train(training)
    ours = tlv_fast.patch(nn.TransformerEncoder(layer, num_layers=2).to(DEVICE).train(training), backend="triton")
    ours.load_state_dict(ref.state_dict())
    assert all(type(m.self_attn) is tlv_fast.nn.MultiheadAttention for m in ours.layers)
    from tlv_fast.ops import sdpa as attention_ops
    calls = _count_calls(monkeypatch, attention_ops, "_kernels")
    x = torch.randn(3, 10, 32, device=DEVICE)
    pad = torch.zeros(3, 10, dtype=torch.bool, device=DEVICE)
    pad[1, 6:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(10, device=DEVICE)
    for kw in ({"src_key_padding_mask": pad}, {"mask": causal, "is_causal": True}, {}):
        want, got = ref(x, **kw), ours(x, **kw)
        keep = ~pad if "src_key_padding_mask" in kw else torch.ones_like(pad)
        assert_close(got[keep], want[keep], name="patched encoder")
    assert len(calls) >= 6  # the swapped attention ran (eval mode included: torch's fast path stays off)


@pytest.mark.parametrize("mode", ["eval-no-grad", "eval-grad", "training"])
def test_patched_encoder_zeroes_padding_exactly_where_torch_does(mode):
    """torch's encoder returns 0 at padded positions on its nested-tensor path (eval, no autograd); the patched one
    matches it there and, like torch's regular path, computes them elsewhere."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    ref = nn.TransformerEncoder(layer, num_layers=2).train(mode == "training")
    ours = tlv_fast.patch(nn.TransformerEncoder(layer, num_layers=2).train(mode == "training"))
    tlv_fast.patch(ours)  # twice: one hook
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 10, 32)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 6:] = True
    with torch.set_grad_enabled(mode != "eval-no-grad"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note that nested tensors are a prototype
        want, got = ref(x, src_key_padding_mask=pad), ours(x, src_key_padding_mask=pad)
    assert_close(got[~pad], want[~pad], name="real positions")
    torch_zeroes = bool((want[pad] == 0).all())
    assert torch_zeroes == (mode == "eval-no-grad")
    assert bool((got[pad] == 0).all()) == torch_zeroes


def test_patch_keeps_parameters_sharing_freezing_hooks_and_optimizers():
    torch.manual_seed(0)
    shared = nn.MultiheadAttention(16, 2).to(DEVICE)
    shared.in_proj_weight.requires_grad_(False)
    seen = []
    shared.register_forward_hook(lambda m, args, out: seen.append(1))
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    params = {id(p) for p in model.parameters()}
    count = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    assert tlv_fast.patch(model, backend="reference") is model
    assert model["a"] is model["b"][0] is shared and type(shared) is tlv_fast.nn.MultiheadAttention
    assert {id(p) for p in model.parameters()} == params and sum(p.numel() for p in model.parameters()) == count
    assert not shared.in_proj_weight.requires_grad and shared.out_proj.weight.requires_grad
    before = shared.out_proj.weight.detach().clone()
    x = torch.randn(5, 3, 16, device=DEVICE)
    shared(x, x, x, need_weights=False)[0].square().sum().backward()
    opt.step()
    assert seen and not torch.equal(shared.out_proj.weight, before), "the optimizer built before patch() trains it"
    tlv_fast.patch(model, backend="triton")  # again: only the backend changes
    assert shared.backend == "triton" and {id(p) for p in model.parameters()} == params


class NanoAttention(nn.Module):
    """nanoGPT-style code calling F.scaled_dot_product_attention directly."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, N, C))


def test_sdpa_override_routes_and_falls_back_once(monkeypatch):
    from tlv_fast.ops import sdpa as attention_ops
    calls = _count_calls(monkeypatch, attention_ops, "_kernels")
    model = NanoAttention().to(DEVICE)
    x = torch.randn(2, 9, 32, device=DEVICE)
    want = model(x)
    with tlv_fast.sdpa_override(backend="triton"):
        got = model(x)
    assert len(calls) == 1
    assert_close(got, want, name="override")
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention or len(calls) == 1
    q = torch.randn(2, 1, 4, 5, 8, device=DEVICE)  # batch dims (2, 1) vs (1, 3): torch broadcasts, tlv_fast does not
    k = torch.randn(1, 3, 4, 6, 8, device=DEVICE)
    tlv_fast.backends.forget()  # another test may have seen this pattern already
    with tlv_fast.sdpa_override():
        with pytest.warns(RuntimeWarning, match="falling back"):
            out = F.scaled_dot_product_attention(q, k, k)
        out2 = F.scaled_dot_product_attention(q, k, k)  # same pattern: no second warning
    assert_close(out, F.scaled_dot_product_attention(q, k, k), name="fallback")
    assert torch.equal(out2, out)


@pytest.mark.deep  # not in the quick run (README)
@pytest.mark.parametrize("name", ["gpt", "bert", "vit", "patched-encoder", "sdpa-override"])
def test_fullgraph_compile(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    if name == "gpt":
        model, x = GPT.from_preset("tiny", backend="triton"), torch.randint(0, 256, (2, 12))
    elif name == "bert":
        model, x = BERT.from_preset("tiny", backend="triton"), torch.randint(0, 256, (2, 12))
    elif name == "vit":
        model, x = ViT.from_preset("tiny", backend="triton"), torch.randn(2, 3, 32, 32)
    elif name == "patched-encoder":
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        model, x = tlv_fast.patch(nn.TransformerEncoder(layer, num_layers=2), backend="triton"), torch.randn(2, 7, 32)
    else:
        model, x = NanoAttention(), torch.randn(2, 7, 32)
    model, x = model.to(DEVICE).eval(), x.to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with tlv_fast.sdpa_override(backend="triton") if name == "sdpa-override" else torch.no_grad():
        got, want = compiled(x), model(x)
    if isinstance(got, dict):
        got, want = next(iter(got.values())), next(iter(want.values()))
    assert_close(got, want, name="compiled")


@pytest.mark.deep  # not in the quick run (README)
@pytest.mark.skipif(DEVICE != "cpu", reason="the gloo test runs on CPU processes")
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_training_matches_one_process(mode):
    with tempfile.TemporaryDirectory() as d:
        for attempt in range(2):  # gloo on torch 2.13 rarely aborts a rank at process teardown (~1 run in 30 seen)
            worker = os.path.join(REPO, "tests", "integrations", "dist_worker.py")
            res = subprocess.run([sys.executable, worker, mode, d],
                                 capture_output=True, text=True, cwd=REPO, timeout=600,
                                 env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
            if res.returncode == 0 or "terminate called" not in res.stderr:
                break
            for f in os.listdir(d):
                os.remove(os.path.join(d, f))
        assert res.returncode == 0, res.stderr[-3000:]
        grads = torch.load(os.path.join(d, "grads.pt"))
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", dropout=0.0)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    ((model(ids[:2], labels=ids[:2])["loss"] + model(ids[2:], labels=ids[2:])["loss"]) / 2).backward()
    for k, p in model.named_parameters():
        assert_close(grads[k], p.grad, "bwd", name=k)


def _workflow(name):
    yaml = pytest.importorskip("yaml", reason="needs pyyaml")
    with open(os.path.join(REPO, ".github", "workflows", name)) as f:
        return yaml.safe_load(f)


def test_gpu_workflow_is_valid_yaml_and_runs_the_gpu_check():
    job = _workflow("gpu.yml")["jobs"]["gpu-check"]
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    assert any("benchmarks/gpu_check.sh" in s.get("run", "") for s in job["steps"])
    assert os.path.exists(os.path.join(REPO, "benchmarks", "gpu_check.sh"))


def test_cpu_workflow_runs_the_ci_script_which_lints_then_tests():
    job = _workflow("cpu.yml")["jobs"]["test"]
    assert any(s.get("run", "").strip() == "bash .ci/run" for s in job["steps"])
    with open(os.path.join(REPO, ".ci", "run")) as f:
        lines = [line.strip() for line in f]
    assert lines.index("ruff check .") < lines.index("pytest")
