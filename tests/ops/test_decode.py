"""Split-KV decoding (kernels/decode.py): few query rows against long key sequences, GQA heads packed into one tile,
chunks combined by their log-sum-exps. Chosen automatically by tlv_fast.attention; values, lse and the gradients
(the backward kernels run on the lse it returns) against the reference, under FlashAttention's rule."""
import pytest
import torch

import tlv_fast
from tlv_fast.kernels import attention as attention_kernels
from tlv_fast.kernels import decode

from helpers import DEVICE, compare_with_reference, dtype_params, make_qkv


@pytest.fixture
def decode_calls(monkeypatch):
    """The split counts of every split-KV launch made inside the test (None: the launcher's own choice)."""
    calls = []
    real = attention_kernels.attention_decode

    def spy(*args, **kwargs):
        calls.append(kwargs.get("splits"))
        return real(*args, **kwargs)
    monkeypatch.setattr(attention_kernels, "attention_decode", spy)
    return calls


def _run(causal, mask=None):
    def run(q, k, v, m):
        return tlv_fast.attention(q, k, v, causal=causal, attn_mask=m, return_lse=True, backend="triton")
    return run


@pytest.mark.deep  # not in the quick run (README)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("n_k", [1, 37, 600])
def test_one_query_row(n_k, dtype, decode_calls):
    # gradients (the attention backward on the lse this path returns) in fp32 only: the interpreter is slow
    q, k, v = make_qkv(2, 4, 1, n_k, 32, dtype=dtype, requires_grad=dtype == torch.float32)
    compare_with_reference(q, k, v, run=_run(False), lse_grad=True)
    assert decode_calls, "the split-KV kernel was not chosen"


@pytest.mark.deep  # not in the quick run (README)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n_q", [1, 3, 16])
def test_gqa_groups_packed_and_causal(n_q, causal, decode_calls):
    # 8 query heads on 2 kv heads: 4 * n_q rows per tile; D and Dv not powers of two; cache not a tile multiple
    q, k, v = make_qkv(2, 8, n_q, 290, 40, Dv=24, Hkv=2, layout="bshd", requires_grad=n_q == 3)
    compare_with_reference(q, k, v, causal="bottom_right" if causal else None, run=_run(causal))
    assert decode_calls


def test_more_queries_than_keys_causal_rows_without_keys(decode_calls):
    q, k, v = make_qkv(1, 2, 5, 3, 16)
    out, lse = compare_with_reference(q, k, v, causal="bottom_right", run=_run(True))
    assert (out[:, :, :2] == 0).all() and torch.isneginf(lse[:, :, :2]).all()


@pytest.mark.parametrize("kind", ["keypad", "bool", "float"])
def test_masks(kind, decode_calls):
    B, H, n_q, n_k = 2, 4, 2, 200
    q, k, v = make_qkv(B, H, n_q, n_k, 32, Hkv=2)
    if kind == "keypad":
        lengths = torch.tensor([n_k, 77], device=DEVICE)
        mask = (torch.arange(n_k, device=DEVICE)[None, :] < lengths[:, None])[:, None, None, :]
    elif kind == "bool":
        mask = torch.rand(B, H, n_q, n_k, device=DEVICE) > 0.3
    else:
        mask = torch.randn(1, H, n_q, n_k, device=DEVICE)
    compare_with_reference(q, k, v, attn_mask=mask, run=_run(False))
    assert decode_calls


@pytest.mark.parametrize("splits", [1, 2, 5, 11])
def test_any_split_count_gives_the_same_result(splits):
    B, H, n_q, n_k, d = 1, 2, 2, 333, 16
    q, k, v = make_qkv(B, H, n_q, n_k, d, requires_grad=False)
    out = torch.empty(B, H, n_q, d, device=DEVICE)
    lse = torch.empty(B, H, n_q, device=DEVICE)
    decode.attention_decode(q, k, v, out, lse, sm_scale=0.25, causal_offset=n_k - n_q - 100, splits=splits)
    want, want_lse = tlv_fast.reference.attention(q, k, v, scale=0.25, return_lse=True,
                                                  attn_mask=torch.arange(n_k, device=DEVICE)[None, :]
                                                  <= torch.arange(n_q, device=DEVICE)[:, None] + n_k - n_q - 100)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_chosen_by_shape():
    assert decode.use_split_kv(1, 8192, 1, 0.0) and decode.use_split_kv(16, 64, 4, 0.0)
    assert not decode.use_split_kv(17, 8192, 1, 0.0)   # a prefill: the attention kernel
    assert not decode.use_split_kv(1, 8192, 1, 0.1)    # dropout: the attention kernel
    assert not decode.use_split_kv(16, 8192, 8, 0.0)   # 128 rows do not fit one tile
    # B8 H16 Nk8192 on a 132-SM GPU: 4 programs per SM -> 5 chunks of the cache per (batch, head)
    assert decode.num_splits(8, 16, 8192, torch.device("cpu")) == 5
    assert decode.num_splits(64, 32, 8192, torch.device("cpu")) == 1


def test_split_kv_with_dropout_is_refused():
    q, k, v = make_qkv(1, 1, 1, 8, 16, requires_grad=False)
    with pytest.raises(ValueError, match="dropout"):
        attention_kernels.attention_fwd(q, k, v, torch.empty_like(q), torch.empty(1, 1, 1), dropout_p=0.5,
                                        split_kv=True)
