"""GPU-only checks at real sizes (`pytest -m gpu`): the compiled kernels against the fp64 reference, bf16 on
tensor cores, the autotuner's pick, determinism, no N x N memory for key-padding masks, torch.compile with inductor.

Most tests pin one tile (autotuning compiles ~20 configs per kernel variant, minutes in all); one test runs the
autotuner on the milestone shape's head dim.
"""
import pytest
import torch

import tlv_fast
from tlv_fast.kernels import attention as kernels
from tlv_fast.testing import dropout_keep_mask, record_dropout_seeds

from conftest import compare_with_reference, make_qkv

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _one_tile(request):
    if "autotune" in request.node.name:
        yield
    else:
        with kernels.force_blocks(64, 64, num_warps=4, num_stages=3):
            yield


def _run(causal=False, **kw):
    def run(q, k, v, mask):
        return tlv_fast.attention(q, k, v, causal=causal, attn_mask=mask, return_lse=True, backend="triton", **kw)
    return run


@pytest.mark.parametrize("dtype,d,causal", [(torch.bfloat16, 64, False), (torch.bfloat16, 128, True),
                                             (torch.float16, 128, False), (torch.float16, 64, True)], ids=str)
def test_real_sizes_match_reference(dtype, d, causal):
    q, k, v = make_qkv(2, 4, 1025, 1025, d, dtype=dtype)
    compare_with_reference(q, k, v, causal="bottom_right" if causal else None, run=_run(causal))


def test_autotuned_kernels_match_reference():
    q, k, v = make_qkv(2, 16, 2048, 2048, 128, dtype=torch.bfloat16)
    compare_with_reference(q, k, v, causal="bottom_right", run=_run(True))


@pytest.mark.parametrize("shape", [(2, 4, 197, 197, 64), (1, 8, 300, 1100, 80), (1, 8, 1, 4097, 128),
                                   (4, 8, 320, 320, 16), (1, 2, 513, 257, 256)], ids=str)
def test_model_shapes_bf16(shape):
    B, H, nq, nk, d = shape
    q, k, v = make_qkv(B, H, nq, nk, d, dtype=torch.bfloat16, layout="bshd")
    compare_with_reference(q, k, v, causal="bottom_right", run=_run(True))


def test_keypad_gqa_dropout_and_float_bias():
    q, k, v = make_qkv(2, 8, 512, 512, 64, Hkv=2, dtype=torch.bfloat16)
    lengths = torch.tensor([512, 301], device="cuda")
    pad = (torch.arange(512, device="cuda")[None] < lengths[:, None])[:, None, None, :]
    compare_with_reference(q, k, v, attn_mask=pad, run=_run())
    bias = torch.randn(1, 8, 512, 512, device="cuda", dtype=torch.bfloat16).requires_grad_()
    compare_with_reference(q, k, v, attn_mask=bias, causal="bottom_right", run=_run(True))
    torch.manual_seed(1)
    with record_dropout_seeds() as seeds:
        tlv_fast.attention(q.detach(), k.detach(), v.detach(), dropout_p=0.1, backend="triton")
    keep = dropout_keep_mask(seeds[0], 2, 8, 512, 512, 0.1)

    def run(q, k, v, mask):
        torch.manual_seed(1)
        return tlv_fast.attention(q, k, v, dropout_p=0.1, return_lse=True, backend="triton")
    compare_with_reference(q, k, v, dropout_p=0.1, dropout_mask=keep, run=run)


