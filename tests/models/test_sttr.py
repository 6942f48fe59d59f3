"""STTR end to end: shapes, batching, the published checkpoint layout, the regression head on an oracle cost, the
fused path against the all-reference path, a spec transcription of the transformer, losses, metrics, learning."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from tlv_fast import optimal_transport
from tlv_fast.formulas import add_dustbins
from tlv_fast.models import STTR, STTRConfig, gt_response, stereo_metrics, sttr_loss, window_regression
from tlv_fast.models.sttr_checkpoint import sttr_from_published_state_dict
from tlv_fast.stereo.synthetic import synthetic_batch, synthetic_stereo

from helpers import REPO, assert_close, spec_relpos_mha

COMPILED = {"relpos_attention": "triton", "optimal_transport": "native"}  # the kernels only, no reference fallback

# Parameter counts of the published model (docs/sttr.md §6): 303 parameters, 2,513,811 values.
PUBLISHED_COUNTS = {"backbone": 1_050_800, "tokenizer": 503_728, "transformer": 797_440, "regression_head": 161_843}
BN_COUNT = 48


def _pair(batch, h, w, seed=0):
    b = synthetic_batch(batch, h, w, seed=seed)
    return STTR.preprocess(b["left"]), STTR.preprocess(b["right"]), b


@pytest.fixture(scope="module")
def published():
    torch.manual_seed(0)
    return STTR(STTRConfig()).eval()


def test_parameters_match_the_published_architecture(published):
    sd = published.state_dict()
    assert len(sd) == 303 and sum(v.numel() for v in sd.values()) == 2_513_811
    for part, n in PUBLISHED_COUNTS.items():
        assert sum(v.numel() for k, v in sd.items() if k.startswith(part + ".")) == n, part
    shapes = {"backbone.in_conv.0.weight": (16, 3, 3, 3), "backbone.resblock_2.0.downsample.1.bias": (128,),
              "tokenizer.bottle_neck.denselayer4.norm1.weight": (140,), "tokenizer.up.2.convTrans.0.weight":
              (16, 128, 3, 3), "tokenizer.dense_block.2.double_conv.0.weight": (128, 131, 3, 3),
              "transformer.cross_attn_layers.5.norm2.bias": (128,), "transformer.norm.weight": (128,),
              "regression_head.phi": (), "regression_head.cal.layers.7.module.0.weight_g": (64, 1, 1, 1),
              "regression_head.cal.layers.0.module.0.weight_v": (64, 17, 3, 3),
              "regression_head.cal.occ_head.6.weight": (1, 16, 3, 3)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def _published_keys():
    """The 351 (key, shape) pairs of the published state dict (tests/data/sttr_published_keys.txt; docs/sttr.md §6)."""
    path = os.path.join(REPO, "tests", "data", "sttr_published_keys.txt")
    out = {}
    with open(path) as f:
        lines = f.readlines()
    for line in lines:
        if line.strip() and not line.startswith("#"):
            key, shape = line.split()
            out[key] = () if shape == "-" else tuple(int(x) for x in shape.split(","))
    return out


def test_every_published_key_maps_one_to_one(published):
    keys = _published_keys()
    assert len(keys) == 351
    ours = {k: tuple(v.shape) for k, v in published.state_dict().items()}
    kept = {k: v for k, v in keys.items() if not k.endswith(".num_batches_tracked")}
    assert ours == kept
    assert sttr_from_published_state_dict({k: torch.zeros(s) for k, s in keys.items()}).keys() == ours.keys()
    model = STTR.from_checkpoint({"state_dict": {k: torch.zeros(s) for k, s in keys.items()}})
    assert model.regression_head.phi.item() == 0


def _published_style(model):
    """The state dict as the published files hold it: plus legacy running statistics for every BatchNorm."""
    sd = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            sd[f"{name}.running_mean"] = torch.zeros(m.num_features)
            sd[f"{name}.running_var"] = torch.ones(m.num_features)
            sd[f"{name}.num_batches_tracked"] = torch.tensor(0)
    return sd


def test_from_checkpoint_loads_published_keys_and_fails_loudly(published, tmp_path):
    sd = _published_style(published)
    assert len(sd) == 303 + 3 * BN_COUNT
    path = tmp_path / "sceneflow_pretrained_model.pth.tar"
    torch.save({"epoch": 14, "state_dict": sd, "best_pred": 0.5}, path)
    model = STTR.from_checkpoint(str(path))
    assert model.config.parity and model.config.dim == 128
    for k, v in published.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    renamed = {k.replace(".weight_g", ".parametrizations.weight.original0")
               .replace(".weight_v", ".parametrizations.weight.original1"): v for k, v in sd.items()}
    assert sttr_from_published_state_dict(renamed).keys() == sttr_from_published_state_dict(sd).keys()
    with pytest.raises(RuntimeError, match="unexpected.*backbone.extra"):
        STTR.from_checkpoint({**sd, "backbone.extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="missing.*regression_head.phi"):
        STTR.from_checkpoint({k: v for k, v in sd.items() if k != "regression_head.phi"})


@pytest.mark.parametrize("size", [(128, 192), (130, 200)])
@pytest.mark.parametrize("batch", [1, 2])
def test_shapes_and_finite(published, size, batch):
    h, w = size
    left, right, _ = _pair(batch, h, w)
    with torch.no_grad():
        out = published(left, right, return_intermediates=True)
    hp, wp = math.ceil((h - 1) / 3), math.ceil((w - 1) / 3)
    expect = {"disparity": (batch, h, w), "occlusion": (batch, h, w), "disparity_low_res": (batch, hp, wp),
              "transport": (batch, hp, wp + 1, wp + 1), "occlusion_low_res": (batch, hp, wp),
              "tokens_left": (batch, 128, hp, wp), "logits": (batch, hp, wp, wp)}
    for key, shape in expect.items():
        assert tuple(out[key].shape) == shape, key
        assert torch.isfinite(out[key]).any(), key
    for key in ("disparity", "occlusion", "disparity_low_res", "transport"):
        assert torch.isfinite(out[key]).all(), key
    assert torch.isinf(out["logits"]).sum() == batch * hp * wp * (wp - 1) // 2  # exactly the keys j > i
    assert ((out["occlusion"] >= 0) & (out["occlusion"] <= 1)).all()
    rows = out["transport"][..., :-1, :].sum(-1)  # every real left row of the plan sums to 1
    assert_close(rows, torch.ones_like(rows), name="plan rows")


@pytest.mark.parametrize("parity", [False, True])
def test_batch_of_two_equals_two_single_runs(parity):
    torch.manual_seed(1)
    model = STTR.from_preset("small", parity=parity).eval()
    left, right, b = _pair(2, 128, 160, seed=3)
    with torch.no_grad():
        both = model(left, right, occ_mask=b["occ_mask"])
        ones = [model(left[i:i + 1], right[i:i + 1], occ_mask=b["occ_mask"][i:i + 1]) for i in range(2)]
    for key in ("disparity", "occlusion", "disparity_low_res", "transport"):
        assert_close(both[key], torch.cat([o[key] for o in ones]), name=key)


@pytest.mark.parametrize("chunks,batch,size,stride", [((1, 1, 1), 1, (131, 150), 3), ((7, 5, 9), 2, (125, 133), 3),
                                                     ((64, 32, 128), 1, (128, 140), 4)])
def test_chunked_inference_equals_the_whole_image_path(chunks, batch, size, stride):
    """Without autograd the tokenizer's last stage runs in row chunks keeping only the sampled tokens, the
    transformer in chunks of line pairs and the context adjustment layer in row chunks with a halo: the same values
    as the whole-image path (odd sizes: the centre crop; batch 2: per-pair statistics; chunks of 1: every halo at
    its edge)."""
    torch.manual_seed(0)
    tok, lines, cal = chunks
    model = STTR.from_preset("tiny", stride=stride, tokenizer_chunk_rows=tok, transformer_chunk_lines=lines,
                             cal_chunk_rows=cal).eval()
    whole = STTR.from_preset("tiny", stride=stride, tokenizer_chunk_rows=0, transformer_chunk_lines=0,
                             cal_chunk_rows=0).eval()
    whole.load_state_dict(model.state_dict())
    left, right, _ = _pair(batch, *size)
    with torch.no_grad():
        a = model(left, right, return_intermediates=True)
        b = whole(left, right, return_intermediates=True)
    for key in ("tokens_left", "tokens_right", "logits", "disparity", "occlusion"):
        assert_close(a[key], b[key], name=key)
    with torch.enable_grad():  # with autograd (training) no chunked path is taken
        c = model(left, right)
    assert_close(c["disparity"].detach(), b["disparity"], name="disparity with autograd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [2, 4])
def test_chunk_statistics_normalise_as_batch_norm(dtype, n):
    """The chunked tokenizer's BatchNorm: statistics merged over chunks, then normalised (in place or not) as
    StereoBatchNorm2d does for the whole map (16-bit maps computed in float32, as batch_norm under autocast)."""
    from tlv_fast.models.sttr_features import StereoBatchNorm2d, _PairStats
    torch.manual_seed(0)
    bn = StereoBatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = (torch.randn(n, 5, 9, 7) * 3 + 1).to(dtype)
    stats = _PairStats(n, 5, x.device)
    for a in range(0, 9, 4):
        stats.add(x[:, :, a:a + 4])
    want = bn(x.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(stats.normalize(x, bn).float(), want, atol=tol, rtol=tol)
    y = x.clone()
    assert stats.normalize(y, bn, inplace=True) is y
    torch.testing.assert_close(y.float(), want, atol=tol, rtol=tol)


def test_chunk_settings_are_checked():
    with pytest.raises(ValueError, match="cal_chunk_rows must be an int >= 0"):
        STTRConfig(cal_chunk_rows=-1)


def _patch_cost(pair, s, alpha=50.0, tau=0.2):
    """Hand-built matching scores from the images: alpha * (tau - mean |5x5 patch difference|), keys j > i masked."""
    h, w = pair["disp"].shape
    rows, cols = torch.arange(s // 2, h, s), torch.arange(s // 2, w, s)

    def patches(img):
        return F.unfold(img[None], 5, padding=2).view(75, h, w)[:, rows][:, :, cols]

    sad = (patches(pair["left"])[..., :, None] - patches(pair["right"])[..., None, :]).abs().mean(0)
    n = len(cols)
    return (alpha * (tau - sad)).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")), rows, cols


@pytest.mark.parametrize("seed", [0, 1])
def test_ot_and_window_regression_recover_exact_disparity(seed):
    """Spec 6.3 check (a): from an image-based cost, OT + window regression give the exact disparity on visible
    tokens, and the occluded tokens' mass goes to the dustbin."""
    s = 3
    pair = synthetic_stereo(128, 192, seed=seed, disparity_step=s)
    cost, rows, cols = _patch_cost(pair, s)
    plan = optimal_transport(cost[None], torch.tensor(0.0), 10)[0]
    d_raw, mass, occ_raw = window_regression(plan[:, :-1, :-1])
    gt = pair["disp"][rows][:, cols]
    occ = pair["occ_mask"][rows][:, cols]
    err = (d_raw * s - gt).abs()[~occ]
    assert err.median() < 0.01 and (err < 0.5).float().mean() > 0.97, (err.median(), (err < 0.5).float().mean())
    assert occ_raw[occ].mean() > 0.9 and occ_raw[occ].mean() > occ_raw[~occ].mean() + 0.5
    assert plan[:, :-1, -1][occ].mean() > 0.9  # occluded rows sit in the dustbin
    # the ground-truth response of sttr_loss's target is the largest entry of visible rows
    resp = gt_response(plan[:, :-1, :-1], gt, cols, float(s), s)
    assert (resp[~occ] >= plan[:, :-1, :-1].amax(-1)[~occ] - 1e-6).float().mean() > 0.97


