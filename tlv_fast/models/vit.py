"""ViT: linear patch embedding (or a hybrid CNN stem with patch size 1), a prepended class token, learned 1-D
positions (interpolated for other image sizes), pre-norm encoder, MLP head on [CLS]."""
import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.block import MLP, Block, SelfAttention, init_weights
from .common import Presets, build_config, check_backend, check_positive, renamed_fields
from .hf import hf_source, vit_config_from_hf, vit_from_hf_state_dict, vit_hf_config, vit_to_hf_state_dict


@renamed_fields(n_layer="num_layers", n_head="num_heads")
@dataclasses.dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_hidden: int = 3072
    dropout: float = 0.0
    eps: float = 1e-12
    num_classes: int = 1000         # 0: no classification head
    pooler: bool = False            # ViTModel's tanh pooler on [CLS]
    stem_channels: tuple = ()       # hybrid: a conv stem (3x3, stride 2, BN, ReLU per entry), then patch size 1
    backend: object = "auto"        # see tlv_fast.backends

    def __post_init__(self):
        check_positive(self, "image_size", "patch_size", "in_channels", "dim", "num_layers", "num_heads",
                       "mlp_hidden")
        check_backend(self, ("attention",))


VIT_PRESETS = {  # ViT paper, Table 1
    "vit-base-16": dict(num_layers=12, dim=768, num_heads=12, mlp_hidden=3072, patch_size=16),
    "vit-large-16": dict(num_layers=24, dim=1024, num_heads=16, mlp_hidden=4096, patch_size=16),
    "vit-huge-14": dict(num_layers=32, dim=1280, num_heads=16, mlp_hidden=5120, patch_size=14),
    "tiny": dict(image_size=32, patch_size=8, num_layers=2, dim=64, num_heads=4, mlp_hidden=128, num_classes=10),
}


class ViT(Presets, nn.Module):
    """ViT. ``device`` / ``dtype`` build the parameters there directly (``device="meta"`` allocates nothing)."""
    PRESETS, CONFIG = VIT_PRESETS, ViTConfig

    def __init__(self, config: ViTConfig, device=None, dtype=None):
        super().__init__()
        c = self.config = config
        kw = dict(device=device, dtype=dtype)
        stem, ch, stride = [], c.in_channels, 1
        for out_ch in c.stem_channels:
            stem += [nn.Conv2d(ch, out_ch, 3, 2, 1, bias=False, **kw), nn.BatchNorm2d(out_ch, **kw),
                     nn.ReLU(inplace=True)]
            ch, stride = out_ch, stride * 2
        self.stem = nn.Sequential(*stem)
        patch = 1 if c.stem_channels else c.patch_size
        self.feature_stride = stride * patch
        self.patch_embed = nn.Conv2d(ch, c.dim, patch, patch, **kw)
        grid = c.image_size // self.feature_stride
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim, **kw))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, c.dim, **kw))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.dim, partial(SelfAttention, num_heads=c.num_heads, dropout=c.dropout, backend=c.backend, **kw),
                  partial(MLP, hidden=c.mlp_hidden, **kw), partial(nn.LayerNorm, eps=c.eps, **kw),
                  norm_first=True, dropout=c.dropout)
            for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(c.dim, eps=c.eps, **kw)
        if c.pooler:
            self.pooler = nn.Linear(c.dim, c.dim, **kw)
        if c.num_classes:
            self.head = nn.Linear(c.dim, c.num_classes, **kw)
        init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @classmethod
    def from_hf(cls, model_or_path, **overrides):
        """From a transformers ViTModel or ViTForImageClassification (either transformers 4 or 5 module layout),
        or a local checkpoint directory."""
        hf_config, sd = hf_source(model_or_path)
        sd = vit_from_hf_state_dict(sd)
        num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
        fields = vit_config_from_hf(hf_config, num_classes, "pooler.weight" in sd)
        model = cls(build_config(ViTConfig, fields, overrides))
        model.load_state_dict(sd, strict=True)
        return model

    def to_hf_state_dict(self, naming=None, prefix="vit."):
        return vit_to_hf_state_dict(self.state_dict(), naming, prefix)

    def hf_config(self):
        return vit_hf_config(self.config)

    def position_embeddings(self, grid_h, grid_w):
        """The learned positions for a grid_h x grid_w patch grid: bicubic interpolation of the trained grid when
        it differs (as transformers' interpolate_pos_encoding)."""
        n = self.pos_embed.shape[1] - 1
        side = int(round(n ** 0.5))
        if grid_h == side and grid_w == side:
            return self.pos_embed
        patch_pos = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], 1)

    def forward(self, pixel_values, labels=None):
        """pixel_values (B, C, H, W) with H, W multiples of the feature stride (any such size: positions are
        interpolated; other sizes raise). Returns a dict: hidden (B, 1 + patches, dim) after the final norm, pooled
        (with the pooler), logits (with the head) and loss given labels."""
        x = pixel_values
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"ViT: pixel_values must be a float tensor (B, C, H, W), got "
                             f"{getattr(pixel_values, 'dtype', type(pixel_values).__name__)} "
                             f"{tuple(getattr(pixel_values, 'shape', ()))}")
        s = self.feature_stride
        if pixel_values.shape[-2] % s or pixel_values.shape[-1] % s or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(f"ViT: pixel_values must have {self.config.in_channels} channels and a height and width "
                             f"that are multiples of {s} (the patch), got {tuple(pixel_values.shape[1:])}; resize or "
                             "pad the images (a patch convolution would drop the remainder silently)")
        x = self.patch_embed(self.stem(pixel_values))  # (B, dim, h, w)
        B, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.position_embeddings(h, w)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        out = {"hidden": x}
        if self.config.pooler:
            out["pooled"] = torch.tanh(self.pooler(x[:, 0]))
        if self.config.num_classes:
            out["logits"] = self.head(x[:, 0])
            if labels is not None:
                out["loss"] = F.cross_entropy(out["logits"].float(), labels)
        return out
