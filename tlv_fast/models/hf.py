"""Hugging Face transformers conversion for BERT, GPT and ViT: config fields both ways, state-dict key maps both ways
(transformers 4 and 5 layouts for ViT), and reading a model or a local checkpoint directory (hf_source).

Config conversion returns keyword arguments for our config classes (and reads ours by attribute), so this module
does not import the models.
"""
import json
import os
import re

import torch


def gpt_config_from_hf(cfg):
    if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT: activation {cfg.activation_function!r} not supported (gelu_new)")
    return dict(vocab_size=cfg.vocab_size, max_positions=cfg.n_positions, dim=cfg.n_embd, num_layers=cfg.n_layer,
                num_heads=cfg.n_head, mlp_hidden=cfg.n_inner or 4 * cfg.n_embd, dropout=cfg.resid_pdrop,
                eps=cfg.layer_norm_epsilon)


def gpt_hf_config(cfg):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.dim,
                      n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_hidden, resid_pdrop=cfg.dropout,
                      embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=cfg.eps,
                      activation_function="gelu_new", **_special_tokens(cfg.vocab_size))


def _special_tokens(vocab_size):
    """GPT-2's end-of-text id (50256) where the vocabulary holds it, else the last id (small test vocabularies:
    transformers warns about ids outside the vocabulary)."""
    last = 50256 if vocab_size > 50256 else vocab_size - 1
    return {"bos_token_id": last, "eos_token_id": last}


class KeyMap:
    """Two-way renaming of checkpoint keys from templates with {i} (a layer index) and {p} (weight|bias), with an
    optional transpose (GPT-2's Conv1D weights are (in, out), nn.Linear's (out, in))."""

    def __init__(self, pairs):
        self.pairs = [(self._regex(a), a, self._regex(b), b, t) for a, b, t in pairs]

    @staticmethod
    def _regex(template):
        return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)"))

    def _convert(self, key, forward):
        for ra, a, rb, b, transpose in self.pairs:
            m = (ra if forward else rb).fullmatch(key)
            if m:
                return (b if forward else a).format(**m.groupdict()), transpose
        return None, False

    def to_ours(self, key):
        return self._convert(key, True)

    def to_theirs(self, key):
        return self._convert(key, False)


GPT_KEYS = KeyMap([
    ("wte.weight", "wte.weight", False),
    ("wpe.weight", "wpe.weight", False),
    ("h.{i}.ln_1.{p}", "blocks.{i}.norm1.{p}", False),
    ("h.{i}.ln_2.{p}", "blocks.{i}.norm2.{p}", False),
    ("h.{i}.attn.c_attn.weight", "blocks.{i}.mixer.qkv.weight", True),
    ("h.{i}.attn.c_attn.bias", "blocks.{i}.mixer.qkv.bias", False),
    ("h.{i}.attn.c_proj.weight", "blocks.{i}.mixer.proj.weight", True),
    ("h.{i}.attn.c_proj.bias", "blocks.{i}.mixer.proj.bias", False),
    ("h.{i}.mlp.c_fc.weight", "blocks.{i}.mlp.fc1.weight", True),
    ("h.{i}.mlp.c_fc.bias", "blocks.{i}.mlp.fc1.bias", False),
    ("h.{i}.mlp.c_proj.weight", "blocks.{i}.mlp.fc2.weight", True),
    ("h.{i}.mlp.c_proj.bias", "blocks.{i}.mlp.fc2.bias", False),
    ("ln_f.{p}", "ln_f.{p}", False),
])


def gpt_from_hf_state_dict(sd):
    """tlv_fast GPT state dict from a GPT2Model / GPT2LMHeadModel one (the tied lm_head is dropped; the causal-mask
    buffers of older transformers versions are ignored). Unknown keys raise."""
    out = {}
    for key, t in sd.items():
        key = key[len("transformer."):] if key.startswith("transformer.") else key
        if key == "lm_head.weight" or re.fullmatch(r"h\.\d+\.attn\.(masked_)?bias", key):
            continue
        ours, transpose = GPT_KEYS.to_ours(key)
        if ours is None:
            raise KeyError(f"GPT: unexpected Hugging Face key {key!r}")
        out[ours] = t.t() if transpose else t
    return out


