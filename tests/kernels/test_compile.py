"""The kernels compile for sm_90 (H100/H200) through the launch path a real call takes (Triton's binder and
specialisations, our launcher), without a GPU: benchmarks/compile_stats.py in a fresh process. Every tile the
launcher may pick -- the pinned one, and (--slow) every autotune candidate kept after pruning -- must not spill,
must fit the shared memory its pruning formula predicts, and must use Hopper's wgmma where its tile allows.
"""
import json
import os
import subprocess
import sys

import pytest

from helpers import HAS_CUDA, REPO

pytestmark = [pytest.mark.skipif(HAS_CUDA, reason="a GPU run compiles the kernels for real"), pytest.mark.builds]


def _rows(call):
    code = f"import json; from benchmarks import compile_stats as cs; print(json.dumps({call}))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _check(rows):
    """Every row spill-free, within 227 KiB and its pruning formula, on wgmma where its tile allows; all failures
    listed at once."""
    assert rows
    bad = []
    for r in rows:
        name = f"{r['case']} {r['kernel']} {r['tile']} w{r['warps']} s{r['stages']}"
        if r["spill_bytes"]:
            bad.append(f"{name}: {r['spill_bytes']} bytes of spills")
        if r["smem_KiB"] > 227:
            bad.append(f"{name}: {r['smem_KiB']} KiB of shared memory")
        if r["smem_formula_KiB"] is not None and r["smem_formula_KiB"] < r["smem_KiB"] - 0.05:
            bad.append(f"{name}: pruning formula {r['smem_formula_KiB']} KiB below the real {r['smem_KiB']} KiB")
        rows_of_mma = int(r["tile"].split("x")[1 if "dkdv" in r["kernel"] else 0])
        ieee_fp32 = "fp32" in r["case"]  # float32 dots at "ieee" precision run on FMA units, not tensor cores
        if not (r["wgmma"] or ieee_fp32 or rows_of_mma < 64 or r["kernel"].endswith("dkdv_kernel")):
            bad.append(f"{name}: no wgmma")
    assert not bad, "\n".join(bad)


def test_pinned_tiles_at_the_milestone_head_dims_and_their_variants():
    variants = [("D80 causal float-mask dropout fp16", dict(d=80, dtype="fp16", n=512, causal=True, mask="float",
                                                            dropout=0.1)),
                ("D64 key padding bf16", dict(d=64, dtype="bf16", n=512, mask="keypad")),
                ("D128 varlen causal bf16", dict(d=128, dtype="bf16", n=512, causal=True, varlen=True))]
    rows = _rows(f"cs.rows((64, 128), 'bf16', 'pinned', relpos=False, variants={variants!r})")
    _check(rows)
    assert {r["kernel"] for r in rows if r["case"].startswith("decode")} == {"_decode_kernel"}


def test_float32_pinned_tiles_do_not_spill():
    _check(_rows("cs.rows((64, 128, 256), 'fp32', 'pinned', relpos=False, decode=False, "
                 "variants=[('D128 causal float-mask dropout fp32', dict(d=128, dtype='fp32', n=512, causal=True, "
                 "mask='float', dropout=0.1))])"))


def test_relative_position_kernels_lower_for_sm90():
    rows = _rows("cs.rows((), 'bf16', 'pinned', relpos=True, decode=False)")
    assert {r["kernel"] for r in rows} == {"_relpos_fwd_kernel", "_relpos_bwd_kernel", "_relpos_bwd_dq_kernel"}
    assert all(r["wgmma"] for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_every_autotune_candidate(dtype):
    heavy = [(f"D{d} causal float-mask dropout {dtype}", dict(d=d, dtype=dtype, n=512, causal=True, mask="float",
                                                               dropout=0.1)) for d in (64, 128, 256)]
    _check(_rows(f"cs.rows((64, 128, 256), {dtype!r}, 'all', relpos=False, causal=(False, True), "
                 f"variants={heavy!r})"))


# ---- STTR's relative-position attention: every variant of the launch at STTR's shape (960 sequences, W = 320,
# 8 heads x 16), each tile the launcher may pick --------------------------------------------------------------------
_RELPOS_VARIANTS = ((1, False, False), (-1, False, False), (1, True, True), (1, True, False), (1, False, True))
_RELPOS_CODE = """
import json, torch
from benchmarks import sm90
from benchmarks import compile_stats as cs
sm90.install()
from tlv_fast.kernels import common
from tlv_fast.kernels import relpos_attention as kr
rows = []
for dt in {dtypes!r}:
    dtype = cs.DTYPES[dt]
    q = torch.empty(960, 8, 320, 16, dtype=dtype)
    table = torch.empty(639, 8, 16, dtype=dtype)
    out, lse = torch.empty_like(q), torch.empty(960, 8, 320)
    for sign, mask, ret in {variants!r}:
        lg = torch.empty(960, 320, 320) if ret else None
        launches = cs._captured_launches(kr, lambda: kr.relpos_attention_fwd(q, q, q, table, table, out, lse, lg,
                                                                             sign, mask))
        launches += cs._captured_launches(kr, lambda: kr.relpos_attention_bwd(
            q, lg, q, q, q, table, table, out, lse, None, torch.empty_like(q), torch.empty_like(q), sign, mask))
        for kernel, grid, args in launches:
            if kernel not in common._tables:
                continue
            for tile, tags in cs.candidates(kernel, args, {which!r}):
                compiled = cs.compile_tile(kernel, grid, args, tile)
                st = sm90.stats(compiled)
                rows.append(dict(case=f"{{dt}} sign{{sign:+d}} mask={{mask}} logits={{ret}}",
                                 kernel=compiled.metadata.name, tile=tile, spill=st["spill_bytes"],
                                 smem_KiB=round(st["smem"] / 1024, 1), wgmma=st["wgmma"]))
print(json.dumps(rows))
"""


def _relpos_check(dtypes, which, variants=_RELPOS_VARIANTS):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = _RELPOS_CODE.format(dtypes=tuple(dtypes), which=which, variants=tuple(variants))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in rows} == {"_relpos_fwd_kernel", "_relpos_bwd_kernel", "_relpos_bwd_dq_kernel"}
    bad = [f"{r['case']} {r['kernel']} {r['tile']}: {r['spill']} bytes of spills" for r in rows if r["spill"]]
    bad += [f"{r['case']} {r['kernel']} {r['tile']}: {r['smem_KiB']} KiB of shared memory" for r in rows
            if r["smem_KiB"] > 227]
    assert not bad, "\n".join(bad)


def test_relpos_pinned_tiles_do_not_spill_at_sttr_shape():
    """The pinned tiles of the three relpos kernels, plain (both signs), masked with logits, fp16 and bf16."""
    _relpos_check(("fp16", "bf16"), "pinned", _RELPOS_VARIANTS[:3])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_relpos_every_autotune_candidate(dtype):
    _relpos_check((dtype,), "all")
