"""BERT: token + position + segment embeddings, post-norm encoder with key-padding masks, pooler, masked-LM head
(tied to the word embeddings), next-sentence head, and a [CLS] sequence-classification head."""
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.block import MLP, Block, SelfAttention, gelu, init_weights
from .configs import (
    Presets, BERT_PRESETS, BERTConfig, bert_config_from_hf, bert_from_hf_state_dict, bert_hf_config,
    bert_to_hf_state_dict, hf_source)


class BERT(Presets, nn.Module):
    PRESETS, CONFIG = BERT_PRESETS, BERTConfig

    def __init__(self, config: BERTConfig):
        super().__init__()
        c = self.config = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.position_embeddings = nn.Embedding(c.max_positions, c.dim)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.dim)
        self.emb_norm = nn.LayerNorm(c.dim, eps=c.eps)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.dim, SelfAttention(c.dim, c.n_head, dropout=c.dropout, backend=c.backend),
                  MLP(c.dim, c.mlp_hidden), norm_first=False, eps=c.eps, dropout=c.dropout)
            for _ in range(c.n_layer))
        self.pooler = nn.Linear(c.dim, c.dim)
        if c.pretraining_heads:
            self.mlm_transform = nn.Linear(c.dim, c.dim)
            self.mlm_norm = nn.LayerNorm(c.dim, eps=c.eps)
            self.mlm_bias = nn.Parameter(torch.zeros(c.vocab_size))
            self.nsp = nn.Linear(c.dim, 2)
        if c.num_labels:
            self.classifier = nn.Linear(c.dim, c.num_labels)
        init_weights(self)

    @classmethod
    def from_hf(cls, model_or_path, **overrides):
        """From a transformers BertModel, BertForPreTraining or BertForSequenceClassification (heads follow the
        source), or a local checkpoint directory."""
        hf_config, sd = hf_source(model_or_path)
        sd = bert_from_hf_state_dict(sd)
        num_labels = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else 0
        config = bert_config_from_hf(hf_config, "mlm_bias" in sd, num_labels)
        model = cls(dataclasses.replace(config, **overrides))
        model.load_state_dict(sd, strict=True)
        return model

    def to_hf_state_dict(self, prefix="bert."):
        return bert_to_hf_state_dict(self.state_dict(), prefix)

    def hf_config(self):
        return bert_hf_config(self.config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                next_sentence_label=None, class_labels=None):
        """input_ids (B, N); attention_mask (B, N) 1 = token, 0 = padding (read in the kernel as a (B, 1, 1, N)
        mask: no N x N memory). Returns a dict: hidden (B, N, C), pooled (B, C) and, with the heads, mlm_logits,
        nsp_logits, class_logits; loss sums the given targets' cross-entropies (labels: -100 ignored)."""
        B, N = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(N, device=input_ids.device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids) \
            + self.token_type_embeddings(token_type_ids)
        x = self.drop(self.emb_norm(x))
        keys = attention_mask.bool() if attention_mask is not None else None
        for block in self.blocks:
            x = block(x, key_padding_mask=keys)
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
