"""Build and load the C++/CUDA ops in csrc/ with torch.utils.cpp_extension and ninja.

On first use the sources compile into a cache directory ($TLV_FAST_CACHE, else ~/.cache/tlv_fast), keyed by a hash
of the sources, the flags and the torch/Python versions, and the build says so on stderr; later uses load the
cached library. `python -m tlv_fast.build` compiles ahead of time. A file lock serialises concurrent first uses
(several processes or ranks starting together) so none of them reads a half-written library.
"""
import fcntl
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

# tlv_fast/csrc -> ../csrc in the source tree; package data when installed
CSRC = Path(__file__).resolve().parent / "csrc"
_loaded = set()


def sources(kind):
    """The extension's sources, found on disk: every csrc/*.cpp for "cpu" (schemas and CPU kernels), every
    csrc/cuda/*.cu and csrc/cuda/*.cpp for "cuda" (kernels and their bindings). A new op's files join by existing."""
    if kind == "cpu":
        return sorted(CSRC.glob("*.cpp"))
    return sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp"))


def _cpu_flags():
    # -fopenmp: at::parallel_for is OpenMP inside the header (serial without it); no FP traps: selects vectorise
    flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            with open("/proc/cpuinfo") as f:
                cpu = f.read()
        except OSError:
            cpu = ""
        if " avx2 " in cpu and " fma " in cpu:
            flags += ["-mavx2", "-mfma"]
        if " avx512f " in cpu and " avx512dq " in cpu:  # 16-lane exp: 1.7x on the Sinkhorn CPU benchmark
            flags += ["-mavx512f", "-mavx512dq", "-mprefer-vector-width=512"]
    return flags


def compiler_reasons(kind):
    """Why the `kind` ("cpu" or "cuda") extension cannot be built here ([] when it can)."""
    if kind in _loaded:  # built already (also keeps this check out of torch.compile's way after the first call)
        return []
    reasons = []
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        reasons.append("no C++ compiler (c++/g++) on PATH")
    if not shutil.which("ninja") and not _ninja_from_package():
        reasons.append("ninja is not installed")
    if kind == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME
        if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
            reasons.append("nvcc not found (set CUDA_HOME)")
        if torch.version.cuda is None:
            reasons.append("this torch build has no CUDA")
    return reasons


def _ninja_from_package():
    try:
        import ninja
        return os.path.exists(os.path.join(ninja.BIN_DIR, "ninja"))
    except (ImportError, AttributeError):
        return False


def build_dir(kind):
    h = hashlib.sha256()
    for path in sources(kind) + sorted(CSRC.rglob("*.h")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(" ".join(_cpu_flags()).encode())
    h.update(f"{torch.__version__} {sys.version_info[:2]} {torch.version.cuda}".encode())
    base = os.environ.get("TLV_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tlv_fast")
    return Path(base) / f"{kind}-{h.hexdigest()[:16]}"


def load(kind="cpu"):
    """Compile (first time) and load the `kind` extension; its ops appear under torch.ops.tlv_fast."""
    if kind in _loaded:
        return
    if kind == "cuda":
        load("cpu")  # the schemas live in the CPU library
    reasons = compiler_reasons(kind)
    if reasons:
        raise RuntimeError(f"tlv_fast: cannot build the {kind} extension: " + "; ".join(reasons))
    if _ninja_from_package() and not shutil.which("ninja"):
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    from torch.utils import cpp_extension
    directory = build_dir(kind)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"tlv_fast_{kind}"
    with open(directory / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / f"{name}.so").exists():
            print(f"tlv_fast: compiling the {kind} extension (first use; cached in {directory})", file=sys.stderr,
                  flush=True)
        cpp_extension.load(
            name=name, sources=[str(p) for p in sources(kind)], build_directory=str(directory),
            extra_cflags=_cpu_flags(), extra_cuda_cflags=["-O3", "-std=c++17"], is_python_module=False,
            verbose=os.environ.get("TLV_FAST_VERBOSE_BUILD") == "1")
    _loaded.add(kind)