def gpt_to_hf_state_dict(sd, lm_head=True):
    """GPT2LMHeadModel state dict (GPT2Model's with lm_head=False) from a tlv_fast GPT one."""
    out = {}
    for key, t in sd.items():
        theirs, transpose = GPT_KEYS.to_theirs(key)
        if theirs is None:
            raise KeyError(f"GPT: no Hugging Face name for {key!r}")
        out[("transformer." if lm_head else "") + theirs] = t.t().contiguous() if transpose else t
    if lm_head:
        out["lm_head.weight"] = sd["wte.weight"]
    return out


def bert_config_from_hf(cfg, pretraining_heads, num_labels):
    if cfg.hidden_act != "gelu":
        raise ValueError(f"BERT: activation {cfg.hidden_act!r} not supported (gelu)")
    return dict(vocab_size=cfg.vocab_size, max_positions=cfg.max_position_embeddings,
                type_vocab_size=cfg.type_vocab_size, dim=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
                num_heads=cfg.num_attention_heads, mlp_hidden=cfg.intermediate_size,
                dropout=cfg.hidden_dropout_prob, eps=cfg.layer_norm_eps, pretraining_heads=pretraining_heads,
                num_labels=num_labels)


def bert_hf_config(cfg):
    from transformers import BertConfig
    return BertConfig(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_positions,
                      type_vocab_size=cfg.type_vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.num_layers,
                      num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_hidden,
                      hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                      layer_norm_eps=cfg.eps, num_labels=max(cfg.num_labels, 2))


BERT_KEYS = KeyMap([
    ("embeddings.word_embeddings.weight", "word_embeddings.weight", False),
    ("embeddings.position_embeddings.weight", "position_embeddings.weight", False),
    ("embeddings.token_type_embeddings.weight", "token_type_embeddings.weight", False),
    ("embeddings.LayerNorm.{p}", "emb_norm.{p}", False),
    ("encoder.layer.{i}.attention.output.dense.{p}", "blocks.{i}.mixer.proj.{p}", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.{p}", "blocks.{i}.norm1.{p}", False),
    ("encoder.layer.{i}.intermediate.dense.{p}", "blocks.{i}.mlp.fc1.{p}", False),
    ("encoder.layer.{i}.output.dense.{p}", "blocks.{i}.mlp.fc2.{p}", False),
    ("encoder.layer.{i}.output.LayerNorm.{p}", "blocks.{i}.norm2.{p}", False),
    ("pooler.dense.{p}", "pooler.{p}", False),
])
BERT_HEAD_KEYS = KeyMap([
    ("cls.predictions.bias", "mlm_bias", False),
    ("cls.predictions.transform.dense.{p}", "mlm_transform.{p}", False),
    ("cls.predictions.transform.LayerNorm.{p}", "mlm_norm.{p}", False),
    ("cls.seq_relationship.{p}", "nsp.{p}", False),
    ("classifier.{p}", "classifier.{p}", False),
])
_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)")


def bert_from_hf_state_dict(sd):
    """tlv_fast BERT state dict from BertModel / BertForPreTraining / BertForSequenceClassification's (q, k, v
    projections packed into one; the decoder tied to the word embeddings is dropped). Unknown keys raise."""
    out, qkv = {}, {}
    for key, t in sd.items():
        if key in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias") or key.endswith("position_ids"):
            continue
        if key.startswith("bert."):
            key = key[len("bert."):]
        m = _QKV.fullmatch(key)
        if m:
            qkv[(int(m.group(1)), m.group(3), m.group(2))] = t
            continue
        ours, _ = BERT_KEYS.to_ours(key)
        ours = ours or BERT_HEAD_KEYS.to_ours(key)[0]
        if ours is None:
            raise KeyError(f"BERT: unexpected Hugging Face key {key!r}")
        out[ours] = t
    for (i, p, _), _t in sorted(qkv.items()):
        out[f"blocks.{i}.mixer.qkv.{p}"] = torch.cat([qkv[(i, p, n)] for n in ("query", "key", "value")])
    return out