def test_backward_is_deterministic():
    q, k, v = make_qkv(2, 8, 777, 777, 64, Hkv=2, dtype=torch.bfloat16)
    bias = torch.randn(1, 8, 777, 777, device="cuda", dtype=torch.float32).requires_grad_()
    grads = []
    for _ in range(2):
        torch.manual_seed(0)  # same dropout seed both times
        out = tlv_fast.attention(q, k, v, causal=True, attn_mask=bias, dropout_p=0.1, backend="triton")
        grads.append(torch.autograd.grad(out, (q, k, v, bias), torch.ones_like(out)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_key_padding_mask_costs_no_quadratic_memory():
    B, H, N, D = 4, 16, 8192, 64
    q, k, v = make_qkv(B, H, N, N, D, dtype=torch.bfloat16, requires_grad=False)
    pad = torch.ones(B, 1, 1, N, dtype=torch.bool, device="cuda")
    pad[:, :, :, N // 2:] = False
    tlv_fast.attention(q, k, v, attn_mask=pad, backend="triton")  # autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tlv_fast.attention(q, k, v, attn_mask=pad, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    out_bytes = q.numel() * q.element_size() + B * H * N * 4  # out + lse
    quadratic = B * H * N * N * 2 / 2**30
    assert extra <= out_bytes * 1.1, f"{extra / 2**20:.0f} MiB beyond the inputs (N x N: {quadratic:.0f} GiB)"


def test_inductor_compile_fullgraph():
    model = torch.nn.Linear(64, 3 * 64).cuda().to(torch.bfloat16)

    def f(x):
        q, k, v = model(x).view(2, 128, 3, 4, 16).permute(2, 0, 3, 1, 4)
        return tlv_fast.attention(q, k, v, causal=True).sum()
    x = torch.randn(2, 128, 64, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), atol=1e-1, rtol=2e-2)


# ---- Sinkhorn / optimal transport on CUDA: every launch path (one CTA, clusters, streaming) --------------------
@pytest.mark.parametrize("b,w,dtype", [
    (4, 321, torch.float32),    # 322 x 322 fp32 = 415 KB: a 2-CTA cluster (bwd: 4)
    (4, 321, torch.float16),    # 207 KB: one CTA
    (2, 321, torch.bfloat16),
    (3, 499, torch.float32),    # 1 MB: an 8-CTA cluster
    (2, 1100, torch.float32),   # 4.8 MB: streams from global memory
    (2, 200, torch.float64),
], ids=str)
def test_optimal_transport_cuda_paths(b, w, dtype):
    from test_sinkhorn import _check, _problem
    from tlv_fast import reference as ref
    attn = _problem((b,), w, w, dtype, "upper", scale=1.0)[0]
    phi = torch.tensor(0.2, dtype=torch.float32 if dtype != torch.float64 else dtype, device="cuda",
                       requires_grad=True)
    _check(lambda a, p: tlv_fast.optimal_transport(a, p), lambda a, p: ref.optimal_transport(a, p), [attn, phi],
           dtype)


@pytest.mark.parametrize("m,n,order", [(640, 2049, "row_first"), (97, 1, "col_first"), (1, 1, "col_first")], ids=str)
def test_sinkhorn_cuda_odd_shapes(m, n, order):
    from test_sinkhorn import _check, _problem
    from tlv_fast import reference as ref
    inputs = _problem((2,), m, n, torch.float32, None)
    _check(lambda s, a, c: tlv_fast.sinkhorn(s, a, c, iters=5, order=order),
           lambda s, a, c: ref.sinkhorn(s, a, c, iters=5, order=order), inputs, torch.float32)


def test_optimal_transport_cuda_deterministic():
    attn = torch.randn(8, 321, 321, device="cuda", requires_grad=True)
    phi = torch.tensor(0.0, device="cuda", requires_grad=True)
    grads = [torch.autograd.grad(tlv_fast.optimal_transport(attn, phi).square().sum(), (attn, phi)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# ---- STTR relative-position attention at STTR's shape class ------------------------------------------------------
@pytest.mark.parametrize("sign,mask", [(1, False), (-1, False), (1, True)], ids=["self", "right-query", "masked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_relpos_sttr_shape(sign, mask, dtype):
    from test_relpos_attention import _check, _inputs
    _check(_inputs(8, 8, 320, 320, 16, dtype), sign, mask, dtype)


def test_relpos_memory_is_linear_in_width():
    from test_relpos_attention import _inputs
    q, k, v, qr, kr = (t.detach() for t in _inputs(960, 8, 320, 320, 16, torch.float16))
    tlv_fast.relpos_attention(q, k, v, qr, kr)  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tlv_fast.relpos_attention(q, k, v, qr, kr)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 1.2 * (q.numel() * 2 + 960 * 8 * 320 * 4), f"{extra / 2**20:.0f} MiB"  # out + lse


# ---- models on the GPU (no transformers needed) ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt", "bert", "vit"])
def test_models_triton_equals_reference(name):
    from tlv_fast.models import BERT, GPT, ViT
    torch.manual_seed(0)
    cls = {"gpt": GPT, "bert": BERT, "vit": ViT}[name]
    model = cls.from_preset("tiny").cuda().eval()
    x = torch.randn(2, 3, 32, 32, device="cuda") if name == "vit" else torch.randint(0, 256, (2, 24), device="cuda")
    key = {"gpt": "logits", "bert": "mlm_logits", "vit": "logits"}[name]
    outs = []
    for backend in ("triton", "reference"):
        for m in model.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        outs.append(model(x)[key])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-3, rtol=1e-3)


def test_sttr_fused_equals_reference_on_gpu():
    """The published architecture at 256 x 384 on CUDA: the fused path (Triton attention, CUDA Sinkhorn) against
    backend="reference", fp32 forward; and the fp16-autocast fused path stays finite with the same plan shape."""
    from tlv_fast.models import STTR
    from tlv_fast.stereo_data import synthetic_batch
    data = {k: v.cuda() for k, v in synthetic_batch(2, 256, 384, seed=0).items()}
    left, right = STTR.preprocess(data["left"]), STTR.preprocess(data["right"])
    outs = {}
    for backend in ("reference", "fused"):
        torch.manual_seed(0)
        model = STTR.from_preset("sttr", backend=backend).cuda().eval()
        with torch.no_grad():
            outs[backend] = model(left, right, return_intermediates=True)
    ref, fused = outs["reference"], outs["fused"]
    finite = torch.isfinite(ref["logits"])
    assert torch.equal(torch.isfinite(fused["logits"]), finite)
    torch.testing.assert_close(fused["logits"][finite], ref["logits"][finite], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(fused["transport"], ref["transport"], atol=2e-3, rtol=1e-3)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        half = model(left, right)
    assert torch.isfinite(half["disparity"]).all() and half["transport"].shape == ref["transport"].shape