def test_window_regression_rules():
    plan = torch.zeros(1, 4, 4)
    plan[0, 2, 1], plan[0, 2, 0] = 0.6, 0.2  # row 2: argmax 1, window {0, 1, 2}, mass 0.8
    plan[0, 3, 3] = 0.05  # row 3: a weak match at disparity 0
    plan[0, 0, 0] = 1.0
    d, mass, occ = window_regression(plan)
    torch.testing.assert_close(d[0, 2], torch.tensor((0.6 * 1 + 0.2 * 2) / 0.8))
    torch.testing.assert_close(occ[0, 2], torch.tensor(0.2))
    torch.testing.assert_close(occ[0, 3], torch.tensor(0.95))  # paper: 1 - mass
    d_p, mass_p, occ_p = window_regression(plan, parity=True)
    assert occ_p[0, 3] == 0 and mass_p[0, 3] == 1  # published: mass < 0.1 is replaced by 1
    torch.testing.assert_close(d_p[0, 2], d[0, 2])
    gt_occ = torch.tensor([[False, False, True, False]])
    _, _, occ_g = window_regression(plan, gt_occ, parity=True)
    assert occ_g[0, 2] == 0 and torch.isclose(occ_g[0, 3], torch.tensor(0.95))  # GT replaces the < 0.1 rule


