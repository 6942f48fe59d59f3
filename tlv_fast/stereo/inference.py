"""Running STTR on image pairs: loading a model (published weights, a checkpoint of `stereo train`, or random
weights), and predicting disparity and occlusion for one pair of any size."""
import dataclasses

import torch
import torch.nn.functional as F

MIN_SIZE = 121  # STTR's smallest input side (its SPP pools 16 x 16 on the 1/8-resolution map)


def load_model(checkpoint=None, preset="sttr", device="cpu", **overrides):
    """(model in eval mode on device, random) where random says that no weights were loaded.

    checkpoint: None (the preset's architecture with random weights), or a path / dict holding a state dict with the
    published key names: the published STTR files (loaded with the published architecture and its code's behaviour,
    parity=True) or a checkpoint written by `stereo train` (which records its own configuration)."""
    from ..models import STTR, STTRConfig
    if checkpoint is None:
        return STTR.from_preset(preset, **overrides).to(device).eval(), True
    ckpt = checkpoint
    if not isinstance(ckpt, dict):
        try:
            ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint {checkpoint}: no such file") from None
        except Exception as e:
            raise RuntimeError(f"checkpoint {checkpoint}: cannot read it as a torch checkpoint "
                               f"({type(e).__name__}: {e})") from e
    config = None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("tlv_fast_config"), dict):
        known = {f.name for f in dataclasses.fields(STTRConfig)}
        config = STTRConfig(**{k: v for k, v in ckpt["tlv_fast_config"].items() if k in known})
        config = dataclasses.replace(config, **overrides)
        overrides = {}
    model = STTR.from_checkpoint(ckpt, config=config, **overrides)
    return model.to(device).eval(), False


def _as_image(name, t):
    if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"{name} must be a (3, H, W) image tensor, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise ValueError(f"{name} must be uint8 (0..255) or float in [0, 1], got {t.dtype}")
    return t


@torch.no_grad()
def predict(model, left, right, fp16=False):
    """Disparity and occlusion of the left image of one rectified pair.

    left, right: (3, H, W) uint8 or float in [0, 1], the same size, any size (sides under the model's minimum of 121
    pixels are padded at the bottom / right by repeating the edge, and the outputs cropped back). fp16: run under
    float16 autocast (CUDA). Returns a dict of CPU float32 (H, W) tensors: disparity (pixels) and occlusion
    (probability)."""
    from ..models import STTR
    left, right = _as_image("left", left), _as_image("right", right)
    if left.shape != right.shape:
        raise ValueError(f"left and right must have the same size, got {tuple(left.shape)} and {tuple(right.shape)}")
    _, H, W = left.shape
    device = next(model.parameters()).device
    if fp16 and device.type != "cuda":
        raise ValueError(f"fp16 needs a CUDA model (float16 autocast); this model is on {device}")
    pad_h, pad_w = max(MIN_SIZE - H, 0), max(MIN_SIZE - W, 0)
    x = torch.stack([left, right]).to(device)
    x = STTR.preprocess(x)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
        out = model(x[:1], x[1:])
    return {"disparity": out["disparity"][0, :H, :W].float().cpu(),
            "occlusion": out["occlusion"][0, :H, :W].float().cpu()}
