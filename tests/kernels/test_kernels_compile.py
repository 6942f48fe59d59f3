"""Compile the attention kernels ahead of time for sm_90 (H100/H200) on a machine without a GPU.

The interpreter checks the kernels' arithmetic; only the real compiler checks that they lower (tile shapes, layouts,
wgmma eligibility). Triton compiles for a named target without a device, so this runs on CI.
"""
import json
import os
import subprocess
import sys

import pytest

from tlv_fast.kernels import attention as ka
from tlv_fast.kernels.common import configs as as_configs

from helpers import HAS_CUDA

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(HAS_CUDA, reason="a GPU run compiles the kernels for real")


def _compile(cases):
    res = subprocess.run([sys.executable, os.path.join(HERE, "aot_sm90.py"), json.dumps(cases)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _variant(d, causal=True, mask_kind=ka.MASK_FLOAT, bcast=0, dropout=True, precision="ieee", even=False):
    return dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_D=ka.block_dim(d), BLOCK_DV=ka.block_dim(d),
                CHECK_D=d != ka.block_dim(d), CHECK_DV=d != ka.block_dim(d), IS_CAUSAL=causal,
                MASK_KIND=mask_kind, MASK_BCAST=bcast, HAS_DROPOUT=dropout, PRECISION=precision, UPCAST=False,
                EVEN_M=even, EVEN_N=even)


KERNELS = {
    "fwd": ("_attn_fwd_kernel", {}, as_configs(ka.FWD_CONFIGS)),
    "dkdv": ("_attn_bwd_dkdv_kernel", {"STORE_DMASK": True}, as_configs(ka.DKDV_CONFIGS)),
    "dq": ("_attn_bwd_dq_kernel", {}, as_configs(ka.DQ_CONFIGS)),
}


def _case(name, constexprs, config, **kw):
    kernel, extra, _ = KERNELS[name]
    return dict(kernel=kernel, constexprs={**constexprs, **extra, **config.kwargs}, num_warps=config.num_warps,
                num_stages=config.num_stages, **kw)


def test_kernels_lower_to_wgmma_for_sm90():
    cases = []
    for name, (_, _, configs) in KERNELS.items():
        cases.append(_case(name, _variant(80), configs[2]))  # causal, float mask, dropout, padded head dim
        cases.append(_case(name, _variant(64, causal=False, mask_kind=ka.MASK_BOOL, bcast=2, dropout=False),
                           configs[2], mask_type="u8"))  # key-padding bool mask
    cases.append(dict(kernel="_delta_kernel", module="common",
                      constexprs=dict(HEAD_DIM_V=96, BLOCK_DV=128, HAS_DLSE=True, BLOCK_M=64)))
    cases.append(dict(kernel="_dropout_mask_kernel", constexprs=dict(BLOCK_M=16, BLOCK_N=16)))
    uses_wgmma = _compile(cases)
    assert all(uses_wgmma[:6]), f"no Hopper tensor-core instruction (wgmma) in some PTX: {uses_wgmma[:6]}"


@pytest.mark.parametrize("sign", [1, -1])
def test_relpos_kernels_lower_for_sm90(sign):
    # STTR's shape class: d = 16, fp16; tl.gather of the positional bands must lower too
    ce = dict(HEAD_DIM=16, HEAD_DIM_V=16, BLOCK_D=16, BLOCK_DV=16, CHECK_D=False, CHECK_DV=False, SIGN=sign,
              MASK_UPPER=True, PRECISION="ieee", UPCAST=False, BLOCK_M=64, BLOCK_N=64, BLOCK_L=128)
    cases = [dict(kernel="_relpos_fwd_kernel", module="relpos_attention", dtype="fp16",
                  constexprs=dict(ce, RETURN_LOGITS=True, EVEN_M=False)),
             dict(kernel="_relpos_bwd_kernel", module="relpos_attention", dtype="fp16", types={"DQ": "*fp32"},
                  constexprs=dict(ce, HAS_DLOGITS=True))]
    assert all(_compile(cases))


@pytest.mark.slow
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_every_autotune_config_compiles(d, dtype):
    import torch
    cases = []
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    for name, (_, _, configs) in KERNELS.items():
        named = {"Q": torch.empty(0, dtype=tdtype), "BLOCK_D": d, "BLOCK_DV": d, "N_Q": 4096, "N_K": 4096}
        kept = ka._prune(lambda m, n: m, lambda m, n: n, lambda m, n, dd, dv: n * (dd + dv))(configs, named)
        for config in kept:
            ce = _variant(d, causal=False, mask_kind=0, dropout=False, even=True,
                          precision="tf32" if dtype == "fp32" else "ieee")
            cases.append(_case(name, ce, config, dtype=dtype))
    _compile(cases)
