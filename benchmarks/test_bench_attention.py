"""pytest-benchmark view of the milestone shape (B=4, H=16, N=4096, bf16): `pytest benchmarks -m gpu`.
The runner (`python -m benchmarks`) is the side-by-side table; this is for pytest-benchmark's history and compare."""
import pytest
import torch

from benchmarks.attention import Case, _inputs, provider_fn

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("provider", ["tlv_fast", "sdpa-flash", "sdpa-cudnn"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_attention_milestone(benchmark, provider, causal, d, mode):
    case = Case("milestone", 4, 16, 4096, 4096, d, causal, mode=mode)
    q, k, v, mask, lengths = _inputs(case, torch.bfloat16, "cuda")
    fn = provider_fn(provider, case, lengths, "cuda")
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(q, k, v, mask, causal)
            torch.cuda.synchronize()
    else:
        dout = torch.randn_like(q)

        def step():
            q.grad = k.grad = v.grad = None
            fn(q, k, v, mask, causal).backward(dout)
            torch.cuda.synchronize()
    step()
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
    benchmark.extra_info["tflops"] = case.flops() / benchmark.stats.stats.median * 1e-12
