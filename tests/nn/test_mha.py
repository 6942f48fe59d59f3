"""tlv_fast.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights: outputs, weights and
gradients over the constructor options, layouts and mask conventions."""
import pytest
import torch
from torch import nn

import tlv_fast

from helpers import DEVICE, assert_close

E, H, L, S, N = 32, 4, 7, 9, 3


def _pair(backend="triton", **kw):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, **kw).to(DEVICE)
    with torch.no_grad():
        for p in ref.parameters():  # non-zero biases so that every term is checked
            if p.dim() == 1:
                p.normal_()
    ours = tlv_fast.nn.MultiheadAttention.from_torch(ref, backend=backend)
    return ref, ours


def _inputs(batch_first=False, kdim=E, vdim=E, batched=True):
    def t(n, e):
        shape = ((N, n, e) if batch_first else (n, N, e)) if batched else (n, e)
        return torch.randn(shape, device=DEVICE, requires_grad=True)
    return t(L, E), t(S, kdim), t(S, vdim)


def _compare(ref, ours, inputs, **kw):
    out_r, w_r = ref(*inputs, **kw)
    out_o, w_o = ours(*inputs, **kw)
    assert_close(out_o, out_r, name="out")
    if w_r is None:
        assert w_o is None
    else:
        assert_close(w_o, w_r, name="weights")
    g = torch.randn_like(out_r)
    gr = torch.autograd.grad(out_r, list(inputs) + list(ref.parameters()), g)
    go = torch.autograd.grad(out_o, list(inputs) + list(ours.parameters()), g)
    for a, b in zip(go, gr):
        assert_close(a, b, "bwd", name="grad")


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("opts", [{}, {"batch_first": True}, {"bias": False}, {"kdim": 24, "vdim": 40},
                                  {"add_bias_kv": True}, {"add_zero_attn": True},
                                  {"add_bias_kv": True, "add_zero_attn": True, "batch_first": True}],
                         ids=["default", "batch_first", "no-bias", "kdim-vdim", "bias_kv", "zero_attn", "all"])
def test_matches_torch(opts, need_weights):
    ref, ours = _pair(**opts)
    inputs = _inputs(opts.get("batch_first", False), opts.get("kdim", E), opts.get("vdim", E))
    kpm = torch.zeros(N, S, dtype=torch.bool, device=DEVICE)
    kpm[1, 5:] = True
    _compare(ref, ours, inputs, need_weights=need_weights, key_padding_mask=kpm)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", ["2d", "3d"])
@pytest.mark.parametrize("with_kpm", [False, True])
def test_masks(kind, shape, with_kpm):
    ref, ours = _pair(batch_first=True)
    inputs = _inputs(True)
    mask = torch.rand((L, S) if shape == "2d" else (N * H, L, S), device=DEVICE) < 0.3
    mask[..., 0] = False  # every query keeps a key (torch gives NaN otherwise)
    if kind == "float":
        mask = torch.randn(mask.shape, device=DEVICE).masked_fill(mask, float("-inf"))
    kpm = None
    if with_kpm:
        kpm = torch.zeros(N, S, device=DEVICE).masked_fill(torch.arange(S, device=DEVICE) > 6, float("-inf"))
        if kind == "bool":
            kpm = kpm.isinf()
    for need_weights in (False, True):
        _compare(ref, ours, inputs, attn_mask=mask, key_padding_mask=kpm, need_weights=need_weights)


def test_causal_hint_and_unbatched_and_average_flag():
    ref, ours = _pair()
    causal = nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE)
    x = torch.randn(L, N, E, device=DEVICE, requires_grad=True)
    _compare(ref, ours, (x, x, x), attn_mask=causal, is_causal=True, need_weights=False)
    _compare(ref, ours, (x, x, x), attn_mask=causal, is_causal=True, need_weights=True, average_attn_weights=False)
    _compare(ref, ours, _inputs(batched=False), need_weights=True)
    with pytest.raises(RuntimeError, match="is_causal"):
        ours(x, x, x, is_causal=True)


