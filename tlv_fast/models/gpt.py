"""GPT (GPT-2 architecture): learned positions, causal pre-norm decoder, tied LM head, KV-cache generation."""
import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.block import MLP, Block, SelfAttention, init_weights
from .common import Presets, build_config, check_backend, check_ids, check_positive, renamed_fields
from .hf import gpt_config_from_hf, gpt_from_hf_state_dict, gpt_hf_config, gpt_to_hf_state_dict, hf_source


@renamed_fields(n_layer="num_layers", n_head="num_heads", n_positions="max_positions")
@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 50257
    max_positions: int = 1024
    dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_hidden: int = 3072
    dropout: float = 0.1
    eps: float = 1e-5
    backend: object = "auto"  # see tlv_fast.backends

    def __post_init__(self):
        check_positive(self, "vocab_size", "max_positions", "dim", "num_layers", "num_heads", "mlp_hidden")
        check_backend(self, ("attention",))


GPT_PRESETS = {  # GPT-2 paper, Table 2: parameters / layers / width
    "gpt2-117m": dict(num_layers=12, dim=768, num_heads=12, mlp_hidden=3072),
    "gpt2-345m": dict(num_layers=24, dim=1024, num_heads=16, mlp_hidden=4096),
    "gpt2-762m": dict(num_layers=36, dim=1280, num_heads=20, mlp_hidden=5120),
    "gpt2-1542m": dict(num_layers=48, dim=1600, num_heads=25, mlp_hidden=6400),
    "tiny": dict(vocab_size=256, max_positions=128, num_layers=2, dim=64, num_heads=4, mlp_hidden=256),
}


class GPT(Presets, nn.Module):
    """GPT-2. ``device`` / ``dtype`` build the parameters there directly (``device="meta"`` allocates nothing)."""
    PRESETS, CONFIG = GPT_PRESETS, GPTConfig

    def __init__(self, config: GPTConfig, device=None, dtype=None):
        super().__init__()
        c = self.config = config
        kw = dict(device=device, dtype=dtype)
        self.wte = nn.Embedding(c.vocab_size, c.dim, **kw)
        self.wpe = nn.Embedding(c.max_positions, c.dim, **kw)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.dim, partial(SelfAttention, num_heads=c.num_heads, causal=True, dropout=c.dropout,
                                 backend=c.backend, **kw),
                  partial(MLP, hidden=c.mlp_hidden, approximate="tanh", **kw),
                  partial(nn.LayerNorm, eps=c.eps, **kw), norm_first=True, dropout=c.dropout)
            for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.dim, eps=c.eps, **kw)
        init_weights(self)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, model_or_path, **overrides):
        """From a transformers GPT2Model / GPT2LMHeadModel, or a local checkpoint directory."""
        hf_config, sd = hf_source(model_or_path)
        model = cls(build_config(GPTConfig, gpt_config_from_hf(hf_config), overrides))
        model.load_state_dict(gpt_from_hf_state_dict(sd), strict=True)
        return model

    def to_hf_state_dict(self, lm_head=True):
        """State dict for transformers' GPT2LMHeadModel (GPT2Model's with lm_head=False)."""
        return gpt_to_hf_state_dict(self.state_dict(), lm_head)

    def hf_config(self):
        return gpt_hf_config(self.config)

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, labels=None, logits_to_keep=0):
        """input_ids (B, N); attention_mask (B, past + N), 1 for tokens and 0 for (left) padding; position_ids
        (B, N), default past .. past + N - 1 (generate() counts real tokens only, as transformers does); cache: a
        list of per-layer dicts filled and extended in place (decode steps pass only the new tokens). Returns a dict
        with logits (B, N, vocab) -- only the last `logits_to_keep` positions when it is > 0 (what generation needs
        of a prompt: the head is the largest product) -- and, given labels (B, N; -100 ignored), the next-token
        cross-entropy loss."""
        check_ids(self, input_ids)
        B, N = input_ids.shape
        past = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + N, device=input_ids.device)[None]
        if past + N > self.config.max_positions:
            raise ValueError(f"sequence of {past + N} tokens exceeds max_positions = {self.config.max_positions}")
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        keys = attention_mask.bool() if attention_mask is not None else None
        for i, block in enumerate(self.blocks):
            x = block(x, key_padding_mask=keys, cache=cache[i] if cache is not None else None)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"GPT: logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        if labels is not None and logits_to_keep:
            raise ValueError("GPT: labels need the logits of every position: pass logits_to_keep=0")
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                          ignore_index=-100)
        return out

    # ---- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, attention_mask=None, do_sample=None, temperature=1.0, top_k=None,
                 top_p=None, eos_token_id=None, pad_token_id=None, generator=None):
        """Append up to max_new_tokens tokens: greedy (do_sample=False, the default unless temperature != 1,
        top_k or top_p is given) or sampled from softmax(logits / temperature) restricted to the top_k tokens and
        to the smallest set whose probability exceeds top_p. Batches may be left-padded (attention_mask 0 on the
        left). Sequences that produce eos_token_id continue with pad_token_id. Returns (B, N + new)."""
        check_ids(self, input_ids, min_len=1)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"GPT.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"GPT.generate: top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"GPT.generate: top_p must be None or in (0, 1], got {top_p!r}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"GPT.generate: attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        if do_sample is None:
            do_sample = temperature != 1.0 or top_k is not None or top_p is not None
        if do_sample and not temperature > 0:
            raise ValueError(f"GPT.generate: temperature must be > 0 when sampling, got {temperature}")
        if max_new_tokens == 0:
            return input_ids
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        cache = [{"capacity": input_ids.shape[1] + max_new_tokens} for _ in self.blocks]  # KV buffers sized once

        def positions(mask, n):  # as transformers: left padding does not count
            return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -n:]
        logits = self(input_ids, attention_mask=mask, position_ids=positions(mask, input_ids.shape[1]),
                      cache=cache, logits_to_keep=1)["logits"][:, -1]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        ids = input_ids
        for step in range(max_new_tokens):
            nxt = _pick(logits.float(), do_sample, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                if pad_token_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
                done = done | (nxt == eos_token_id)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = self(nxt[:, None], attention_mask=mask, position_ids=positions(mask, 1),
                          cache=cache, logits_to_keep=1)["logits"][:, -1]
        return ids


def _pick(logits, do_sample, temperature, top_k, top_p, generator):
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass exceeds top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
