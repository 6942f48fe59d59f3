"""csrc builds: the CUDA sources compile for sm_90 with this machine's nvcc (they run under -m gpu); the build cache
heals itself (killed builds, truncated libraries), loads read-only, never waits unboundedly, and falls back or
explains when it cannot build -- all with real processes."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from helpers import REPO

pytestmark = pytest.mark.builds

CSRC = os.path.join(REPO, "csrc")


def _cuda_roots():
    from torch.utils.cpp_extension import CUDA_HOME
    roots = [CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    return [r for r in roots if r and os.path.exists(os.path.join(r, "bin", "nvcc"))]


def _nvcc():
    roots = _cuda_roots()
    return os.path.join(roots[0], "bin", "nvcc") if roots else shutil.which("nvcc")


def _cuda_include():
    for root in _cuda_roots():
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.join(root, "include")
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc (CUDA toolkit)")


@needs_nvcc
def test_cuda_kernels_compile_for_sm90(tmp_path):
    res = subprocess.run([NVCC, "-std=c++17", "-O3", "-arch=sm_90", "-c", os.path.join(CSRC, "cuda", "sinkhorn.cu"),
                          "-o", str(tmp_path / "sinkhorn.o")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]


@needs_nvcc
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    # a CPU build of torch lacks one generated header of c10/cuda (a CUDA build has it); supply its content
    from torch.utils.cpp_extension import include_paths
    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    if not any(os.path.exists(os.path.join(p, "c10/cuda/impl/cuda_cmake_macros.h")) for p in include_paths()):
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cuda_include = _cuda_include()
    assert cuda_include, "nvcc found but no cuda_runtime.h beside it"
    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    cmd = [cxx, "-std=c++17", "-fsyntax-only", *[f"-isystem{p}" for p in include_paths()], f"-isystem{tmp_path}",
           f"-isystem{cuda_include}", os.path.join(CSRC, "cuda", "sinkhorn_cuda.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]


# ---- the build cache, with real processes --------------------------------------------------------------------
RUN = """
import sys, warnings, torch, tlv_fast
warnings.simplefilter("always")
backend = sys.argv[1] if len(sys.argv) > 1 else "auto"
s = torch.arange(30, dtype=torch.float64).reshape(1, 5, 6).sin()
mu, nu = torch.full((1, 5), -5 ** 0.5, dtype=torch.float64), torch.full((1, 6), -6 ** 0.5, dtype=torch.float64)
try:
    print("RESULT", repr(tlv_fast.sinkhorn(s, mu, nu, backend=backend).sum().item()))
except RuntimeError as e:
    print("RAISED", e)