def test_same_state_dict_keys_and_training_dropout():
    ref, ours = _pair(add_bias_kv=True, kdim=24, vdim=40, dropout=0.5)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert isinstance(ours, nn.MultiheadAttention)
    ours.train()
    inputs = [t.detach() for t in _inputs(kdim=24, vdim=40)]
    a, _ = ours(*inputs, need_weights=False)
    b, _ = ours(*inputs, need_weights=False)
    assert not torch.allclose(a, b)  # dropout is on in training mode
    ours.eval()
    assert_close(ours(*inputs, need_weights=False)[0], ref.eval()(*inputs, need_weights=False)[0], name="eval")


# ---- torch's shape rules: where torch raises, so does the drop-in (with a message naming the argument) --------
def _shape_cases():
    def seq(n, b=N, e=E):
        return (n, b, e)
    return {
        "query/key batch": (seq(L), seq(S, 2), seq(S, 2), {}),
        "key/value batch": (seq(L), seq(S), seq(S, 2), {}),
        "key/value length": (seq(L), seq(S), seq(S - 1), {}),
        "query embed": (seq(L, e=E + 1), seq(S), seq(S), {}),
        "key embed": (seq(L), seq(S, e=E + 2), seq(S), {}),
        "2-D query, 3-D key": ((L, E), seq(S), seq(S), {}),
        "3-D query, 2-D value": (seq(L), seq(S), (S, E), {}),
        "4-D query": ((L, N, 1, E), (S, N, 1, E), (S, N, 1, E), {}),
        "kpm shape": (seq(L), seq(S), seq(S), {"key_padding_mask": torch.zeros(N, S - 1, dtype=torch.bool)}),
        "kpm 3-D": (seq(L), seq(S), seq(S), {"key_padding_mask": torch.zeros(N, 1, S, dtype=torch.bool)}),
        "kpm int": (seq(L), seq(S), seq(S), {"key_padding_mask": torch.zeros(N, S, dtype=torch.int64)}),
        "mask 2-D shape": (seq(L), seq(S), seq(S), {"attn_mask": torch.zeros(L, S + 1)}),
        "mask 3-D shape": (seq(L), seq(S), seq(S), {"attn_mask": torch.zeros(N, L, S)}),
        "mask 4-D": (seq(L), seq(S), seq(S), {"attn_mask": torch.zeros(N, H, L, S)}),
        "mask int": (seq(L), seq(S), seq(S), {"attn_mask": torch.zeros(L, S, dtype=torch.int64)}),
        "unbatched 3-D mask shape": ((L, E), (S, E), (S, E), {"attn_mask": torch.zeros(1, L, S)}),
        "causal hint without a mask": (seq(L), seq(L), seq(L), {"is_causal": True}),
    }


@pytest.mark.parametrize("name", list(_shape_cases()))
def test_shape_rules_match_torch(name):
    q, k, v, kw = _shape_cases()[name]
    ref, ours = _pair("reference")
    x = [torch.randn(s, device=DEVICE) for s in (q, k, v)]
    kw = {key: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for key, t in kw.items()}
    with pytest.raises(Exception):  # noqa: B017  (torch raises AssertionError or RuntimeError)
        ref(*x, **kw)
    with pytest.raises((ValueError, RuntimeError)) as err:
        ours(*x, **kw)
    assert any(word in str(err.value) for word in ("query", "key", "value", "mask", "is_causal")), str(err.value)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_batch_gives_empty_outputs_like_torch(need_weights, batch_first):
    ref, ours = _pair("reference", batch_first=batch_first)
    shape = (0, L, E) if batch_first else (L, 0, E)
    x = torch.randn(shape, device=DEVICE)
    want, got = ref(x, x, x, need_weights=need_weights), ours(x, x, x, need_weights=need_weights)
    assert got[0].shape == want[0].shape
    assert (got[1] is None) == (want[1] is None) and (got[1] is None or got[1].shape == want[1].shape)
