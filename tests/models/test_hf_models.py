"""BERT, GPT and ViT: parity with Hugging Face transformers (random weights from small configs, no downloads) in
outputs and gradients, weight export back, greedy generation token for token, sampling filters, learning on
synthetic tasks, torch.compile without graph breaks, and the Triton kernel inside each model."""
import pytest
import torch

from tlv_fast.models import BERT, GPT, ViT
from tlv_fast.models.gpt import _pick
from tlv_fast.models.hf import bert_to_hf_state_dict, gpt_to_hf_state_dict, vit_to_hf_state_dict

from helpers import DEVICE, assert_close

T = pytest.importorskip("transformers", reason="needs transformers for the parity tests")
T.logging.set_verbosity_error()


def _close(a, b, name=""):
    assert_close(a, b, name=name)


def _compare_grads(ours_grads_hf_named, hf_model):
    hf_params = dict(hf_model.named_parameters())
    for name, g in ours_grads_hf_named.items():
        if name in hf_params and hf_params[name].grad is not None:
            assert_close(g, hf_params[name].grad, "bwd", name)


def _gpt_pair(backend="reference"):
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=48, bos_token_id=0,
                       eos_token_id=1, pad_token_id=2)
    hf = T.GPT2LMHeadModel(cfg).to(DEVICE).eval()
    return hf, GPT.from_hf(hf, backend=backend).to(DEVICE).eval()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gpt_matches_hf_with_padding(backend):
    hf, ours = _gpt_pair(backend)
    ids = torch.randint(3, 97, (3, 11), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ref = hf(ids, attention_mask=mask, labels=labels)
    out = ours(ids, attention_mask=mask, labels=labels)
    keep = mask.bool()
    _close(out["logits"][keep], ref.logits[keep], name="logits")
    ref.loss.backward()
    out["loss"].backward()
    _close(out["loss"].detach(), ref.loss.detach(), name="loss")
    grads = {k: p.grad for k, p in ours.named_parameters()}
    _compare_grads(gpt_to_hf_state_dict(grads), hf)
    hf2 = T.GPT2LMHeadModel(hf.config).to(DEVICE).eval()
    hf2.load_state_dict(ours.to_hf_state_dict(), strict=True)
    _close(hf2(ids).logits, hf(ids).logits, name="exported")


def test_gpt_greedy_generation_equals_hf_with_left_padding():
    hf, ours = _gpt_pair()
    ids = torch.randint(3, 97, (3, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    ids = ids.masked_fill(mask == 0, 2)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=2)
    got = ours.generate(ids, 15, attention_mask=mask)
    assert torch.equal(got, want)


def test_gpt_kv_cache_steps_equal_the_full_forward():
    _, ours = _gpt_pair("triton")  # decode steps: Nq = 1 < Nk through the Triton kernel (bottom-right causal)
    ids = torch.randint(3, 97, (2, 12), device=DEVICE)
    full = ours(ids)["logits"]
    cache = [{} for _ in ours.blocks]
    steps = [ours(ids[:, :8], cache=cache)["logits"]]
    for t in range(8, 12):
        steps.append(ours(ids[:, t:t + 1], cache=cache)["logits"])
    _close(torch.cat(steps, dim=1), full, name="cached")


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]] * 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(_pick(logits, True, 1.0, 1, None, g), logits.argmax(-1))  # top-1 is greedy
    assert torch.equal(_pick(logits, True, 1.0, None, 1e-6, g), logits.argmax(-1))  # nucleus of one token
    draws = torch.stack([_pick(logits, True, 1.0, 2, None, g) for _ in range(50)])
    assert set(draws.unique().tolist()) == {1, 3}  # top-2 only
    draws = torch.stack([_pick(logits, True, 1.0, None, 0.8, g) for _ in range(50)])
    assert set(draws.unique().tolist()) <= {1, 3, 2}
    hot = torch.stack([_pick(logits, True, 100.0, None, None, g) for _ in range(100)])
    assert len(hot.unique()) == 5  # high temperature reaches every token
    _, ours = _gpt_pair()
    ids = torch.randint(3, 97, (2, 5), device=DEVICE)
    a = ours.generate(ids, 6, temperature=0.8, top_k=40, top_p=0.95, generator=torch.Generator(DEVICE).manual_seed(1))
    b = ours.generate(ids, 6, temperature=0.8, top_k=40, top_p=0.95, generator=torch.Generator(DEVICE).manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 11)