def bert_to_hf_state_dict(sd, prefix="bert."):
    """BertForPreTraining / BertForSequenceClassification state dict (prefix "" for BertModel)."""
    out = {}
    for key, t in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.mixer\.qkv\.(weight|bias)", key)
        if m:
            for name, part in zip(("query", "key", "value"), t.chunk(3)):
                out[f"{prefix}encoder.layer.{m.group(1)}.attention.self.{name}.{m.group(2)}"] = part
            continue
        theirs, _ = BERT_KEYS.to_theirs(key)
        if theirs is not None:
            out[prefix + theirs] = t
            continue
        theirs, _ = BERT_HEAD_KEYS.to_theirs(key)
        if theirs is None:
            raise KeyError(f"BERT: no Hugging Face name for {key!r}")
        out[theirs] = t
    if "mlm_bias" in sd:
        out["cls.predictions.decoder.weight"] = sd["word_embeddings.weight"]
        out["cls.predictions.decoder.bias"] = sd["mlm_bias"]
    return out


def vit_config_from_hf(cfg, num_classes, pooler):
    if cfg.hidden_act != "gelu" or not cfg.qkv_bias:
        raise ValueError("ViT: only gelu activations and qkv biases are supported")
    size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
    patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
    return dict(image_size=size, patch_size=patch, in_channels=cfg.num_channels, dim=cfg.hidden_size,
                num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads, mlp_hidden=cfg.intermediate_size,
                dropout=cfg.hidden_dropout_prob, eps=cfg.layer_norm_eps, num_classes=num_classes, pooler=pooler)


def vit_hf_config(cfg):
    from transformers import ViTConfig as HFViTConfig
    return HFViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.in_channels,
                       hidden_size=cfg.dim, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       intermediate_size=cfg.mlp_hidden, hidden_dropout_prob=cfg.dropout,
                       attention_probs_dropout_prob=cfg.dropout, layer_norm_eps=cfg.eps,
                       num_labels=max(cfg.num_classes, 1))


_VIT_COMMON = [
    ("embeddings.cls_token", "cls_token", False),
    ("embeddings.position_embeddings", "pos_embed", False),
    ("embeddings.patch_embeddings.projection.{p}", "patch_embed.{p}", False),
    ("layernorm.{p}", "norm.{p}", False),
    ("pooler.dense.{p}", "pooler.{p}", False),
]
VIT_KEYS = {  # transformers 4 (and the Hub's checkpoints) vs transformers 5 module names
    "v4": KeyMap(_VIT_COMMON + [
        ("encoder.layer.{i}.attention.output.dense.{p}", "blocks.{i}.mixer.proj.{p}", False),
        ("encoder.layer.{i}.layernorm_before.{p}", "blocks.{i}.norm1.{p}", False),
        ("encoder.layer.{i}.layernorm_after.{p}", "blocks.{i}.norm2.{p}", False),
        ("encoder.layer.{i}.intermediate.dense.{p}", "blocks.{i}.mlp.fc1.{p}", False),
        ("encoder.layer.{i}.output.dense.{p}", "blocks.{i}.mlp.fc2.{p}", False)]),
    "v5": KeyMap(_VIT_COMMON + [
        ("layers.{i}.attention.o_proj.{p}", "blocks.{i}.mixer.proj.{p}", False),
        ("layers.{i}.layernorm_before.{p}", "blocks.{i}.norm1.{p}", False),
        ("layers.{i}.layernorm_after.{p}", "blocks.{i}.norm2.{p}", False),
        ("layers.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc1.{p}", False),
        ("layers.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.fc2.{p}", False)]),
}
_VIT_QKV = {"v4": (re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)"),
                   "encoder.layer.{i}.attention.attention.{n}.{p}", ("query", "key", "value")),
            "v5": (re.compile(r"layers\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)"),
                   "layers.{i}.attention.{n}_proj.{p}", ("q", "k", "v"))}