def _spec_logits(model, tokens_l, tokens_r, scale):
    """Transcription of docs/sttr.md §1.5 (pre-LN self / cross layers, one attention module for both directions, the
    right lines updated first and re-normalised, the last layer's left-query logits masked), each attention call
    through the spec transcription of 2.1-2.2 (helpers.spec_relpos_mha)."""
    B, C, h, w = tokens_l.shape
    lines = lambda t: t.permute(0, 2, 3, 1).reshape(B * h, w, C)  # noqa: E731  (R, W', C)
    fl, fr = lines(tokens_l), lines(tokens_r)
    tf = model.transformer
    last = len(tf.self_attn_layers) - 1
    for i, (sl, cl) in enumerate(zip(tf.self_attn_layers, tf.cross_attn_layers)):
        feat = torch.cat([fl, fr])
        feat = feat + spec_relpos_mha(sl.self_attn, sl.norm1(feat), sl.norm1(feat), 1, False, scale)[0]
        fl, fr = feat[:B * h], feat[B * h:]
        a, b = cl.norm1(fl), cl.norm1(fr)
        fr = fr + spec_relpos_mha(cl.cross_attn, b, a, -1, False, scale)[0]  # offsets x_L - x_R
        c = cl.norm2(fr)
        upd, logits = spec_relpos_mha(cl.cross_attn, a, c, 1, i == last, scale)
        fl = fl + upd
    return logits.view(B, h, w, w)


