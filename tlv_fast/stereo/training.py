"""Training and fine-tuning STTR with the published recipe (tlv_fast.stereo.augment.PUBLISHED_RECIPE): AdamW with
separate learning rates for the backbone, the regression head and the rest, an exponential decay per epoch, gradient
clipping, random crops and photometric augmentation of left and right independently; gradient checkpointing (the
model's default) and float16 mixed precision on a GPU.

Every epoch appends a row to OUT/metrics.csv and writes OUT/epoch_<N>.pth.tar: a checkpoint in the published code's
layout (state_dict with the published parameter names and the BatchNorm counters it expects, optimizer,
lr_scheduler, epoch, best_pred), plus this package's configuration and generator states, so that `--resume`
continues the same run, STTR.from_checkpoint loads it and so does the published code.
"""
import csv
import dataclasses
import math
import os
import time

import torch
from torch import nn

from .augment import PUBLISHED_RECIPE, training_transform

KEYS = ("loss", "rr", "l1_raw", "l1", "occ_be")  # sttr_loss's terms, as metrics.csv columns


class ResumeError(Exception):
    pass


def published_state_dict(model):
    """model.state_dict() plus what the published model's state dict also holds: a 0-dim num_batches_tracked per
    BatchNorm (its BatchNorms keep no running statistics; the counter is all that is left, tests/data/
    sttr_published_keys.txt), so that the published code's loader, which raises on missing keys, accepts it."""
    from ..models.sttr_features import StereoBatchNorm2d
    sd = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, StereoBatchNorm2d):
            sd[f"{name}.num_batches_tracked"] = torch.tensor(0)
    return sd


def param_groups(model, recipe, lr=None):
    """The published grouping: backbone, regression head, everything else (the transformer and the tokenizer). lr:
    replaces the recipe's base rate, the other two scaled with it (the published ratios)."""
    scale = 1.0 if lr is None else lr / recipe["lr"]
    groups = {"backbone": [], "regression_head": [], "rest": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            top = name.split(".")[0]
            groups[top if top in groups else "rest"].append(p)
    lrs = {"backbone": recipe["lr_backbone"] * scale, "regression_head": recipe["lr_regression"] * scale,
           "rest": recipe["lr"] * scale}
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


class _Augmented(torch.utils.data.Dataset):
    """dataset items through the training transform; the random draws depend only on (seed, epoch, index)."""

    def __init__(self, data, transform, seed):
        self.data, self.transform, self.seed, self.epoch = data, transform, seed, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) % 2**62)
        return self.transform(self.data[i], g)