@pytest.mark.parametrize("kind", ["pretraining", "classification", "base"])
def test_bert_matches_hf_with_padding(kind):
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=48, num_labels=3)
    cls = {"pretraining": T.BertForPreTraining, "classification": T.BertForSequenceClassification,
           "base": T.BertModel}[kind]
    hf = cls(cfg).to(DEVICE).eval()
    ours = BERT.from_hf(hf, backend="triton" if kind == "pretraining" else "reference").to(DEVICE).eval()
    ids = torch.randint(0, 97, (3, 13), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    tt = (torch.arange(13, device=DEVICE) > 6).long().expand(3, 13)
    ref = hf(ids, attention_mask=mask, token_type_ids=tt)
    out = ours(ids, attention_mask=mask, token_type_ids=tt)
    keep = mask.bool()
    if kind == "pretraining":
        _close(out["mlm_logits"][keep], ref.prediction_logits[keep], name="mlm")
        _close(out["nsp_logits"], ref.seq_relationship_logits, name="nsp")
        loss_ref = ref.prediction_logits[keep].square().mean() + ref.seq_relationship_logits.square().mean()
        loss = out["mlm_logits"][keep].square().mean() + out["nsp_logits"].square().mean()
    elif kind == "classification":
        _close(out["class_logits"], ref.logits, name="class")
        loss_ref, loss = ref.logits.square().sum(), out["class_logits"].square().sum()
    else:
        _close(out["hidden"][keep], ref.last_hidden_state[keep], name="hidden")
        _close(out["pooled"], ref.pooler_output, name="pooled")
        loss_ref, loss = ref.pooler_output.square().sum(), out["pooled"].square().sum()
    loss_ref.backward()
    loss.backward()
    prefix = "" if kind == "base" else "bert."
    _compare_grads(bert_to_hf_state_dict({k: p.grad for k, p in ours.named_parameters()}, prefix), hf)
    hf2 = cls(cfg).to(DEVICE).eval()
    hf2.load_state_dict(ours.to_hf_state_dict(prefix), strict=True)


@pytest.mark.parametrize("kind", ["classification", "base"])
def test_vit_matches_hf(kind):
    torch.manual_seed(0)
    cfg = T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, num_labels=5)
    cls = T.ViTForImageClassification if kind == "classification" else T.ViTModel
    hf = cls(cfg).to(DEVICE).eval()
    ours = ViT.from_hf(hf, backend="triton" if kind == "classification" else "reference").to(DEVICE).eval()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    ref, out = hf(x), ours(x)
    if kind == "classification":
        _close(out["logits"], ref.logits, name="logits")
        ref.logits.square().sum().backward()
        out["logits"].square().sum().backward()
        grads = vit_to_hf_state_dict({k: p.grad for k, p in ours.named_parameters()})
    else:
        _close(out["hidden"], ref.last_hidden_state, name="hidden")
        _close(out["pooled"], ref.pooler_output, name="pooled")
        x2 = torch.randn(2, 3, 48, 40, device=DEVICE)  # another image size: interpolated positions
        _close(ours(x2)["hidden"], hf(x2, interpolate_pos_encoding=True).last_hidden_state, name="interpolated")
        ref.pooler_output.square().sum().backward()
        out["pooled"].square().sum().backward()
        grads = vit_to_hf_state_dict({k: p.grad for k, p in ours.named_parameters()}, prefix="")
    _compare_grads(grads, hf)
    hf2 = cls(cfg).to(DEVICE).eval()
    hf2.load_state_dict(ours.to_hf_state_dict(prefix="vit." if kind == "classification" else ""), strict=True)


def test_from_local_checkpoint_directories(tmp_path):
    torch.manual_seed(0)
    gpt = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    gpt.save_pretrained(tmp_path / "gpt")
    ids = torch.randint(0, 50, (1, 7))
    _close(GPT.from_hf(str(tmp_path / "gpt")).eval()(ids)["logits"], gpt.eval()(ids).logits, name="gpt dir")
    vit = T.ViTModel(T.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32))
    vit.save_pretrained(tmp_path / "vit")
    x = torch.randn(1, 3, 16, 16)
    _close(ViT.from_hf(tmp_path / "vit").eval()(x)["hidden"], vit.eval()(x).last_hidden_state, name="vit dir")
    bert = T.BertForSequenceClassification(T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                        num_attention_heads=2, intermediate_size=32,
                                                        max_position_embeddings=16, num_labels=3))
    bert.save_pretrained(tmp_path / "bert")  # the directory's own architecture (and head) is what loads
    ours = BERT.from_hf(tmp_path / "bert").eval()
    assert ours.config.num_labels == 3
    _close(ours(ids)["class_logits"], bert.eval()(ids).logits, name="bert dir")


