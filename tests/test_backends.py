"""The backend vocabulary and declarations (tlv_fast.backends): names and aliases, validation at construction for
modules, models and integrations, TLV_FAST_BACKEND, choices read from the declarations, README's table."""
import re
import warnings

import pytest
import torch
from torch import nn

import tlv_fast
from tlv_fast import backends
from tlv_fast.models import BERT, GPT, STTR, BERTConfig, GPTConfig, STTRConfig, ViT, ViTConfig

from helpers import DEVICE, REPO


def test_readme_table_is_generated_from_the_declarations():
    with open(f"{REPO}/README.md") as f:
        readme = f.read()
    m = re.search(r"<!-- backends:begin -->\n(.*?)\n<!-- backends:end -->", readme, re.S)
    assert m, "README lacks the generated backend table markers"
    assert m.group(1).strip() == backends.markdown_table(), "README's backend table is stale: paste " \
        "`python -m tlv_fast.backend_table`"


def test_every_family_declares_reference_and_its_auto_order():
    backends.markdown_table()  # loads the declarations
    assert set(backends.FAMILIES) == {"attention", "varlen_attention", "relpos_attention", "sinkhorn"}
    for fam in backends.FAMILIES.values():
        assert "reference" in fam.implementations
        for kind, order in fam.auto.items():
            assert order and all(name in fam.implementations for name in order), (fam.name, kind)
            assert order[-1] == "reference", "auto must end with the backend that always runs"


def test_declarations_give_the_reasons():
    from tlv_fast.ops import sdpa, transport
    i = backends.Inputs(torch.device("cpu"), torch.float64, 288)
    reasons = " ".join(sdpa.TRITON.not_supported_reasons(i))
    assert "float64" in reasons and "head dim 288 > 256" in reasons
    assert sdpa.REFERENCE.not_supported_reasons(i) == []
    meta = transport.NATIVE.not_supported_reasons(backends.Inputs(torch.device("meta"), torch.float32))
    assert meta == ["meta tensors are not supported (supported: cuda, cpu)"]


@pytest.mark.parametrize("bad", ["bogus", "fused", 3, None])
def test_unknown_names_raise_everywhere_at_construction(bad):
    for build in (lambda: tlv_fast.nn.MultiheadAttention(16, 2, backend=bad),
                  lambda: tlv_fast.nn.SelfAttention(16, 2, backend=bad),
                  lambda: tlv_fast.nn.RelativeMultiheadAttention(16, 2, backend=bad),
                  lambda: tlv_fast.nn.OptimalTransport(backend=bad),
                  lambda: GPTConfig(backend=bad), lambda: BERTConfig(backend=bad), lambda: ViTConfig(backend=bad),
                  lambda: STTRConfig(backend=bad),
                  lambda: tlv_fast.patch(nn.Linear(2, 2), backend=bad),
                  lambda: tlv_fast.sdpa_override(backend=bad).__enter__()):
        with pytest.raises(ValueError, match="backend"):
            build()


def test_op_calls_reject_unknown_names():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="backend"):
        tlv_fast.attention(q, q, q, backend="bogus")
    s = torch.randn(2, 3, 3)
    with pytest.raises(ValueError, match="backend"):
        tlv_fast.sinkhorn(s, torch.zeros(2, 3), torch.zeros(2, 3), backend="fast")


def test_an_explicit_name_the_op_lacks_raises_at_construction():
    with pytest.raises(ValueError, match="'varlen_attention' has no 'native' backend"):
        backends.validate("native", ops=("varlen_attention",), where="BERTConfig.backend")
    with pytest.raises(ValueError, match="'sinkhorn' has no 'triton' backend"):
        STTRConfig(backend="triton")
    with pytest.raises(ValueError, match="not an op this runs"):
        GPTConfig(backend={"relpos_attention": "triton"})


def test_cuda_is_a_deprecated_alias_of_native():
    with pytest.warns(DeprecationWarning, match="native"):
        assert backends.normalize("cuda") == "native"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert tlv_fast.nn.OptimalTransport(backend="cuda").backend == "native"


def test_mapping_per_op_reaches_each_op():
    model = STTR.from_preset("tiny", backend={"relpos_attention": "reference", "optimal_transport": "native"})
    assert model.config.backend == {"relpos_attention": "reference", "sinkhorn": "native"}
    attn = model.transformer.self_attn_layers[0].self_attn
    assert attn.backend == "reference"
    assert backends.pick(model.config.backend, "optimal_transport") == "native"
    assert backends.pick(model.config.backend, "relpos_attention") == "reference"


def test_env_names_a_backend_per_op_or_for_all(monkeypatch):
    i = backends.Inputs(torch.device("cpu"), torch.float32)
    monkeypatch.setenv("TLV_FAST_BACKEND", "sinkhorn=reference")
    assert backends.choose("sinkhorn", "auto", i) == "reference"
    assert backends.choose("attention", "auto", i) == "native"  # not named: auto (the C++ kernel on CPU)
    monkeypatch.setenv("TLV_FAST_BACKEND", "optimal_transport=native")
    assert backends.choose("sinkhorn", "auto", i) in ("native",)
    monkeypatch.setenv("TLV_FAST_BACKEND", "nonsense=triton")
    with pytest.raises(ValueError, match="unknown op"):
        backends.choose("sinkhorn", "auto", i)
    monkeypatch.setenv("TLV_FAST_BACKEND", "native")  # attention has none: it says so once and keeps auto
    backends.forget()
    with pytest.warns(RuntimeWarning, match="no 'native' backend"):
        assert backends.choose("varlen_attention", "auto", i) == "reference"
    monkeypatch.setenv("TLV_FAST_BACKEND", "reference")
    assert backends.choose("sinkhorn", "native", i) == "native"  # explicit names win over the environment


def test_models_and_modules_validate_on_meta_too():
    GPT.from_preset("tiny", backend="reference", device="meta")
    BERT.from_preset("tiny", backend="triton", device="meta")
    ViT.from_preset("tiny", backend={"attention": "reference"}, device="meta")


def test_sdpa_override_falls_back_only_for_undeclared_inputs_and_lets_kernel_errors_through(monkeypatch):
    import torch.nn.functional as F

    from tlv_fast.ops import sdpa
    q = torch.randn(2, 2, 5, 8, device=DEVICE)
    k = torch.randn(1, 2, 5, 8, device=DEVICE)  # batch dims that broadcast: torch accepts, tlv_fast does not
    backends.forget()
    with tlv_fast.sdpa_override(), pytest.warns(RuntimeWarning, match="falling back"):
        out = F.scaled_dot_product_attention(q, k, k)
    assert out.shape == (2, 2, 5, 8)

    def broken(call):
        raise RuntimeError("kernel failure")
    monkeypatch.setattr(sdpa, "run", broken)
    with tlv_fast.sdpa_override(), pytest.raises(RuntimeError, match="kernel failure"):
        F.scaled_dot_product_attention(q, q, q)
