"""BERT: token + position + segment embeddings, post-norm encoder with key-padding masks, pooler, masked-LM head
(tied to the word embeddings), next-sentence head, and a [CLS] sequence-classification head."""
import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..nn.block import MLP, Block, SelfAttention, gelu, init_weights
from .common import Presets, build_config, check_backend, check_ids, check_positive, renamed_fields
from .hf import bert_config_from_hf, bert_from_hf_state_dict, bert_hf_config, bert_to_hf_state_dict, hf_source


@renamed_fields(n_layer="num_layers", n_head="num_heads")
@dataclasses.dataclass
class BERTConfig:
    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_hidden: int = 3072
    dropout: float = 0.1
    eps: float = 1e-12
    pretraining_heads: bool = True  # masked-LM + next-sentence heads
    num_labels: int = 0             # > 0: a sequence-classification head on [CLS]
    backend: object = "auto"        # see tlv_fast.backends
    unpad: object = "auto"          # padded batches as packed sequences: True, False, "auto" (see BERT.forward)

    def __post_init__(self):
        if self.unpad not in (True, False, "auto"):
            raise ValueError(f"BERTConfig.unpad must be True, False or 'auto', got {self.unpad!r}")
        check_positive(self, "vocab_size", "max_positions", "type_vocab_size", "dim", "num_layers", "num_heads",
                       "mlp_hidden")
        check_backend(self, ("attention",))


BERT_PRESETS = {
    "bert-base": dict(num_layers=12, dim=768, num_heads=12, mlp_hidden=3072),
    "bert-large": dict(num_layers=24, dim=1024, num_heads=16, mlp_hidden=4096),
    "tiny": dict(vocab_size=256, max_positions=128, num_layers=2, dim=64, num_heads=4, mlp_hidden=256),
}


class BERT(Presets, nn.Module):
    """BERT. ``device`` / ``dtype`` build the parameters there directly (``device="meta"`` allocates nothing)."""
    PRESETS, CONFIG = BERT_PRESETS, BERTConfig

    def __init__(self, config: BERTConfig, device=None, dtype=None):
        super().__init__()
        c = self.config = config
        kw = dict(device=device, dtype=dtype)
        self.word_embeddings = nn.Embedding(c.vocab_size, c.dim, **kw)
        self.position_embeddings = nn.Embedding(c.max_positions, c.dim, **kw)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.dim, **kw)
        self.emb_norm = nn.LayerNorm(c.dim, eps=c.eps, **kw)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.dim, partial(SelfAttention, num_heads=c.num_heads, dropout=c.dropout, backend=c.backend, **kw),
                  partial(MLP, hidden=c.mlp_hidden, **kw), partial(nn.LayerNorm, eps=c.eps, **kw),
                  norm_first=False, dropout=c.dropout)
            for _ in range(c.num_layers))
        self.pooler = nn.Linear(c.dim, c.dim, **kw)
        if c.pretraining_heads:
            self.mlm_transform = nn.Linear(c.dim, c.dim, **kw)
            self.mlm_norm = nn.LayerNorm(c.dim, eps=c.eps, **kw)
            self.mlm_bias = nn.Parameter(torch.zeros(c.vocab_size, **kw))
            self.nsp = nn.Linear(c.dim, 2, **kw)
        if c.num_labels:
            self.classifier = nn.Linear(c.dim, c.num_labels, **kw)
        init_weights(self)

    @classmethod
    def from_hf(cls, model_or_path, **overrides):
        """From a transformers BertModel, BertForPreTraining or BertForSequenceClassification (heads follow the
        source), or a local checkpoint directory."""
        hf_config, sd = hf_source(model_or_path)
        sd = bert_from_hf_state_dict(sd)
        num_labels = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else 0
        fields = bert_config_from_hf(hf_config, "mlm_bias" in sd, num_labels)
        model = cls(build_config(BERTConfig, fields, overrides))
        model.load_state_dict(sd, strict=True)
        return model

    def to_hf_state_dict(self, prefix="bert."):
        return bert_to_hf_state_dict(self.state_dict(), prefix)

    def hf_config(self):
        return bert_hf_config(self.config)

    def _packing(self, keys, x):
        """(cu_seqlens, longest) when this batch runs unpadded (see forward), else None."""
        mode = self.config.unpad
        if keys is None or mode is False or torch.compiler.is_compiling():
            return None
        if mode == "auto":
            name = backends.pick(self.config.backend, "attention")
            inputs = backends.Inputs(x.device, x.dtype, self.config.dim // self.config.num_heads, frozenset({"mask"}))
            if backends.choose("attention", name, inputs) != "triton":
                return None
        lengths = keys.sum(1, dtype=torch.int32)
        total, longest = torch.stack([lengths.sum(), lengths.max()]).tolist()
        if mode == "auto" and total > 0.9 * keys.numel():
            return None
        return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)), int(longest)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                next_sentence_label=None, class_labels=None):
        """input_ids (B, N); attention_mask (B, N) 1 = token, 0 = padding. Returns a dict: hidden (B, N, C), pooled
        (B, C) and, with the heads, mlm_logits, nsp_logits, class_logits; loss sums the given targets'
        cross-entropies (labels: -100 ignored).

        A padded batch runs in one of two ways (config.unpad): padded, every layer on B x N tokens with the mask read
        in the attention kernel as (B, 1, 1, N) (no N x N memory; key tiles past a sequence's last token skipped);
        or unpadded, the real tokens gathered into one packed sequence that every layer runs on (attention through
        tlv_fast.varlen_attention), then scattered back: no compute on padding in any layer, and hidden states
        at padding positions are 0 (padded, they are values nothing reads). "auto" unpads when the attention runs on
        the Triton kernels and at least 10 % of the tokens are padding (it reads the mask's counts: one device
        synchronisation), never inside torch.compile. Real tokens get the same values either way."""
        check_ids(self, input_ids, min_len=1)  # the pooler reads the first ([CLS]) token
        B, N = input_ids.shape
        if N > self.config.max_positions:
            raise ValueError(f"BERT: sequence of {N} tokens exceeds max_positions = {self.config.max_positions}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"BERT: attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = torch.arange(N, device=input_ids.device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids) \
            + self.token_type_embeddings(token_type_ids)
        x = self.drop(self.emb_norm(x))
        keys = attention_mask.bool() if attention_mask is not None else None
        packed = self._packing(keys, x)
        if packed is None:
            for block in self.blocks:
                x = block(x, key_padding_mask=keys)
        else:
            cu, longest = packed
            h = x[keys]  # (total, C): the real tokens, sequence by sequence
            for block in self.blocks:
                h = block(h, cu_seqlens=cu, max_seqlen=longest)
            x = x.new_zeros(x.shape).index_put((keys,), h)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        out = {"hidden": x, "pooled": pooled}
        losses = []
        if self.config.pretraining_heads:
            h = self.mlm_norm(gelu(self.mlm_transform(x)))
            out["mlm_logits"] = F.linear(h, self.word_embeddings.weight, self.mlm_bias)
            out["nsp_logits"] = self.nsp(pooled)
            if labels is not None:
                losses.append(F.cross_entropy(out["mlm_logits"].flatten(0, 1).float(), labels.flatten(),
                                              ignore_index=-100))
            if next_sentence_label is not None:
                losses.append(F.cross_entropy(out["nsp_logits"].float(), next_sentence_label))
        if self.config.num_labels:
            out["class_logits"] = self.classifier(self.drop(pooled))
            if class_labels is not None:
                losses.append(F.cross_entropy(out["class_logits"].float(), class_labels))
        if losses:
            out["loss"] = sum(losses)
        return out
