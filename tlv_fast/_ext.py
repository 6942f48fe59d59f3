"""Build and load the C++/CUDA ops in csrc/ with torch.utils.cpp_extension and ninja.

On first use the sources compile into a cache directory ($TLV_FAST_CACHE, else ~/.cache/tlv_fast), keyed by a hash
of the sources, the flags and the torch/Python versions, and the build says so on stderr; later uses load the
cached library. `python -m tlv_fast.build` compiles ahead of time.

The cache heals itself and never hangs:
- a successful build writes a manifest (size and SHA-256 of the library) atomically; a library that does not match
  its manifest (a truncated copy, a disk that filled up) is never loaded: the folder is rebuilt;
- a verified library loads without a compiler and without writing anything (a read-only cache, as in a container
  image or a shared install, works);
- concurrent first uses (several processes or ranks) serialise on an OS file lock, which dies with its holder, so a
  killed build leaves no stale lock; torch's own build lock, left behind by a killed build, is cleared under it;
  waiting for another process's build is bounded ($TLV_FAST_BUILD_TIMEOUT seconds, default 900);
- a build that fails is not retried in the same process: the op's "auto" backend falls back to the reference with
  one warning naming the cause, an explicit backend="native" raises with the compiler's message.
"""
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

# tlv_fast/csrc -> ../csrc in the source tree; package data when installed
CSRC = Path(__file__).resolve().parent / "csrc"
MANIFEST = "manifest.json"
_loaded = set()
_failed = {}  # kind -> why its build failed in this process


class BuildError(RuntimeError):
    """The extension could not be built or loaded; the message says why."""


def sources(kind):
    """The extension's sources, found on disk: every csrc/*.cpp for "cpu" (schemas and CPU kernels), every
    csrc/cuda/*.cu and csrc/cuda/*.cpp for "cuda" (kernels and their bindings). A new op's files join by existing.

    $TLV_FAST_EXT_SOURCES (comma-separated file names, for tests of the build cache itself) keeps only those CPU
    sources: a smaller library, built in its own cache folder (the folder's hash covers the source list)."""
    if kind == "cpu":
        found = sorted(CSRC.glob("*.cpp"))
        only = os.environ.get("TLV_FAST_EXT_SOURCES")
        if only:
            names = {n.strip() for n in only.split(",") if n.strip()}
            found = [p for p in found if p.name in names]
        return found
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
        if " f16c " in cpu:  # float16 <-> float32 in hardware (the 16-bit inputs of the CPU attention kernels)
            flags += ["-mf16c"]
        if " avx512f " in cpu and " avx512dq " in cpu:  # 16-lane exp: 1.7x on the Sinkhorn CPU benchmark
            flags += ["-mavx512f", "-mavx512dq", "-mprefer-vector-width=512"]
    return flags


def _ninja_from_package():
    try:
        import ninja
        return os.path.exists(os.path.join(ninja.BIN_DIR, "ninja"))
    except (ImportError, AttributeError):
        return False


def compiler_reasons(kind):
    """Why the `kind` ("cpu" or "cuda") extension cannot be compiled here ([] when it can)."""
    reasons = []
    cxx = os.environ.get("CXX")
    if cxx:
        if not shutil.which(cxx):
            reasons.append(f"CXX={cxx} is not an executable")
    elif not (shutil.which("c++") or shutil.which("g++")):
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


def cache_root():
    return Path(os.environ.get("TLV_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tlv_fast"))


def build_dir(kind):
    h = hashlib.sha256()
    for path in sources(kind) + sorted(CSRC.rglob("*.h")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(" ".join(_cpu_flags()).encode())
    h.update(f"{torch.__version__} {sys.version_info[:2]} {torch.version.cuda}".encode())
    return cache_root() / f"{kind}-{h.hexdigest()[:16]}"


def _name(kind):
    return f"tlv_fast_{kind}"


def _digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verified(directory, kind):
    """True when `directory` holds the library of `kind` exactly as its build wrote it (manifest size and hash)."""
    lib = directory / f"{_name(kind)}.so"
    try:
        with open(directory / MANIFEST) as f:
            manifest = json.load(f)
        return (manifest.get("library") == lib.name and lib.stat().st_size == manifest.get("size")
                and _digest(lib) == manifest.get("sha256"))
    except (OSError, ValueError):
        return False


def _write_manifest(directory, kind):
    lib = directory / f"{_name(kind)}.so"
    tmp = directory / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"library": lib.name, "size": lib.stat().st_size, "sha256": _digest(lib)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)  # atomic: a reader sees the old manifest or the whole new one