@pytest.mark.parametrize("parity", [False, True])
def test_transformer_matches_spec_transcription(parity):
    torch.manual_seed(2)
    model = STTR.from_preset("tiny", parity=parity, stride=4).eval()
    for p in model.transformer.parameters():  # break the symmetry of the default init
        p.data.add_(0.05 * torch.randn_like(p))
    left, right, _ = _pair(1, 128, 150)
    with torch.no_grad():
        out = model(left, right, return_intermediates=True)
        want = _spec_logits(model, out["tokens_left"], out["tokens_right"], out["scale"])
    assert out["scale"] == (150 / 37 if parity else 4.0)  # W' = len(range(2, 150, 4)) = 37
    assert_close(out["logits"], want, name="logits vs transcription")


@pytest.mark.deep  # not in the quick run (README)
def test_fused_path_matches_reference_path():
    """The compiled kernels (the Triton relative-position kernel - the interpreter here - and the csrc Sinkhorn)
    against backend="reference" (eager everything): every stage forward, and the gradients."""
    left, right, _ = _pair(1, 128, 128, seed=4)
    runs = {}
    for name, backend in (("reference", "reference"), ("fused", COMPILED)):
        torch.manual_seed(0)
        model = STTR.from_preset("tiny", backend=backend, stride=8).train()
        out = model(left, right, return_intermediates=True)
        out["disparity"].mean().backward()
        runs[name] = out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (ref, ref_g), (fused, fused_g) = runs["reference"], runs["fused"]
    assert_close(fused["logits"], ref["logits"], name="logits")
    for key in ("transport", "disparity_low_res", "disparity", "occlusion"):
        assert_close(fused[key], ref[key], name=key)
    assert ref_g.keys() == fused_g.keys()
    for name in ref_g:  # attention and the head: the parameters the fused ops differentiate
        if name.startswith("transformer.") or name == "regression_head.phi":
            assert_close(fused_g[name], ref_g[name], "bwd", name)


