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
