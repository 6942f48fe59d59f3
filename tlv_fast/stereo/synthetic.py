"""Synthetic stereo pairs with exact ground truth (docs/sttr.md §7): layered random-texture stereograms.

Each layer is a blurred random texture on a support (the background everywhere, rectangles in front) at an integer
disparity, nearer layers at larger disparities. The left image paints the layers far to near; the right image does
the same with every layer shifted left by its disparity. Ground truth follows exactly: the left disparity is the
visible layer's, a left pixel is occluded when its match x - d leaves the image or shows a nearer layer, a right
pixel when no visible left pixel maps to it.
"""
import math

import torch
import torch.nn.functional as F


def _blur(x, sigma):
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    x = F.conv2d(F.pad(x[None], (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]


def synthetic_stereo(height=128, width=192, *, seed=0, num_layers=3, max_disparity=24, disparity_step=3,
                     sigma=1.2):
    """One stereo pair with exact ground truth.

    Args:
        height, width: image size.
        seed: the pair is a deterministic function of the arguments.
        num_layers: the background plus num_layers - 1 foreground rectangles.
        max_disparity: the largest disparity (pixels).
        disparity_step: every disparity is a multiple of it (use the attention stride for token-aligned matches).
        sigma: Gaussian blur of the textures (pixels), so that strided sampling keeps the signal.

    Returns:
        dict of left, right (3, H, W) float32 in [0, 1]; disp, disp_right (H, W) float32 (pixels, > 0 everywhere);
        occ_mask, occ_mask_right (H, W) bool.
    """
    if num_layers < 1 or disparity_step < 1 or max_disparity < disparity_step * num_layers:
        raise ValueError(f"synthetic_stereo: need num_layers >= 1, disparity_step >= 1 and max_disparity >= "
                         f"disparity_step * num_layers, got {num_layers}, {disparity_step}, {max_disparity}")
    g = torch.Generator().manual_seed(seed)
    levels = torch.randperm(max_disparity // disparity_step, generator=g)[:num_layers] + 1
    disps = (levels.sort().values * disparity_step).tolist()  # far (small) to near (large)
    wt = width + max(disps)  # texture width in left coordinates: the right view reads up to x + d
    masks, textures = [], []
    for k, d in enumerate(disps):
        tex = torch.rand(3, height, wt, generator=g)
        tex = _blur(tex, sigma)
        tex = (tex - tex.mean()) / (tex.std() + 1e-6) * 0.18 + torch.rand(3, 1, 1, generator=g) * 0.5 + 0.25
        textures.append(tex.clamp(0, 1))
        mask = torch.ones(height, wt, dtype=torch.bool)
        if k:
            h0 = int(torch.randint(height // 5, height // 2 + 1, (1,), generator=g))
            w0 = int(torch.randint(width // 6, width // 2 + 1, (1,), generator=g))
            y0 = int(torch.randint(0, height - h0 + 1, (1,), generator=g))
            x0 = int(torch.randint(0, wt - w0 + 1, (1,), generator=g))
            mask = torch.zeros_like(mask)
            mask[y0:y0 + h0, x0:x0 + w0] = True
        masks.append(mask)

    x = torch.arange(width)
    id_l = torch.zeros(height, width, dtype=torch.long)
    id_r = torch.zeros(height, width, dtype=torch.long)
    for k, (mask, d) in enumerate(zip(masks, disps)):
        id_l[mask[:, :width]] = k
        id_r[mask[:, x + d]] = k  # right pixel x shows left coordinate x + d of layer k
    d_tab = torch.tensor(disps)
    disp_l, disp_r = d_tab[id_l], d_tab[id_r]
    tex = torch.stack(textures)  # (K, 3, H, Wt)
    rows = torch.arange(height)[:, None]
    left = tex[id_l, :, rows, x].permute(2, 0, 1)
    right = tex[id_r, :, rows, x + disp_r].permute(2, 0, 1)

    src = x - disp_l  # where each left pixel lands in the right image
    occ_l = (src < 0) | (id_r.gather(1, src.clamp_min(0)) != id_l)
    dst = x + disp_r
    occ_r = (dst >= width) | (id_l.gather(1, dst.clamp_max(width - 1)) != id_r)
    return {"left": left.contiguous(), "right": right.contiguous(), "disp": disp_l.float(),
            "disp_right": disp_r.float(), "occ_mask": occ_l, "occ_mask_right": occ_r}


def synthetic_batch(batch, height=128, width=192, *, seed=0, **kwargs):
    """`batch` pairs (seeds seed, seed + 1, ...) stacked: left, right (B, 3, H, W); the rest (B, H, W)."""
    pairs = [synthetic_stereo(height, width, seed=seed + i, **kwargs) for i in range(batch)]
    return {k: torch.stack([p[k] for p in pairs]) for k in pairs[0]}