def test_gradient_checkpointing_gives_the_same_gradients():
    left, right, b = _pair(1, 128, 128, seed=5)
    grads = []
    for ckpt in (True, False):
        torch.manual_seed(0)
        model = STTR.from_preset("tiny", gradient_checkpointing=ckpt, stride=4).train()
        loss = sttr_loss(model(left, right), b["disp"], b["occ_mask"], b["occ_mask_right"])["loss"]
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "backbone.in_conv.0.weight" in grads[0]
    for name in grads[0]:
        assert_close(grads[0][name], grads[1][name], "bwd", name)


def test_loss_and_metrics():
    left, right, b = _pair(1, 128, 160, seed=6)
    torch.manual_seed(0)
    model = STTR.from_preset("tiny").train()
    out = model(left, right)
    losses = sttr_loss(out, b["disp"], b["occ_mask"], b["occ_mask_right"])
    assert set(losses) == {"rr", "l1_raw", "l1", "occ_be", "loss"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    valid = (b["disp"] > 0) & ~b["occ_mask"]
    torch.testing.assert_close(losses["l1"], F.smooth_l1_loss(out["disparity"][valid], b["disp"][valid]))
    occ = out["occlusion"]
    be = torch.cat([-torch.log(occ[b["occ_mask"]] + 1e-6), -torch.log(1 - occ[valid] + 1e-6)]).mean()
    torch.testing.assert_close(losses["occ_be"], be)
    losses["loss"].backward()
    assert model.regression_head.phi.grad is not None and model.backbone.in_conv[0].weight.grad.abs().sum() > 0
    disp, occ = b["disp"], b["occ_mask"]
    perfect = stereo_metrics(disp, occ.float(), disp, occ)
    assert perfect["epe"] == 0 and perfect["px_error_rate"] == 0 and perfect["iou"] == 1
    off = stereo_metrics(disp + 4.0, 1 - occ.float(), disp, occ)
    assert off["epe"] == pytest.approx(4.0) and off["px_error_rate"] == 1 and off["iou"] == 0
    assert off["total_px"] == int((~occ).sum())
    # a pixel neither valid (no ground truth) nor occluded is ignored by the IoU, whatever is predicted there
    d1, o1 = torch.tensor([[[1.0, 1.0, 0.0, 1.0]]]), torch.tensor([[[False, True, False, False]]])
    assert stereo_metrics(d1, torch.tensor([[[0.0, 1.0, 1.0, 0.0]]]), d1, o1)["iou"] == 1


def test_synthetic_pairs_have_exact_ground_truth():
    p = synthetic_stereo(128, 192, seed=7, num_layers=4, max_disparity=30)
    q = synthetic_stereo(128, 192, seed=7, num_layers=4, max_disparity=30)
    assert all(torch.equal(p[k], q[k]) for k in p)
    x = torch.arange(192)
    d, dr = p["disp"].long(), p["disp_right"].long()
    vis = ~p["occ_mask"]
    warped = p["right"].gather(2, (x - d).clamp_min(0).expand(3, -1, -1))
    assert torch.equal(warped[:, vis], p["left"][:, vis])  # left(x) = right(x - d) wherever visible
    back = (x + dr).clamp_max(191)
    assert torch.equal(d.gather(1, back)[~p["occ_mask_right"]], dr[~p["occ_mask_right"]])
    assert p["occ_mask"][:, : int(d.min())].all()  # the left border is occluded
    assert 0 < p["occ_mask"].float().mean() < 0.5 and (p["disp"] % 3 == 0).all()


def test_a_tiny_sttr_learns():
    left, right, b = _pair(1, 128, 128, seed=8)
    torch.manual_seed(0)
    model = STTR.from_preset("tiny", stride=4).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = sttr_loss(model(left, right), b["disp"], b["occ_mask"], b["occ_mask_right"])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


def test_bad_input_is_rejected(published):
    x = torch.zeros(1, 3, 128, 192)
    with pytest.raises(ValueError, match="at least 121"):
        published(torch.zeros(1, 3, 96, 192), torch.zeros(1, 3, 96, 192))
    with pytest.raises(ValueError, match="same shape"):
        published(x, torch.zeros(1, 3, 128, 180))
    with pytest.raises(ValueError, match="right must be a float tensor"):
        published(x, x.to(torch.uint8))
    with pytest.raises(ValueError, match="occ_mask"):
        published(x, x, occ_mask=torch.zeros(1, 128, 180, dtype=torch.bool))
    with pytest.raises(ValueError, match="stride"):
        STTRConfig(stride=0)
    with pytest.raises(ValueError, match="no 'triton' backend"):  # the Sinkhorn has none: name it per op
        STTRConfig(backend="triton")
    with pytest.raises(ValueError, match="backend"):
        STTRConfig(backend="fused")


def test_demo_writes_png_and_metrics(tmp_path):
    from tlv_fast.demo import main
    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    report = main(["stereo", "--seconds", "1", "--preset", "tiny", "--device", "cpu", "--out", str(png),
                   "--json", str(js), "--plain"])
    assert report["steps"] >= 1 and set(report["after"]) >= {"epe", "px_error_rate", "iou"}
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (height, width) == (128, 4 * 192 + 3 * 4)  # --plain: the bare panels
    assert js.stat().st_size > 0


def test_demo_figure_has_titles_colour_bars_and_metrics(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from tlv_fast import demo
    seen = {}
    original = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):  # inspect the figure the demo draws, then save it as usual
        seen["titles"] = [ax.get_title() for ax in fig.axes]
        seen["labels"] = [ax.get_xlabel() for ax in fig.axes]
        seen["suptitle"] = fig._suptitle.get_text()
        return original(fig, *args, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    png = tmp_path / "demo.png"
    demo.main(["stereo", "--seconds", "1", "--preset", "tiny", "--device", "cpu", "--out", str(png)])
    assert {"left image", "ground-truth disparity", "predicted disparity", "predicted occlusion"} <= set(
        seen["titles"])
    assert seen["labels"].count("pixels") == 2 and "probability" in seen["labels"]  # the colour bars
    assert "EPE" in seen["suptitle"] and "before training" in seen["suptitle"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_from_checkpoint_with_pickled_objects_needs_consent(tmp_path):
    import argparse
    torch.manual_seed(0)
    tiny = STTR.from_preset("tiny")
    path = tmp_path / "ckpt.pth.tar"
    torch.save({"state_dict": tiny.state_dict(), "args": argparse.Namespace(downsample=3)}, path)
    with pytest.raises(RuntimeError, match="weights_only=False"):
        STTR.from_checkpoint(str(path), config=tiny.config)
    loaded = STTR.from_checkpoint(str(path), config=tiny.config, weights_only=False)
    assert torch.equal(loaded.regression_head.cal.out_conv.weight, tiny.regression_head.cal.out_conv.weight)


def test_softmax_regression_head():
    """The paper's ablation: a row softmax over the dustbin-augmented scores instead of optimal transport."""
    left, right, _ = _pair(1, 128, 128, seed=9)
    torch.manual_seed(0)
    model = STTR.from_preset("tiny", regression="softmax", stride=4).eval()
    with torch.no_grad():
        out = model(left, right, return_intermediates=True)
    rows = out["transport"].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))  # every row, dustbin row included
    logits = out["logits"][0]
    phi = model.regression_head.phi
    torch.testing.assert_close(out["transport"][0], add_dustbins(logits, phi).softmax(-1))


# ---- bad input and degenerate data -------------------------------------------------------------------------
def test_bad_inputs_say_what_is_wrong(published):
    x = torch.zeros(1, 3, 128, 128)
    with pytest.raises(ValueError, match="at least one stereo pair"):
        published(x[:0], x[:0])
    with pytest.raises(ValueError, match="model's dtype torch.float32"):
        published(x.double(), x.double())
    with pytest.raises(ValueError, match="occ_mask must be a bool tensor"):
        published(x, x, occ_mask=torch.zeros(1, 128, 128))


def test_loss_without_valid_pixels_is_zero_with_zero_gradient():
    torch.manual_seed(0)
    model = STTR.from_preset("tiny", stride=4).train()
    left, right, _ = _pair(1, 128, 128, seed=11)
    losses = sttr_loss(model(left, right), torch.zeros(1, 128, 128))  # no ground truth anywhere
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss"].item() == 0.0
    losses["loss"].backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_metrics_average_over_the_images_that_have_ground_truth():
    disp = torch.zeros(2, 8, 8)
    disp[1] = 5.0
    m = stereo_metrics(torch.full((2, 8, 8), 6.0), torch.zeros(2, 8, 8), disp)
    assert m["epe"] == 1.0 and m["total_px"] == 64
    assert math.isnan(stereo_metrics(torch.ones(1, 8, 8), torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))["epe"])


