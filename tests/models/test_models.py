"""What the model classes share, without transformers: one config vocabulary (old names still accepted), factory
device/dtype arguments, the Block's factories, and on a GPU the Triton path against the reference."""
import functools

import pytest
import torch
from torch import nn

import tlv_fast
from tlv_fast.models import BERT, GPT, STTR, BERTConfig, GPTConfig, STTRConfig, ViT, ViTConfig

from helpers import assert_close


@pytest.mark.parametrize("cls", [GPTConfig, BERTConfig, ViTConfig, STTRConfig])
def test_configs_share_field_names(cls):
    fields = set(cls.__dataclass_fields__)
    assert {"dim", "num_layers", "num_heads", "backend"} <= fields


def test_old_field_names_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="'n_layer' is now called 'num_layers'"):
        assert GPTConfig(n_layer=3).num_layers == 3
    with pytest.warns(DeprecationWarning, match="hidden_dim"):
        assert STTR.from_preset("tiny", hidden_dim=32).config.dim == 32
    with pytest.warns(DeprecationWarning):
        assert ViT.from_preset("tiny", n_head=2).config.num_heads == 2
    with pytest.raises(TypeError, match="not both"):
        BERTConfig(n_head=2, num_heads=4)


@pytest.mark.parametrize("cls", [GPT, BERT, ViT, STTR])
def test_build_on_meta_and_in_a_dtype(cls):
    meta = cls.from_preset("tiny", device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    half = cls.from_preset("tiny", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in half.parameters())


def test_large_gpt_on_meta_allocates_nothing():
    model = GPT.from_preset("gpt2-1542m", device="meta")
    assert sum(p.numel() for p in model.parameters()) > 1.5e9


def test_block_takes_factories_and_a_norm_drops_in():
    class RMSNorm(nn.Module):
        def __init__(self, dim, eps=1e-6):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    block = tlv_fast.nn.Block(32, functools.partial(tlv_fast.nn.SelfAttention, num_heads=4, backend="reference"),
                              functools.partial(tlv_fast.nn.MLP, hidden=64), norm_cls=RMSNorm)
    assert isinstance(block.norm1, RMSNorm) and isinstance(block.mixer, tlv_fast.nn.SelfAttention)
    x = torch.randn(2, 7, 32)
    want = x + block.mixer(block.norm1(x))
    want = want + block.mlp(block.norm2(want))
    assert_close(block(x), want, name="pre-norm block")


def test_state_dict_keys_unchanged_by_the_factories():
    keys = set(GPT.from_preset("tiny").state_dict())
    assert {"blocks.0.mixer.qkv.weight", "blocks.0.mlp.fc1.weight", "blocks.0.norm1.weight", "ln_f.bias"} <= keys


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt", "bert", "vit"])
def test_models_triton_equals_reference(name):
    torch.manual_seed(0)
    cls = {"gpt": GPT, "bert": BERT, "vit": ViT}[name]
    x = torch.randn(2, 3, 32, 32, device="cuda") if name == "vit" else torch.randint(0, 256, (2, 24), device="cuda")
    key = {"gpt": "logits", "bert": "mlm_logits", "vit": "logits"}[name]
    outs = []
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        model = cls.from_preset("tiny", backend=backend, device="cuda").eval()
        outs.append(model(x)[key])
    assert_close(outs[0], outs[1], name=name)


# ---- bad input says what is wrong ------------------------------------------------------------------------------
def _gpt():
    torch.manual_seed(0)
    return GPT.from_preset("tiny").eval()


@pytest.mark.parametrize("call,match", [
    (lambda m, ids: m(ids[0]), "input_ids must be \\(batch, tokens\\)"),
    (lambda m, ids: m(ids.float()), "integer token ids"),
    (lambda m, ids: m(torch.zeros(1, 200, dtype=torch.long)), "max_positions"),
    (lambda m, ids: m.generate(ids[:, :0], 3), "at least 1 token"),
    (lambda m, ids: m.generate(ids, -1), "max_new_tokens"),
    (lambda m, ids: m.generate(ids, 3, top_k=0), "top_k"),
    (lambda m, ids: m.generate(ids, 3, top_p=0.0), "top_p"),
    (lambda m, ids: m.generate(ids, 3, top_p=1.5), "top_p"),
    (lambda m, ids: m.generate(ids, 3, do_sample=True, temperature=0.0), "temperature"),
    (lambda m, ids: m.generate(ids, 3, attention_mask=torch.ones(2, 5)), "attention_mask"),
], ids=["1-D ids", "float ids", "too long", "empty prompt", "negative new tokens", "top_k 0", "top_p 0", "top_p 1.5",
        "temperature 0", "mask shape"])
def test_gpt_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(_gpt(), torch.randint(0, 256, (2, 6)))


def test_gpt_generate_zero_tokens_returns_the_prompt():
    ids = torch.randint(0, 256, (2, 6))
    assert torch.equal(_gpt().generate(ids, 0), ids)


@pytest.mark.parametrize("ids,match", [(torch.zeros(1, 200, dtype=torch.long), "max_positions"),
                                       (torch.zeros(1, 0, dtype=torch.long), "at least 1 token"),
                                       (torch.zeros(7, dtype=torch.long), "\\(batch, tokens\\)")])
def test_bert_bad_input(ids, match):
    with pytest.raises(ValueError, match=match):
        BERT.from_preset("tiny")(ids)


def test_vit_rejects_images_the_patches_do_not_tile():
    with pytest.raises(ValueError, match="multiples of 8"):
        ViT.from_preset("tiny")(torch.randn(1, 3, 36, 36))  # a patch convolution would drop 4 pixels silently
    with pytest.raises(ValueError, match="3 channels"):
        ViT.from_preset("tiny")(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("cls,field", [(GPTConfig, "dim"), (BERTConfig, "num_heads"), (ViTConfig, "patch_size")])
def test_configs_reject_sizes_below_one(cls, field):
    with pytest.raises(ValueError, match=field):
        cls(**{field: 0})
    with pytest.raises(ValueError, match="divisible"):
        cls(dim=30, num_heads=4)


# ---- BERT on a padded batch: padded or unpadded (packed sequences through varlen_attention) -----------------------
def _padded_batch():
    ids = torch.randint(0, 256, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, 7:] = 0
    mask[2, 13:] = 0
    return ids, mask


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bert_unpadded_equals_padded_on_real_tokens(backend):
    ids, mask = _padded_batch()
    outs, grads = [], []
    for unpad in (False, True):
        torch.manual_seed(0)
        model = BERT.from_preset("tiny", backend=backend, unpad=unpad, dropout=0.0)
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out["loss"].backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    real = mask.bool()
    assert_close(outs[1]["hidden"][real], outs[0]["hidden"][real], name="hidden")
    assert_close(outs[1]["pooled"], outs[0]["pooled"], name="pooled")
    assert (outs[1]["hidden"][~real] == 0).all()
    assert_close(outs[1]["loss"], outs[0]["loss"], name="loss")
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], "bwd", name=name)


def test_bert_auto_unpads_only_on_the_triton_backend_with_enough_padding(monkeypatch):
    import tlv_fast.nn.block as block
    calls = []
    real = block.varlen_attention
    monkeypatch.setattr(block, "varlen_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, mask = _padded_batch()
    BERT.from_preset("tiny", backend="reference").eval()(ids, attention_mask=mask)
    assert not calls  # reference attention: padded
    model = BERT.from_preset("tiny", backend="triton").eval()
    model(ids, attention_mask=torch.ones_like(mask))
    assert not calls  # no padding
    model(ids, attention_mask=mask)
    assert len(calls) == model.config.num_layers


def test_bert_unpad_value_is_checked():
    with pytest.raises(ValueError, match="unpad"):
        BERTConfig(unpad="yes")


def test_gpt_logits_to_keep_gives_the_last_positions_and_rejects_labels():
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", backend="reference").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    full = model(ids)["logits"]
    last = model(ids, logits_to_keep=3)["logits"]
    assert last.shape == (2, 3, full.shape[-1])
    torch.testing.assert_close(last, full[:, -3:])
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)