"""


# The cache tests build a library of the schemas and the Sinkhorn op only (what RUN calls): the same build machinery,
# a third of the compile time. The whole library is built by the rest of the suite.
SMALL = {"TLV_FAST_EXT_SOURCES": "schemas.cpp,sinkhorn.cpp"}


def _start(cache, *args, env=None):
    env = {**os.environ, "TLV_FAST_CACHE": str(cache), **SMALL, **(env or {})}
    return subprocess.Popen([sys.executable, "-c", RUN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO, start_new_session=True)


def _run(cache, *args, env=None, timeout=600):
    p = _start(cache, *args, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"no result after {timeout} s: the build or its lock waits unboundedly")
    assert p.returncode == 0, err[-3000:]
    return out, err


def _build_folder(cache):
    folders = [d for d in os.listdir(cache) if d.startswith("cpu-")]
    assert len(folders) == 1, folders
    return os.path.join(cache, folders[0])


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory):
    """A cache built by three processes starting together, with what each printed."""
    cache = tmp_path_factory.mktemp("prebuilt")
    procs = [_start(cache) for _ in range(3)]
    results = [p.communicate(timeout=900) + (p.returncode,) for p in procs]
    return cache, results


def test_three_concurrent_first_uses_compile_once_and_all_load(prebuilt):
    cache, results = prebuilt
    assert all(rc == 0 for _, _, rc in results), [err[-2000:] for _, err, _ in results]
    outs = {out for out, _, _ in results}
    assert len(outs) == 1 and "RESULT" in outs.pop()
    assert sum("compiling the cpu extension" in err for _, err, _ in results) == 1, [e for _, e, _ in results]
    folder = _build_folder(cache)
    assert {"manifest.json", "tlv_fast_cpu.so"} <= set(os.listdir(folder))


def _copy(prebuilt, tmp_path):
    dst = tmp_path / "cache"
    shutil.copytree(prebuilt[0], dst)
    return dst


def _want(prebuilt):
    return prebuilt[1][0][0]


def _same_number(out, want):
    """The reference backend agrees with the C++ one to rounding (float64 here)."""
    a, b = (float(o.split()[1]) for o in (out, want))
    return abs(a - b) <= 1e-12 * abs(b)


def test_a_truncated_library_is_rebuilt_not_loaded(prebuilt, tmp_path):
    cache = _copy(prebuilt, tmp_path)
    lib = os.path.join(_build_folder(cache), "tlv_fast_cpu.so")
    with open(lib, "r+b") as f:
        f.truncate(os.path.getsize(lib) // 2)  # a disk that filled up, an interrupted copy
    out, err = _run(cache)
    assert out == _want(prebuilt) and "compiling" in err


def _wait_for(p, text, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if text in line:
            return
        if not line and p.poll() is not None:
            break
    pytest.fail(f"the build never said {text!r}")


def test_builds_killed_midway_leave_nothing_that_blocks_the_next(prebuilt, tmp_path):
    cache = tmp_path / "cache"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        p = _start(cache)
        _wait_for(p, "compiling the cpu extension")
        time.sleep(3)  # inside the compiler, torch's own build lock taken
        os.killpg(p.pid, sig)
        p.communicate(timeout=60)  # reaps it and closes its pipes
        assert os.path.exists(os.path.join(_build_folder(cache), "lock")), "torch's build lock was not left behind"
    out, err = _run(cache, timeout=600)
    assert out == _want(prebuilt) and "compiling" in err


@contextlib.contextmanager
def _read_only(path):
    """Make `path` unwritable even for root (the immutable attribute), or by its mode for other users."""
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(path)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chmod", "-R", "u+w", str(path)], check=True)
        return
    if not shutil.which("chattr") or subprocess.run(["chattr", "-R", "+i", str(path)]).returncode:
        pytest.skip("cannot make a folder read-only for root here (chattr +i unavailable)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(path)], check=True)


def test_a_verified_read_only_cache_loads(prebuilt, tmp_path):
    cache = _copy(prebuilt, tmp_path)
    with _read_only(cache):
        out, err = _run(cache, "native")
    assert out == _want(prebuilt) and "compiling" not in err


def test_an_empty_read_only_cache_falls_back_or_says_why(prebuilt, tmp_path):
    cache = tmp_path / "empty"
    cache.mkdir()
    with _read_only(cache):
        out, err = _run(cache)
        assert _same_number(out, _want(prebuilt)), "auto must fall back to the reference (the same numbers)"
        assert "not writable" in err and "RuntimeWarning" in err
        out, _ = _run(cache, "native")
        assert out.startswith("RAISED") and "not writable" in out
        res = subprocess.run([sys.executable, "-m", "tlv_fast.build"], capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "TLV_FAST_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": "", **SMALL})
        assert res.returncode == 1 and "not writable" in res.stderr


def test_no_compiler_on_path_uses_a_prebuilt_cache(prebuilt, tmp_path):
    cache = _copy(prebuilt, tmp_path)
    env = {"PATH": os.path.dirname(sys.executable), "CXX": ""}
    out, err = _run(cache, "native", env=env)
    assert out == _want(prebuilt) and "compiling" not in err


@pytest.mark.parametrize("kind", ["missing", "failing"])
def test_a_compiler_that_fails_falls_back_under_auto_and_raises_when_asked(prebuilt, tmp_path, kind):
    if kind == "missing":
        cxx, cause = "/nonexistent/c++", "CXX=/nonexistent/c++ is not an executable"
    else:
        cxx = tmp_path / "cc"
        cxx.write_text("#!/bin/sh\necho 'error: this compiler always fails' >&2\nexit 1\n")
        cxx.chmod(0o755)
        cause = "this compiler always fails"
    cache = tmp_path / "cache"
    out, err = _run(cache, env={"CXX": str(cxx)})
    assert _same_number(out, _want(prebuilt)) and cause in err and err.count("RuntimeWarning") == 1
    out, _ = _run(cache, "native", env={"CXX": str(cxx)})
    assert out.startswith("RAISED") and cause in out


def test_build_module_compiles_ahead_of_time():
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TLV_FAST_CACHE": cache, **SMALL}
        if not torch.cuda.is_available():
            env["CUDA_VISIBLE_DEVICES"] = ""
        res = subprocess.run([sys.executable, "-m", "tlv_fast.build"], capture_output=True, text=True, env=env,
                             cwd=REPO, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "cpu extension ready" in res.stdout
