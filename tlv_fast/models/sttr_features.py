"""STTR's convolutional parts (docs/sttr.md §1.2, 1.3, 1.7): the SPP backbone, the DenseNet tokenizer and the context
adjustment layer. Module and parameter names follow the published checkpoint (docs/sttr.md §6), so a
state dict maps one to one; there are no running BatchNorm statistics (every BatchNorm uses batch statistics, as
published)."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class StereoBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with batch statistics always (track_running_stats=False, also in eval), taken per stereo pair.

    The input holds the left images of B pairs followed by their right images, (2B, C, H, W). The published model
    normalises over the whole batch, which for B = 1 is exactly the pair; here each pair gets its own statistics, so
    a batch of B pairs gives the same outputs as B runs of one pair (the published code does not)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=False)

    def forward(self, x):
        n, c, h, w = x.shape
        if n <= 2:  # one pair: the batch is the pair
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if n % 2:
            raise ValueError(f"StereoBatchNorm2d: batch must hold left then right images (even size), got {n}")
        b = n // 2
        pairs = x.view(2, b, c, h * w).permute(1, 2, 0, 3).reshape(1, b * c, 2, h * w)  # (1, B*C, 2, HW)
        y = F.batch_norm(pairs, None, None, self.weight.repeat(b), self.bias.repeat(b), True, 0.0, self.eps)
        return y.view(b, c, 2, h * w).permute(2, 0, 1, 3).reshape(n, c, h, w)


def _conv_bn_relu(cin, cout, stride=1):
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), StereoBatchNorm2d(cout), nn.ReLU(inplace=True)]


class BasicBlock(nn.Module):
    """ResNet basic block (torchvision naming: conv1, bn1, conv2, bn2, downsample)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = StereoBatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = StereoBatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), StereoBatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Backbone(nn.Module):
    """Contracting path (PSMNet-style SPP): x (2B, 3, H, W) -> [x, f4 (64ch, 1/4), f8 (128ch, 1/8), f16 (128ch,
    ceil(H/16) x ceil(W/16))]. Needs H, W >= 121: the 16x16 average pool runs on the 1/8 map."""

    def __init__(self):
        super().__init__()
        self.in_conv = nn.Sequential(*_conv_bn_relu(3, 16, 2), *_conv_bn_relu(16, 16), *_conv_bn_relu(16, 32))
        self.resblock_1 = nn.Sequential(BasicBlock(32, 64, 2), BasicBlock(64, 64), BasicBlock(64, 64))
        self.resblock_2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128), BasicBlock(128, 128))
        for i, pool in enumerate((16, 8, 4, 2), start=1):
            self.add_module(f"branch{i}", nn.Sequential(nn.AvgPool2d(pool, pool), nn.Conv2d(128, 32, 1, bias=False),
                                                        StereoBatchNorm2d(32), nn.ReLU(inplace=True)))

    def forward(self, x):
        h, w = x.shape[-2:]
        if min(h, w) < 121:
            raise ValueError(f"STTR: images must be at least 121 x 121 (the SPP pools 16 x 16 on the 1/8-resolution "
                             f"map), got {h} x {w}")
        f4 = self.resblock_1(self.in_conv(x))
        f8 = self.resblock_2(f4)
        size = (math.ceil(h / 16), math.ceil(w / 16))
        spp = [F.interpolate(getattr(self, f"branch{i}")(f8), size=size, mode="bilinear", align_corners=False)
               for i in range(1, 5)]
        return [x, f4, f8, torch.cat(spp, 1)]


class _DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size):
        super().__init__()
        self.norm1 = StereoBatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = StereoBatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class DenseBlock(nn.Module):
    """DenseNet block (torchvision naming denselayerN.norm1/conv1/norm2/conv2); returns only the new channels
    (num_layers * growth), which is all STTR keeps."""

    def __init__(self, num_layers, cin, bn_size=4, growth=4):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, x):
        feats = [x]
        for layer in self.children():
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats[1:], 1)


def _center_crop(x, h, w):
    top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
    return x[:, :, top:top + h, left:left + w]


