"""Hopper (sm_90) without a GPU: a stand-in Triton driver so that tlv_fast's own launch path compiles its kernels for
sm_90 (Triton's binder and specialisations, our launch policy) while the launch itself is recorded, not run.

    import benchmarks.sm90 as sm90      # in a fresh process: it sets TRITON_INTERPRET=0 before triton loads
    sm90.install()                      # fake driver (device 0, stream 0, target sm_90); launches recorded
    ... call tlv_fast / tlv_fast.kernels on CPU tensors ...
    sm90.LAUNCHES                       # the latest (compiled kernel, grid, positional launch args), a deque
    sm90.stats(compiled)                # registers, spills, shared memory, wgmma/TMA, SASS instruction mix

Used by tests/kernels (compile checks, launcher checks) and `python -m benchmarks overhead` / `compile-stats`.
Compile statistics describe code, not speed. Triton's bundled ptxas / cuobjdump / nvdisasm do the work.
"""
import collections
import os
import re
import subprocess

os.environ["TRITON_INTERPRET"] = "0"  # must precede the first import of triton in this process
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.6's default (3.9 warns when it is unset)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import compiler as _compiler  # noqa: E402
from triton.runtime import driver  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
LAUNCHES = collections.deque(maxlen=64)  # the latest launches (bounded: they hold their tensors)


@triton.jit
def trivial_kernel(X, n, BLOCK: tl.constexpr):  # a launch baseline: no work, two arguments
    pass


class FakeDriver:
    """Enough of Triton's driver interface for compiling and launching: one sm_90 device, stream 0."""

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("no GPU: nothing to benchmark (autotuning needs a device)")


def _record(compiled):
    def run(g0, g1, g2, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
        LAUNCHES.append((compiled, (g0, g1, g2), args))
    return run


def install():
    """Fake driver, CompiledKernel.run that records instead of launching (no module is loaded), and tlv_fast's Triton
    backends declared runnable on CPU tensors (they compile for sm_90 here)."""
    driver.set_active(FakeDriver())
    _compiler.CompiledKernel._init_handles = lambda self: None
    _compiler.CompiledKernel.run = property(lambda self: _record(self))
    from tlv_fast import backends
    backends._load_declarations()
    for fam in backends.FAMILIES.values():
        impl = fam.implementations.get("triton")
        if impl is not None:
            object.__setattr__(impl, "runtime", None)


def _tool(name, *args):
    res = subprocess.run([os.path.join(BIN, name), *args], capture_output=True, text=True)
    return res.stdout


SASS_OPS = ["HGMMA", "HMMA", "MUFU.EX2", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "LDGSTS", "UTMALDG", "LDG",
            "LDS", "LDSM", "STS", "SHFL.BFLY", "BAR", "ISETP", "IMAD", "IADD3", "SEL", "PRMT", "F2FP"]


def stats(compiled, out_dir="/tmp/tlv_fast_sm90"):
    """What the compiled kernel is on sm_90: registers, spill bytes, shared memory, whether the PTX uses wgmma,
    TMA, cp.async, and the SASS instruction counts of the kernel and of its innermost loop."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{compiled.metadata.name}_{compiled.hash[:12]}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = _tool("cuobjdump", "--dump-resource-usage", path)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    regs, stack, _, local = (int(x) for x in m.groups()) if m else (None, None, None, None)
    sass = _tool("nvdisasm", "-c", path)
    ptx = compiled.asm["ptx"]
    return dict(regs=regs, spill_bytes=(stack or 0) + (local or 0), smem=compiled.metadata.shared,
                warps=compiled.metadata.num_warps, stages=compiled.metadata.num_stages,
                wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx,
                cp_async="cp.async.cg" in ptx or "cp.async.ca" in ptx,
                sass={op: len(re.findall(r"\b" + re.escape(op) + r"\b", sass)) for op in SASS_OPS},
                inner_loop=innermost_loop(sass))


def innermost_loop(sass):
    """Instruction count and mix of the largest loop body closed by a backward branch (the per-tile loop)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^\s*(\.L_x_\d+):", ln))}
    best = None
    for i, ln in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", ln)
        if m and labels.get(m.group(1), i) < i:
            body = [x for x in lines[labels[m.group(1)]:i + 1] if re.search(r"/\*[0-9a-f]{4,}\*/", x)]
            if best is None or len(body) > best[0]:
                best = (len(body), "\n".join(body))
    if best is None:
        return {"n": 0}
    return {"n": best[0], **{op: len(re.findall(r"\b" + re.escape(op) + r"\b", best[1])) for op in SASS_OPS
                             if re.search(r"\b" + re.escape(op) + r"\b", best[1])}}