@pytest.mark.parametrize("content", ["empty", "tensor", "list", "not a state dict"])
def test_from_checkpoint_on_files_that_hold_no_state_dict(tmp_path, content):
    path = tmp_path / "ckpt.pth"
    if content == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"tensor": torch.zeros(3), "list": [1, 2], "not a state dict": {"a": 1}}[content], path)
    with pytest.raises(RuntimeError, match=f"checkpoint {path}"):
        STTR.from_checkpoint(str(path))


@pytest.mark.parametrize("args,match", [(["--batch", "0"], "--batch must be >= 1"),
                                        (["--seconds", "-5"], "--seconds must be >= 0"),
                                        (["--out", "/nonexistent/demo.png"], "cannot write there"),
                                        (["--height", "64"], "--height must be >= 121")])
def test_demo_refuses_bad_arguments_before_training(args, match, capsys):
    from tlv_fast.demo import main
    with pytest.raises(SystemExit) as e:
        main(["stereo", "--preset", "tiny", "--device", "cpu", *args])
    assert e.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.gpu
def test_sttr_fused_equals_reference_on_gpu():
    """The published architecture at 256 x 384 on CUDA: the compiled kernels (Triton attention, CUDA Sinkhorn) against
    backend="reference", fp32 forward; and the fp16-autocast fused path stays finite with the same plan shape."""
    from tlv_fast.models import STTR
    from tlv_fast.stereo.synthetic import synthetic_batch
    data = {k: v.cuda() for k, v in synthetic_batch(2, 256, 384, seed=0).items()}
    left, right = STTR.preprocess(data["left"]), STTR.preprocess(data["right"])
    outs = {}
    for name, backend in (("reference", "reference"), ("fused", COMPILED)):
        torch.manual_seed(0)
        model = STTR.from_preset("sttr", backend=backend).cuda().eval()
        with torch.no_grad():
            outs[name] = model(left, right, return_intermediates=True)
    ref, fused = outs["reference"], outs["fused"]
    assert_close(fused["logits"], ref["logits"], name="logits")
    assert_close(fused["transport"], ref["transport"], name="transport")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        half = model(left, right)
    assert torch.isfinite(half["disparity"]).all() and half["transport"].shape == ref["transport"].shape