class TransitionUp(nn.Module):
    """x2 (one transposed 3x3 conv, stride 2) or x4 (transposed conv, BatchNorm, transposed conv) upsampling, centre
    cropped to the skip connection's size and concatenated with it."""

    def __init__(self, cin, cout, scale=2):
        super().__init__()
        if scale == 2:
            self.convTrans = nn.ConvTranspose2d(cin, cout, 3, 2, 0, bias=True)
        else:
            self.convTrans = nn.Sequential(nn.ConvTranspose2d(cin, cout, 3, 2, 0, bias=False),
                                           StereoBatchNorm2d(cout), nn.ConvTranspose2d(cout, cout, 3, 2, 0))

    def forward(self, x, skip):
        up = _center_crop(self.convTrans(x), skip.shape[2], skip.shape[3])
        # under fp16 autocast the skip (the fp32 input image at full resolution) would promote the concatenation to
        # fp32; the next convolution casts to fp16 anyway, so casting first gives the same values in half the memory
        return torch.cat([up, skip.to(up.dtype)], 1)


class DoubleConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.double_conv = nn.Sequential(*_conv_bn_relu(cin, cout), *_conv_bn_relu(cout, cout))

    def forward(self, x):
        return self.double_conv(x)


class Tokenizer(nn.Module):
    """Expanding path: [x, f4, f8, f16] -> tokens (2B, hidden, H, W) at full resolution (docs/sttr.md §1.3)."""

    def __init__(self, hidden_dim=128, growth=4, layers=4):
        super().__init__()
        new = growth * layers
        self.bottle_neck = DenseBlock(layers, 128, 4, growth)
        self.up = nn.ModuleList([TransitionUp(new, new), TransitionUp(new, new), TransitionUp(new, hidden_dim, 4)])
        self.dense_block = nn.ModuleList([DenseBlock(layers, new + 128, 4, growth),
                                          DenseBlock(layers, new + 64, 4, growth),
                                          DoubleConv(hidden_dim + 3, hidden_dim)])

    def forward(self, feats, rows=None, cols=None, chunk_rows=64):
        """feats from Backbone -> tokens (2B, hidden, H, W); with rows and cols (1-D index tensors), only the tokens
        at those rows and columns, (2B, hidden, len(rows), len(cols)), computed in chunks of chunk_rows full-resolution
        rows (see _sampled_last_stage): the same values (up to float rounding of the BatchNorm statistics) without the
        full-resolution maps. The chunked path has no backward; use it without autograd."""
        x, f4, f8, f16 = feats
        out = self.bottle_neck(f16)
        last = len(self.up) - 1
        for i, (up, block, skip) in enumerate(zip(self.up, self.dense_block, (f8, f4, x))):
            if i == last and rows is not None:
                return _sampled_last_stage(up, block, out, x, rows, cols, chunk_rows)
            out = block(up(out, skip))
        return out if rows is None else out.index_select(2, rows).index_select(3, cols)


