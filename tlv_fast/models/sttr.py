"""STTR, the stereo transformer (Li et al., "Revisiting Stereo Depth Estimation From a Sequence-to-Sequence
Perspective with Transformers", ICCV 2021), on tlv_fast's fused relative-position attention and Sinkhorn."""
import contextlib
import dataclasses
import pickle

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import backends
from ..nn import RelativeMultiheadAttention
from .common import Presets, check_backend, renamed_fields
from .sttr_checkpoint import sttr_from_published_state_dict
from .sttr_features import Backbone, Tokenizer, WNConv2d
from .sttr_head import RegressionHead


@renamed_fields(hidden_dim="dim")
@dataclasses.dataclass
class STTRConfig:
    """STTR (Li et al., ICCV 2021). Defaults are the paper's and the published checkpoint's: 128 channels, 8 heads,
    6 self/cross layers, attention stride 3, optimal transport with 10 Sinkhorn iterations, a context adjustment
    layer of 8 blocks (16 features, expansion 4).

    parity: reproduce the published code where it departs from the paper (docs/sttr.md, "Where the published code
        departs from the paper"): the raw occlusion is 0 and the window is not renormalised where its mass is
        < min_window_mass (or where a passed ground-truth occlusion is true); one token is W / W' pixels wide rather
        than the stride; the relative-response target omits the half-stride offset. Batch > 1 is correct in both
        modes.
    gradient_checkpointing: recompute every attention layer in backward (training only), as published.
    backend: see tlv_fast.backends: "auto", "reference" (eager everything), or a mapping per op, e.g.
        {"relpos_attention": "triton", "optimal_transport": "native"} for the compiled kernels only (raising if one
        cannot run). A single compiled name must be implemented by both ops (checked here).
    tokenizer_chunk_rows: without autograd (inference), the tokenizer's full-resolution last stage runs in chunks of
        this many image rows and keeps only the rows and columns the transformer reads (Tokenizer, sttr_features.py):
        the same outputs in a fraction of the memory. 0 computes the full-resolution maps as in training.
    transformer_chunk_lines: without autograd, the transformer runs this many epipolar line pairs at a time through
        all its layers (Transformer.forward); 0 runs every line at once as in training.
    cal_chunk_rows: without autograd, the context adjustment layer runs on chunks of this many image rows (plus a
        halo; ContextAdjustment.forward); 0 runs the whole image at once as in training.
    """
    dim: int = 128
    num_heads: int = 8
    num_layers: int = 6
    stride: int = 3
    sinkhorn_iters: int = 10
    regression: str = "ot"  # or "softmax" (the paper's ablation: a row softmax over the dustbin-augmented scores)
    cal: bool = True
    cal_blocks: int = 8
    cal_feat_dim: int = 16
    cal_expansion: int = 4
    min_window_mass: float = 0.1
    parity: bool = False
    gradient_checkpointing: bool = True
    backend: object = "auto"
    tokenizer_chunk_rows: int = 32
    transformer_chunk_lines: int = 32
    cal_chunk_rows: int = 128

    def __post_init__(self):
        if self.dim % self.num_heads or self.dim % 2:
            raise ValueError(f"STTRConfig: dim ({self.dim}) must be even and divisible by num_heads "
                             f"({self.num_heads})")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"STTRConfig: stride must be an int >= 1, got {self.stride!r}")
        if self.regression not in ("ot", "softmax"):
            raise ValueError(f"STTRConfig: regression must be 'ot' or 'softmax', got {self.regression!r}")
        for name in ("tokenizer_chunk_rows", "transformer_chunk_lines", "cal_chunk_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"STTRConfig: {name} must be an int >= 0 (0: no chunking), got {value!r}")
        if self.num_layers < 1:
            raise ValueError(f"STTRConfig: num_layers must be >= 1, got {self.num_layers}")
        check_backend(self, ("relpos_attention", "optimal_transport"))


STTR_PRESETS = {
    "sttr": {},  # the published architecture
    "small": dict(dim=32, num_heads=4, num_layers=3, cal_blocks=2),  # the CPU demo
    "tiny": dict(dim=16, num_heads=2, num_layers=2, cal_blocks=1, cal_feat_dim=8, cal_expansion=2),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SelfAttnLayer(nn.Module):
    """Pre-LN self attention along each epipolar line, no MLP: F = F + MHA_rel(LN(F)), offsets i - j."""

    def __init__(self, dim, heads, backend):
        super().__init__()
        self.self_attn = RelativeMultiheadAttention(dim, heads, backend=backends.pick(backend, "relpos_attention"))
        self.norm1 = nn.LayerNorm(dim)

    def forward(self, feat, pos_scale):  # feat (2R, W', C): left lines then right lines
        return feat + self.self_attn(self.norm1(feat), pos_scale=pos_scale)


class CrossAttnLayer(nn.Module):
    """Cross attention, one module for both directions: right lines read the left ones, then the left lines read the
    updated (re-normalised) right ones; offsets x_L - x_R. The last layer returns only the left-query call's
    head-summed logits with keys j > i masked (the matching scores), never its feature update."""

    def __init__(self, dim, heads, backend):
        super().__init__()
        self.cross_attn = RelativeMultiheadAttention(dim, heads, backend=backends.pick(backend, "relpos_attention"))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, feat, pos_scale, last):
        r = feat.shape[0] // 2
        a, b = self.norm1(feat).split(r)  # left, right
        right = feat[r:] + self.cross_attn(b, a, a, offset_sign=-1, pos_scale=pos_scale)
        c = self.norm2(right)
        if last:
            return self.cross_attn(a, c, c, offset_sign=1, mask_upper=True, return_logits=True,
                                   pos_scale=pos_scale, need_output=False)
        left = feat[:r] + self.cross_attn(a, c, c, offset_sign=1, pos_scale=pos_scale)
        return torch.cat([left, right])


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.checkpointing = cfg.gradient_checkpointing
        self.self_attn_layers = nn.ModuleList(
            [SelfAttnLayer(cfg.dim, cfg.num_heads, cfg.backend) for _ in range(cfg.num_layers)])
        self.cross_attn_layers = nn.ModuleList(
            [CrossAttnLayer(cfg.dim, cfg.num_heads, cfg.backend) for _ in range(cfg.num_layers)])
        self.norm = nn.LayerNorm(cfg.dim)  # unused in forward; kept for the published checkpoint's keys

    def _run(self, layer, *args):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(self, feat, pos_scale, chunk_lines=0):
        """feat (2R, W', C), left lines then right lines -> head-summed logits of the last layer (R, W', W').

        chunk_lines > 0 (inference): every layer only mixes tokens of one line (self attention) or of one line pair
        (cross attention), so the lines go through all the layers a chunk of pairs at a time: the same values with
        the activations of chunk_lines pairs alive instead of all R."""
        r = feat.shape[0] // 2
        if 0 < chunk_lines < r:
            bounds = [(a, min(a + chunk_lines, r)) for a in range(0, r, chunk_lines)]
            return torch.cat([self(torch.cat([feat[a:b], feat[r + a:r + b]]), pos_scale) for a, b in bounds])
        last = len(self.self_attn_layers) - 1
        for i, (self_layer, cross_layer) in enumerate(zip(self.self_attn_layers, self.cross_attn_layers)):
            feat = self._run(self_layer, feat, pos_scale)
            feat = self._run(cross_layer, feat, pos_scale, i == last)
        return feat


class STTR(Presets, nn.Module):
    """The stereo transformer.

    forward(left, right, occ_mask=None, return_intermediates=False) with left, right (B, 3, H, W) ImageNet-
    normalised images (:meth:`preprocess` makes them from uint8 or [0, 1] images), H, W >= 121. Returns a dict:
        disparity (B, H, W) left disparity in pixels; occlusion (B, H, W) probability;
        disparity_low_res (B, H', W') the raw disparity in pixels on the token grid (rows, cols = s//2 :: s);
        transport (B, H', W'+1, W'+1) the optimal-transport plan with dustbins (every real row sums to 1);
        occlusion_low_res, disparity_raw (tokens), window_mass (B, H', W'); sampled_rows, sampled_cols, scale
        (pixels per token), stride, parity (what sttr_loss needs);
        with return_intermediates: tokens_left, tokens_right (B, C, H', W') the sampled tokens, and logits
        (B, H', W', W') the last layer's head-summed logits (-inf where masked).
    occ_mask (B, H, W) bool ground-truth occlusion is used only with config.parity (the published code zeroes the
    raw occlusion there).
    """
    PRESETS, CONFIG = STTR_PRESETS, STTRConfig

    def __init__(self, config=None, device=None, dtype=None):
        super().__init__()
        self.config = cfg = config or STTRConfig()
        with torch.device(device) if device is not None else contextlib.nullcontext():  # factories build there
            self.backbone = Backbone()
            self.tokenizer = Tokenizer(cfg.dim)
            self.transformer = Transformer(cfg)
            self.regression_head = RegressionHead(cfg)
            self.reset_parameters()
        if dtype is not None:
            self.to(dtype)

    def reset_parameters(self):
        """The published initialisation: Kaiming-normal (fan_out) convolutions with zero biases, unit norms;
        attention as torch.nn.MultiheadAttention; weight-normalised and transposed convolutions keep their default
        initialisation (only their biases are zeroed, as in the published code)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, WNConv2d):
                nn.init.zeros_(m.bias)

    @staticmethod
    def preprocess(images):
        """(B, 3, H, W) uint8 (0..255) or float in [0, 1] -> ImageNet-normalised float32, as the model expects."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, left, right, occ_mask=None, return_intermediates=False):
        cfg = self.config
        for name, t in (("left", left), ("right", right)):
            if not isinstance(t, torch.Tensor) or t.ndim != 4 or t.shape[1] != 3 or not t.is_floating_point():
                raise ValueError(f"STTR: {name} must be a float tensor (B, 3, H, W), got "
                                 f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        if left.shape != right.shape or left.dtype != right.dtype:
            raise ValueError(f"STTR: left and right must have the same shape and dtype, got {tuple(left.shape)} "
                             f"{left.dtype} and {tuple(right.shape)} {right.dtype}")
        B, _, H, W = left.shape
        if B == 0:
            raise ValueError("STTR: left and right must hold at least one stereo pair, got batch 0")
        want = next(self.parameters()).dtype
        if left.dtype != want and not torch.is_autocast_enabled(left.device.type):
            raise ValueError(f"STTR: left and right must have the model's dtype {want} (or run under torch.autocast),"
                             f" got {left.dtype}; convert the images or the model (model.to({left.dtype}))")
        if occ_mask is not None and (not isinstance(occ_mask, torch.Tensor) or occ_mask.dtype != torch.bool
                                     or occ_mask.shape != (B, H, W)):
            raise ValueError(f"STTR: occ_mask must be a bool tensor (B, H, W) = {(B, H, W)}, got "
                             f"{getattr(occ_mask, 'dtype', type(occ_mask).__name__)} "
                             f"{tuple(getattr(occ_mask, 'shape', ()))}")
        s = cfg.stride
        rows = torch.arange(s // 2, H, s, device=left.device)
        cols = torch.arange(s // 2, W, s, device=left.device)
        h, w = len(rows), len(cols)
        scale = W / w if cfg.parity else float(s)  # pixels per token

        feats = self.backbone(torch.cat([left, right]))
        if cfg.tokenizer_chunk_rows and not torch.is_grad_enabled():  # only the sampled tokens, chunk by chunk
            tokens = self.tokenizer(feats, rows, cols, cfg.tokenizer_chunk_rows)  # (2B, C, H', W')
        else:
            tokens = self.tokenizer(feats).index_select(2, rows).index_select(3, cols)
        del feats
        feat = tokens.permute(0, 2, 3, 1).reshape(2 * B * h, w, cfg.dim)  # lines: left (b, y), then right
        chunk = cfg.transformer_chunk_lines if not torch.is_grad_enabled() else 0
        logits = self.transformer(feat, scale, chunk).view(B, h, w, w)

        occ_tokens = None
        if occ_mask is not None and cfg.parity:
            occ_tokens = occ_mask.index_select(1, rows).index_select(2, cols)
        out = self.regression_head(logits, left, scale, occ_tokens)
        out.update(sampled_rows=rows, sampled_cols=cols, scale=scale, stride=s, parity=cfg.parity)
        if return_intermediates:
            out.update(tokens_left=tokens[:B], tokens_right=tokens[B:], logits=logits)
        return out

    @classmethod
    def from_checkpoint(cls, checkpoint, config=None, map_location="cpu", weights_only=True, **overrides):
        """Load the published weights (sceneflow_pretrained_model.pth.tar, kitti_finetuned_model.pth.tar) or any
        state dict with the published key names (tests/data/sttr_published_keys.txt, docs/sttr.md §6).

        checkpoint: a path, or a dict (a state dict, or a checkpoint holding one under 'state_dict'). config:
        defaults to the published architecture with parity=True (the weights were trained with the published code's
        behaviour); keyword overrides apply on top. Legacy BatchNorm running statistics are dropped; any other
        missing or unexpected key raises.
        """
        source = "the dict passed"
        if not isinstance(checkpoint, dict):
            source = str(checkpoint)
            try:
                checkpoint = torch.load(checkpoint, map_location=map_location, weights_only=weights_only)
            except pickle.UnpicklingError as e:  # what weights_only=True raises on objects it will not load
                if not weights_only:
                    raise
                raise RuntimeError(f"STTR.from_checkpoint: torch.load(weights_only=True) failed ({e}); if you trust "
                                   "the file, pass weights_only=False") from e
            except (EOFError, RuntimeError) as e:  # an empty or truncated file, not a torch.save archive
                raise RuntimeError(f"STTR.from_checkpoint: cannot read the checkpoint {source}: "
                                   f"{type(e).__name__}: {e or 'the file ended early (empty or truncated)'}") from e
        if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in
                                                        checkpoint.get("state_dict", checkpoint).values()):
            kind = type(checkpoint).__name__
            raise RuntimeError(f"STTR.from_checkpoint: the checkpoint {source} must hold a state dict (a dict of "
                               f"tensors, or a dict with one under 'state_dict'), got {kind}")
        cfg = config or STTRConfig(parity=True)
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        model = cls(cfg)
        sd = sttr_from_published_state_dict(checkpoint)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"STTR.from_checkpoint: keys do not match the architecture; missing {missing}, "
                               f"unexpected {unexpected}")
        return model