def _to(batch, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# the published pipelines (augment.training_transform) by dataset; Middlebury and the synthetic pairs (not trained on
# in the published work) get Scene Flow's, which also uses their right-view ground truth
PIPELINE = {"sceneflow": "sceneflow", "kitti2015": "kitti2015", "middlebury": "sceneflow", "synthetic": "sceneflow"}


def train(data, out, *, dataset_name, preset="sttr", checkpoint=None, resume=None, epochs=None, crop=None,
          batch_size=None, lr=None, max_steps=None, device="cpu", amp=True, seed=0, workers=0, progress=None):
    """Train on `data` (a tlv_fast.stereo.datasets dataset) and write checkpoints and metrics.csv under `out`.

    checkpoint: initial weights (fine-tuning); resume: a checkpoint of this function to continue. epochs, crop (the
    minimum random crop (height, width), as published), batch_size, lr: default to the published values for the
    dataset (PUBLISHED_RECIPE). With batch_size > 1 the crop is exactly `crop` (pairs of one batch share a size).
    The learning rate decays by lr_decay_rate per epoch except in Scene Flow pre-training from scratch (as the
    published scripts run it). Returns the per-epoch metric rows."""
    from ..models import STTR, sttr_loss
    from .datasets import collate
    from .inference import load_model
    recipe = PUBLISHED_RECIPE
    device = torch.device(device)
    amp = amp and device.type == "cuda"
    epochs = epochs or recipe["epochs"].get(dataset_name, recipe["epochs"]["default"])
    crop = crop or recipe["crop"].get(dataset_name, recipe["crop"]["default"])
    batch_size = batch_size or recipe["batch_size"].get(dataset_name, recipe["batch_size"]["default"])
    decay = dataset_name != "sceneflow" or checkpoint is not None or recipe["lr_decay_during_pretraining"]
    torch.manual_seed(seed)
    state = None
    if resume is not None:
        state = torch.load(resume, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"state_dict", "optimizer", "lr_scheduler", "epoch"} <= set(state):
            raise ResumeError("not a checkpoint written by `stereo train` (needs state_dict, optimizer, "
                              "lr_scheduler and epoch)")
        model, _ = load_model(state, preset=preset)
    elif checkpoint is not None:
        model, _ = load_model(checkpoint, preset=preset)
    else:
        model = STTR.from_preset(preset)
    model = model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, recipe, lr), weight_decay=recipe["weight_decay"])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=recipe["lr_decay_rate"])
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    start, best = 0, math.inf
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        if amp and "amp" in state:
            scaler.load_state_dict(state["amp"])
        start, best = int(state["epoch"]) + 1, float(state.get("best_pred", math.inf))
        seed = int(state.get("tlv_fast_seed", seed))
    h, w = crop
    aug = _Augmented(data, training_transform(h, w, PIPELINE[dataset_name], exact=batch_size > 1), seed)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(aug, batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate,
                                         num_workers=workers, drop_last=len(aug) >= batch_size)
    path = os.path.join(out, "metrics.csv")
    fields = ["epoch", "steps", "loss", "rr", "l1_raw", "l1", "occ_be", "epe", "lr", "seconds"]
    rows = []
    for epoch in range(start, epochs):
        aug.epoch = epoch
        g.manual_seed(hash((seed, epoch)) % 2**62)
        steps = len(loader) if max_steps is None else min(max_steps, len(loader))
        sums, t0, n, report = None, time.perf_counter(), 0, max(1, steps // 50)
        for i, batch in enumerate(loader):
            if i >= steps:
                break
            batch = _to(batch, device)
            left, right = STTR.preprocess(batch["left"]), STTR.preprocess(batch["right"])
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                outputs = model(left, right)
            losses = sttr_loss(outputs, batch["disp"], batch.get("occ_mask"), batch.get("occ_mask_right"),
                               weights=recipe["loss_weights"])
            opt.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), recipe["clip_max_norm"])
            scaler.step(opt)
            scaler.update()
            with torch.no_grad():  # the step's figures stay on the device; one transfer per report
                valid = batch["disp"] > 0
                if batch.get("occ_mask") is not None:
                    valid = valid & ~batch["occ_mask"]
                err = (outputs["disparity"].float() - batch["disp"]).abs()
                epe = torch.where(valid, err, 0.0).sum() / valid.sum()  # NaN when no pixel has ground truth
                step = torch.stack([losses[k].detach().float() for k in KEYS] + [epe])
            sums = step if sums is None else sums + step
            n += 1
            if progress is not None and (n == steps or n % report == 0):
                mean = dict(zip(KEYS + ("epe",), (sums / n).tolist()))
                progress(n, steps, f"epoch {epoch} loss {mean['loss']:.3f} EPE {mean['epe']:.2f} px")
        if decay:
            sched.step()
        means = dict(zip(KEYS + ("epe",), (sums / n).tolist())) if n else {}
        row = {"epoch": epoch, "steps": n, **means,
               "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 3)}
        rows.append(row)
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in fields})
        best = min(best, row.get("epe", math.inf))
        ckpt = {"state_dict": published_state_dict(model), "optimizer": opt.state_dict(),
                "lr_scheduler": sched.state_dict(), "epoch": epoch, "best_pred": best,
                "tlv_fast_config": {k: v for k, v in dataclasses.asdict(model.config).items()
                                    if isinstance(v, (int, float, str, bool))},
                "tlv_fast_seed": seed}
        if amp:
            ckpt["amp"] = scaler.state_dict()
        torch.save(ckpt, os.path.join(out, f"epoch_{epoch}.pth.tar"))
    return rows