class _PairStats:
    """Count, mean and sum of squared deviations per (group, channel), merged over chunks in float64 (Chan et al.'s
    pairwise update), the groups being StereoBatchNorm2d's: the whole batch for one pair, each pair (left i,
    right i) otherwise."""

    def __init__(self, n, channels, device):
        self.n, self.groups = n, (1 if n <= 2 else n // 2)
        self.mean = torch.zeros(self.groups, channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros_like(self.mean)
        self.count = 0

    def _grouped(self, t):  # (N, C, h, W) -> (G, N / G, C, h * W)
        n, c = t.shape[:2]
        if self.groups == 1:
            return t.reshape(1, n, c, -1)
        return t.reshape(2, self.groups, c, -1).transpose(0, 1)

    def add(self, t):
        g = self._grouped(t)
        k = g.shape[1] * g.shape[3]
        if g.dtype in (torch.float16, torch.bfloat16):  # statistics in float32 (as batch_norm under autocast)
            g = g.float()
        var, mean = torch.var_mean(g, dim=(1, 3), correction=0)  # one pass, no temporary of t's size
        mean, m2 = mean.double(), var.double() * k
        total = self.count + k
        delta = mean - self.mean
        self.mean += delta * (k / total)
        self.m2 += m2 + delta * delta * (self.count * k / total)
        self.count = total

    def normalize(self, t, bn, inplace=False):
        """What bn (a StereoBatchNorm2d in training-mode statistics) gives for t, with the accumulated statistics;
        inplace: into t itself."""
        mean, var = self.mean, self.m2 / self.count  # biased, as batch_norm normalises with
        scale = bn.weight.double() / torch.sqrt(var + bn.eps)  # (G, C)
        shift = bn.bias.double() - mean * scale
        acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype  # as batch_norm (autocast)
        scale, shift = scale[:, None, :, None].to(acc), shift[:, None, :, None].to(acc)
        if inplace:  # (G, N / G, C, h * W) views of t
            g = self._grouped(t)
            if acc == t.dtype:
                g.mul_(scale).add_(shift)
            else:
                g.copy_(g.float().mul_(scale).add_(shift))
            return t
        y = self._grouped(t).to(acc) * scale + shift
        if self.groups > 1:
            y = y.transpose(0, 1)
        return y.reshape(t.shape)


def _rows_conv(conv, inp, y0, y1, lo, H):
    """conv (3x3, padding 1, stride 1) output rows [y0, y1) of an H-row map whose rows [lo, lo + inp.shape[2]) are in
    inp (inp covers rows y0 - 1 .. y1 that exist); rows outside the map are the zero padding."""
    a, b = max(y0 - 1, 0), min(y1 + 1, H)
    part = inp[:, :, a - lo:b - lo]
    part = F.pad(part, (0, 0, a - (y0 - 1), (y1 + 1) - b))
    return F.conv2d(part, conv.weight, conv.bias, padding=(0, 1))


def _sampled_last_stage(up, block, out, x, rows, cols, chunk_rows):
    """The tokenizer's last stage (x4 transposed-convolution upsampling to full resolution, concatenation with the
    image, two conv-BatchNorm-ReLU) evaluated only at the sampled rows and columns, in row chunks.

    The full-resolution maps of this stage dominate STTR's inference memory, while the transformer reads only every
    stride-th row. Each chunk recomputes the rows it needs (a 2-row halo on each side); the two BatchNorms use batch
    statistics over the whole image, so three passes run over the chunks: the first accumulates the statistics of the
    first convolution, the second those of the second, the third produces the sampled outputs. Peak memory is then
    the 1/2-resolution map plus a few chunks, at the price of computing the full-resolution convolutions 2-3 times."""
    if chunk_rows < 1:
        raise ValueError(f"Tokenizer: chunk_rows must be >= 1, got {chunk_rows}")
    ct1, bn_mid, ct2 = up.convTrans  # the x4 TransitionUp
    conv1, bn1, _, conv2, bn2, _ = block.double_conv
    half = ct1(out)  # (N, C, Ha, Wa): 1/2 resolution, normalised in place (one map of this size alive, not two)
    stats = _PairStats(half.shape[0], half.shape[1], half.device)
    stats.add(half)
    half = stats.normalize(half, bn_mid, inplace=True)
    n, _, H, W = x.shape
    Ha, Wa = half.shape[2:]
    top, left = ((2 * Ha + 1) - H) // 2, ((2 * Wa + 1) - W) // 2  # TransitionUp's centre crop

    def upsampled(y0, y1):  # rows [y0, y1) of cat([crop(ct2(half)), x]), y0 >= 0, y1 <= H
        u0, u1 = y0 + top, y1 + top
        i0, i1 = max((u0 - 1) // 2, 0), min((u1 - 1) // 2 + 1, Ha)
        t = F.conv_transpose2d(half[:, :, i0:i1], ct2.weight, ct2.bias, stride=2)
        t = t[:, :, u0 - 2 * i0:u1 - 2 * i0, left:left + W]
        return torch.cat([t, x[:, :, y0:y1].to(t.dtype)], 1)

    def first(y0, y1):  # conv1 rows [y0, y1)
        a, b = max(y0 - 1, 0), min(y1 + 1, H)
        return _rows_conv(conv1, upsampled(a, b), y0, y1, a, H)

    def second(y0, y1, stats1):  # conv2 rows [y0, y1)
        a, b = max(y0 - 1, 0), min(y1 + 1, H)
        h1 = F.relu(stats1.normalize(first(a, b), bn1))
        return _rows_conv(conv2, h1, y0, y1, a, H)

    chunks = [(y0, min(y0 + chunk_rows, H)) for y0 in range(0, H, chunk_rows)]
    stats1 = _PairStats(n, conv1.out_channels, x.device)
    for y0, y1 in chunks:
        stats1.add(first(y0, y1))
    stats2 = _PairStats(n, conv2.out_channels, x.device)
    for y0, y1 in chunks:
        stats2.add(second(y0, y1, stats1))
    outs, wanted = [], rows.tolist()  # one transfer, not a data-dependent selection per chunk
    for y0, y1 in chunks:
        keep = [r - y0 for r in wanted if y0 <= r < y1]
        if keep:
            h2 = F.relu(stats2.normalize(second(y0, y1, stats1), bn2))
            outs.append(h2.index_select(2, torch.tensor(keep, device=h2.device)).index_select(3, cols))
    return torch.cat(outs, 2)


class WNConv2d(nn.Module):
    """3x3 convolution with weight normalisation over each output channel, stored as the published checkpoint has
    it: weight_g (out, 1, 1, 1), weight_v (out, in, 3, 3); weight = g * v / ||v||."""

    def __init__(self, cin, cout):
        super().__init__()
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.weight_v = nn.Parameter(conv.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(self.weight_v.detach(), dim=(1, 2, 3), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        return F.conv2d(x, torch._weight_norm(self.weight_v, self.weight_g, 0), self.bias, padding=1)


class _ResBlock(nn.Module):
    def __init__(self, feats, expansion):
        super().__init__()
        self.module = nn.Sequential(WNConv2d(feats + 1, feats * expansion), nn.ReLU(inplace=True),
                                    WNConv2d(feats * expansion, feats))

    def forward(self, x, disp):
        return x + self.module(torch.cat([disp, x], 1))


class ContextAdjustment(nn.Module):
    """Context adjustment layer (docs/sttr.md §1.7): refines the normalised upsampled disparity with a residual stack
    conditioned on the left image, and maps the upsampled raw occlusion to a probability."""

    def __init__(self, num_blocks=8, feat_dim=16, expansion=4):
        super().__init__()
        self.in_conv = nn.Conv2d(4, feat_dim, 3, padding=1)
        self.layers = nn.ModuleList([_ResBlock(feat_dim, expansion) for _ in range(num_blocks)])
        self.out_conv = nn.Conv2d(feat_dim, 1, 3, padding=1)
        self.occ_head = nn.Sequential(WNConv2d(4, feat_dim), WNConv2d(feat_dim, feat_dim), nn.ReLU(inplace=True),
                                      WNConv2d(feat_dim, feat_dim), WNConv2d(feat_dim, feat_dim),
                                      nn.ReLU(inplace=True), nn.Conv2d(feat_dim, 1, 3, padding=1), nn.Sigmoid())

    def forward(self, disp, occ, img, chunk_rows=0):
        """disp, occ (B, 1, H, W) normalised; img (B, 3, H, W) -> (disp + residual, occlusion probability).

        chunk_rows > 0 (inference): rows are computed chunk by chunk, each from its rows plus a halo as deep as the
        branch has 3x3 convolutions (padding 1: a wrong edge row reaches one row further per layer), so the values
        equal the whole-image pass (there are no normalisation layers) with the full-resolution feature maps of one
        chunk alive."""
        H = disp.shape[2]
        if not 0 < chunk_rows < H:
            return self._disp(disp, img), self.occ_head(torch.cat([occ, img], 1))
        halo = {"disp": 2 + 2 * len(self.layers),
                "occ": sum(isinstance(m, (WNConv2d, nn.Conv2d)) for m in self.occ_head)}
        outs = {"disp": [], "occ": []}
        for y0 in range(0, H, chunk_rows):
            y1 = min(y0 + chunk_rows, H)
            for key, fn in (("disp", lambda a, b: self._disp(disp[:, :, a:b], img[:, :, a:b])),
                            ("occ", lambda a, b: self.occ_head(torch.cat([occ[:, :, a:b], img[:, :, a:b]], 1)))):
                a, b = max(y0 - halo[key], 0), min(y1 + halo[key], H)
                outs[key].append(fn(a, b)[:, :, y0 - a:y1 - a])
        return torch.cat(outs["disp"], 2), torch.cat(outs["occ"], 2)

    def _disp(self, disp, img):
        feat = self.in_conv(torch.cat([disp, img], 1))
        for layer in self.layers:
            feat = layer(feat, disp)
        return disp + self.out_conv(feat)
