"""csrc builds: the CUDA sources compile for sm_90 with this machine's nvcc (they run under -m gpu), and concurrent
first uses of the C++ extension share one cache without corrupting it."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from helpers import REPO

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


def test_concurrent_first_use_builds_once_and_both_load():
    code = ("import torch, tlv_fast\n"
            "torch.manual_seed(0)\n"
            "s = torch.randn(2, 5, 6, dtype=torch.float64)\n"
            "mu = torch.full((2, 5), -5 ** 0.5, dtype=torch.float64)\n"
            "nu = torch.full((2, 6), -6 ** 0.5, dtype=torch.float64)\n"
            "print(tlv_fast.sinkhorn(s, mu, nu, backend='native').sum().item())\n")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TLV_FAST_CACHE": cache}
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=REPO) for _ in range(2)]
        results = [p.communicate(timeout=600) for p in procs]
        for p, (out, err) in zip(procs, results):
            assert p.returncode == 0, err[-3000:]
        assert results[0][0] == results[1][0]
        assert sum("compiling the cpu extension" in err for _, err in results) == 1, [e for _, e in results]
        builds = [d for d in os.listdir(cache) if d.startswith("cpu-")]
        assert len(builds) == 1 and any(f.endswith(".so") for f in os.listdir(os.path.join(cache, builds[0])))


def test_build_module_compiles_ahead_of_time():
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TLV_FAST_CACHE": cache}
        if not torch.cuda.is_available():
            env["CUDA_VISIBLE_DEVICES"] = ""
        res = subprocess.run([sys.executable, "-m", "tlv_fast.build"], capture_output=True, text=True, env=env,
                             cwd=REPO, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "cpu extension ready" in res.stdout
