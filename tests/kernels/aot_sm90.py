"""Ahead-of-time compile of the attention kernels for sm_90, run as a subprocess by test_kernels_compile.py.

Triton's interpreter (on in the test session) replaces @triton.jit functions, so compiling for a real target needs a
fresh process with TRITON_INTERPRET=0. Usage: python aot_sm90.py '<json list of cases>'; prints one JSON line with,
per case, whether the PTX uses wgmma.
"""
import importlib
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_POINTER = {"Q", "K", "V", "Out", "DO", "DK", "DV", "DQ", "QR", "KR"}
_FP32_POINTER = {"Lse", "Delta", "DMask", "DLse", "Logits", "DLogits", "DQR", "DKR"}


def compile_case(kernel, constexprs, dtype="bf16", mask_type="fp32", num_warps=4, num_stages=3, module="attention",
                 types=None):
    """Compile `kernel` of kernels/<module>.py; pointer types by argument name (`types` overrides them)."""
    fn = getattr(importlib.import_module(f"tlv_fast.kernels.{module}"), kernel)
    while not isinstance(fn, triton.runtime.JITFunction):  # unwrap @triton.heuristics
        fn = fn.fn
    ce = dict(constexprs)
    for name in fn.arg_names:  # unit head-dim strides are specialised at run time, as here
        if name.startswith("stride_") and name.endswith("d") and name not in ce:
            ce[name] = 1
    signature = {}
    for name in fn.arg_names:
        if name in ce:
            signature[name] = "constexpr"
        elif types and name in types:
            signature[name] = types[name]
        elif name in _POINTER:
            signature[name] = "*" + dtype
        elif name in _FP32_POINTER:
            signature[name] = "*fp32"
        elif name == "Mask":
            signature[name] = "*" + mask_type
        elif name == "Seed":
            signature[name] = "*i64"
        elif name in ("sm_scale", "dropout_p"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(fn, signature, ce), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return "wgmma" in compiled.asm["ptx"]


if __name__ == "__main__":
    print(json.dumps([compile_case(**case) for case in json.loads(sys.argv[1])]))