def _writable(directory):
    """Whether a build could write `directory` (or create it): the nearest existing ancestor is writable."""
    p = directory
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    return os.access(p, os.W_OK | os.X_OK)


def availability(kind):
    """Why `load(kind)` cannot succeed right now ([] when it can: loaded, a verified cache, or a possible build).
    A failed build is remembered, so the reasons then carry its message."""
    if kind in _loaded:
        return []
    if kind in _failed:
        return [_failed[kind]]
    directory = build_dir(kind)
    if verified(directory, kind):
        return []
    reasons = compiler_reasons(kind)
    if not _writable(directory):
        reasons.append(f"no verified build in {directory} and the cache is not writable (set TLV_FAST_CACHE to a "
                       "writable folder, or run `python -m tlv_fast.build` where it is writable)")
    return reasons


def load(kind="cpu"):
    """Load the `kind` extension, compiling it first when the cache holds no verified build; its ops appear under
    torch.ops.tlv_fast. Raises BuildError saying why when it can be neither loaded nor built."""
    if kind in _loaded:
        return
    if kind in _failed:
        raise BuildError(_failed[kind])
    if kind == "cuda":
        load("cpu")  # the schemas live in the CPU library
    try:
        _load(kind)
    except BuildError as e:
        _failed[kind] = str(e)
        raise
    _loaded.add(kind)


def _load(kind):
    directory = build_dir(kind)
    lib = directory / f"{_name(kind)}.so"
    if verified(directory, kind):
        _load_library(lib)
        return
    reasons = availability(kind)
    if reasons:
        raise BuildError(f"tlv_fast: cannot build the {kind} extension: " + "; ".join(reasons))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / "build.lock", "a")
    except OSError as e:
        raise BuildError(f"tlv_fast: cannot write the extension cache {directory}: {e}") from e
    with lock:
        _acquire(lock, directory)
        if verified(directory, kind):  # another process built it while we waited
            _load_library(lib)
            return
        _clean(directory)
        _build(kind, directory)
        _write_manifest(directory, kind)


def _load_library(lib):
    try:
        torch.ops.load_library(str(lib))
    except OSError as e:
        raise BuildError(f"tlv_fast: loading {lib} failed ({e}); remove {lib.parent} to rebuild it") from e


def _acquire(lock, directory):
    timeout = float(os.environ.get("TLV_FAST_BUILD_TIMEOUT", "900"))
    deadline = time.monotonic() + timeout
    said = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise BuildError(f"tlv_fast: waited {timeout:.0f} s for another process building the extension in "
                                 f"{directory} (TLV_FAST_BUILD_TIMEOUT); if no build is running, remove that folder")
            if not said:
                print(f"tlv_fast: waiting for another process building the extension in {directory}",
                      file=sys.stderr, flush=True)
                said = True
            time.sleep(0.2)


def _clean(directory):
    """Under the build lock: drop whatever a failed, killed or corrupted earlier build left (torch's own lock file
    included, which would otherwise make torch wait forever), keeping only the lock."""
    for entry in directory.iterdir():
        if entry.name == "build.lock":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _build(kind, directory):
    if _ninja_from_package() and not shutil.which("ninja"):
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    from torch.utils import cpp_extension
    print(f"tlv_fast: compiling the {kind} extension (first use; cached in {directory})", file=sys.stderr, flush=True)
    try:
        cpp_extension.load(
            name=_name(kind), sources=[str(p) for p in sources(kind)], build_directory=str(directory),
            extra_cflags=_cpu_flags(), extra_cuda_cflags=["-O3", "-std=c++17"], is_python_module=False,
            verbose=os.environ.get("TLV_FAST_VERBOSE_BUILD") == "1")
    except Exception as e:  # noqa: BLE001  (RuntimeError with ninja's output, CalledProcessError from its checks...)
        text = str(e)
        for extra in (getattr(e, "output", None), getattr(e, "stderr", None)):  # a CalledProcessError's output
            if extra:
                text += "\n" + (extra.decode(errors="replace") if isinstance(extra, bytes) else str(extra))
        lines = [line for line in text.splitlines() if line.strip()]
        tail = "\n".join(lines[-20:])
        raise BuildError(f"tlv_fast: building the {kind} extension failed in {directory} (the full compiler "
                         f"output: TLV_FAST_VERBOSE_BUILD=1):\n{tail}") from e