def vit_naming():
    """Module names of the installed transformers ("v5" from 5.0), "v4" without transformers (the Hub's)."""
    try:
        import transformers
    except ImportError:
        return "v4"
    return "v5" if int(transformers.__version__.split(".")[0]) >= 5 else "v4"


def vit_from_hf_state_dict(sd):
    """tlv_fast ViT state dict from ViTModel / ViTForImageClassification's, in either transformers layout."""
    out, qkv = {}, {}
    for key, t in sd.items():
        key = key[len("vit."):] if key.startswith("vit.") else key
        if key.startswith("classifier."):
            out["head." + key.split(".", 1)[1]] = t
            continue
        for naming in ("v5", "v4"):
            pattern, _, names = _VIT_QKV[naming]
            m = pattern.fullmatch(key)
            if m:
                qkv[(int(m.group(1)), m.group(3), names.index(m.group(2)))] = t
                break
            ours, _ = VIT_KEYS[naming].to_ours(key)
            if ours is not None:
                out[ours] = t
                break
        else:
            raise KeyError(f"ViT: unexpected Hugging Face key {key!r}")
    for (i, p, j), _t in sorted(qkv.items()):
        if j == 0:
            out[f"blocks.{i}.mixer.qkv.{p}"] = torch.cat([qkv[(i, p, n)] for n in range(3)])
    return out


def vit_to_hf_state_dict(sd, naming=None, prefix="vit."):
    """ViTForImageClassification state dict (prefix "" for ViTModel) in the installed transformers' layout, or
    naming="v4" (transformers 4 / the Hub) or "v5"."""
    naming = naming or vit_naming()
    _, template, names = _VIT_QKV[naming]
    out = {}
    for key, t in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.mixer\.qkv\.(weight|bias)", key)
        if m:
            for n, part in zip(names, t.chunk(3)):
                out[prefix + template.format(i=m.group(1), n=n, p=m.group(2))] = part
        elif key.startswith("head."):
            out["classifier." + key.split(".", 1)[1]] = t
        else:
            theirs, _ = VIT_KEYS[naming].to_theirs(key)
            if theirs is None:
                raise KeyError(f"ViT: no Hugging Face name for {key!r}")
            out[prefix + theirs] = t
    return out


def hf_source(model_or_path):
    """(config, state_dict) of a transformers model, or of a local checkpoint directory: loaded through transformers
    when it is installed (the class named in config.json's "architectures", so every head and key layout comes
    along), else read directly from config.json and *.safetensors."""
    if not (isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__")):
        return model_or_path.config, model_or_path.state_dict()
    path = os.fspath(model_or_path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} is neither a transformers model nor a local checkpoint directory (no "
                         "config.json there). To start from a model on the Hugging Face hub, load it with "
                         f"transformers first and pass the model: model = transformers.AutoModel.from_pretrained("
                         f"{path!r}); then GPT.from_hf(model) (BERT.from_hf, ViT.from_hf alike)")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    try:
        import transformers
    except ImportError:
        from safetensors.torch import load_file
        sd = {}
        for f in sorted(os.listdir(path)):
            if f.endswith(".safetensors"):
                sd.update(load_file(os.path.join(path, f)))
        return _Namespace(cfg), sd
    arch = (cfg.get("architectures") or ["AutoModel"])[0]
    model = getattr(transformers, arch, transformers.AutoModel).from_pretrained(path)
    return model.config, model.state_dict()


class _Namespace(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


__all__ = ["KeyMap", "hf_source",
           "vit_config_from_hf", "vit_hf_config", "vit_from_hf_state_dict", "vit_to_hf_state_dict", "vit_naming",
           "bert_config_from_hf", "bert_hf_config", "bert_from_hf_state_dict", "bert_to_hf_state_dict",
           "gpt_config_from_hf", "gpt_hf_config", "gpt_from_hf_state_dict", "gpt_to_hf_state_dict"]