def test_hybrid_stem_and_presets():
    m = ViT.from_preset("tiny", stem_channels=(8, 16))
    assert m.feature_stride == 4 and m(torch.randn(2, 3, 32, 32))["logits"].shape == (2, 10)
    assert sum(p.numel() for p in GPT.from_preset("gpt2-117m").parameters()) == pytest.approx(124.4e6, rel=0.01)
    assert GPT.from_preset("gpt2-1542m", num_layers=1).config.dim == 1600
    assert ViT.from_preset("vit-huge-14", num_layers=1).config.patch_size == 14
    with pytest.raises(ValueError, match="preset"):
        BERT.from_preset("bert-xl")


def _train(model, batch_fn, steps, lr):
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch_fn())["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


def test_tiny_models_learn_synthetic_tasks():
    # each model's loss (mean of the last 5 steps vs the first 5) falls by at least 3x within seconds on a CPU
    g = torch.Generator().manual_seed(0)
    gpt = GPT.from_preset("tiny", dropout=0.0)  # next token of an arithmetic progression mod 16

    def gpt_batch():
        start = torch.randint(0, 16, (16, 1), generator=g)
        ids = (start + torch.arange(24) * torch.randint(1, 4, (16, 1), generator=g)) % 16
        return {"input_ids": ids, "labels": ids}
    first, last = _train(gpt, gpt_batch, 60, 3e-3)
    assert last < first / 3, (first, last)

    bert = BERT.from_preset("tiny", dropout=0.0, vocab_size=32)  # masked LM: a masked token repeats the others

    def bert_batch():
        ids = torch.randint(0, 30, (16, 1), generator=g).expand(16, 20).clone()
        masked = torch.rand(ids.shape, generator=g) < 0.2
        return {"input_ids": ids.masked_fill(masked, 31), "labels": ids.masked_fill(~masked, -100)}
    first, last = _train(bert, bert_batch, 100, 3e-3)
    assert last < first / 3, (first, last)

    vit = ViT.from_preset("tiny", num_classes=4)  # which quadrant is bright

    def vit_batch():
        y = torch.randint(0, 4, (16,), generator=g)
        x = torch.randn(16, 3, 32, 32, generator=g) * 0.1
        for i, c in enumerate(y.tolist()):
            x[i, :, (c // 2) * 16:(c // 2) * 16 + 16, (c % 2) * 16:(c % 2) * 16 + 16] += 1.0
        return {"pixel_values": x, "labels": y}
    first, last = _train(vit, vit_batch, 60, 3e-3)
    assert last < first / 3, (first, last)


@pytest.mark.parametrize("name", ["gpt", "bert", "vit"])
def test_compile_without_graph_breaks(name):
    torch._dynamo.reset()
    if name == "gpt":
        model, inputs = GPT.from_preset("tiny", backend="triton"), (torch.randint(0, 256, (2, 16)),)
    elif name == "bert":
        ids = torch.randint(0, 256, (2, 16))
        mask = torch.ones_like(ids)
        mask[1, 10:] = 0
        model, inputs = BERT.from_preset("tiny", backend="triton"), (ids, mask)
    else:
        model, inputs = ViT.from_preset("tiny", backend="triton"), (torch.randn(2, 3, 32, 32),)
    model = model.to(DEVICE).eval()
    inputs = tuple(t.to(DEVICE) for t in inputs)
    explanation = torch._dynamo.explain(model)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_from_hf_with_a_hub_name_says_how_to_load_it(tmp_path):
    from tlv_fast.models import BERT, GPT, ViT
    for cls in (GPT, BERT, ViT):
        with pytest.raises(ValueError, match="neither a transformers model nor a local checkpoint directory"):
            cls.from_hf("gpt2")
        with pytest.raises(ValueError, match="AutoModel.from_pretrained"):
            cls.from_hf(tmp_path)  # a directory without config.json


def test_tiny_presets_give_transformers_configs_with_token_ids_inside_the_vocabulary():
    """transformers warns about special-token ids outside the vocabulary (GPT-2's 50256 in a 256-token preset)."""
    pytest.importorskip("transformers")
    from tlv_fast.models import GPT
    small = GPT.from_preset("tiny").hf_config()
    assert small.bos_token_id == small.eos_token_id == small.vocab_size - 1
    full = GPT.from_preset("gpt2-117m").hf_config()
    assert full.bos_token_id == full.eos_token_id == 50256
