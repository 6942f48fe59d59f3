"""Project layout rules: import direction (kernels <- ops <- nn <- models), reference.py imports only torch,
kernels ship as tlv_fast.kernels and never as a top-level `kernels`, importing tlv_fast is cheap."""
import ast
import os
import subprocess
import sys
import tempfile

import pytest

from helpers import REPO

LAYERS = ["kernels", "ops", "nn", "models"]  # a layer may import only layers to its left


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, 0
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


def _layer_of_import(name, level, file_layer):
    """Which tlv_fast layer an import statement reaches (None if none)."""
    if level == 0:
        parts = name.split(".")
        if parts[0] != "tlv_fast":
            return "kernels" if parts[0] == "kernels" else None
        return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None
    if level == 1:  # same package
        return file_layer
    first = name.split(".")[0]
    return first if first in LAYERS else None


def _python_files(folder):
    for root, _, files in os.walk(os.path.join(REPO, folder)):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(root, f)


def test_import_direction_only_downwards():
    problems = []
    for layer in LAYERS:
        folder = "kernels" if layer == "kernels" else os.path.join("tlv_fast", layer)
        for path in _python_files(folder):
            for name, level in _imports(path):
                if layer == "kernels" and level == 0 and name.split(".")[0] == "kernels":
                    problems.append(f"{path}: imports top-level `kernels` ({name})")
                target = _layer_of_import(name, level, layer)
                if target and LAYERS.index(target) > LAYERS.index(layer):
                    problems.append(f"{path}: {layer} imports {target} ({'.' * level}{name})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module,allowed", [("reference", {"tlv_fast.formulas"}), ("formulas", set())])
def test_reference_imports_only_torch_stdlib_and_the_shared_formulas(module, allowed):
    """The oracle stays independent of the kernels: torch, the standard library, and tlv_fast.formulas (which
    itself imports only those)."""
    path = os.path.join(REPO, "tlv_fast", f"{module}.py")
    for name, level in _imports(path):
        top = name.split(".")[0]
        assert level == 0, f"{module}.py has a relative import: {name}"
        assert top == "torch" or top in sys.stdlib_module_names or name in allowed, f"{module}.py imports {name}"


def test_no_module_imports_top_level_kernels():
    for folder in ("tlv_fast", "kernels", "benchmarks", "tests"):
        for path in _python_files(folder):
            for name, level in _imports(path):
                assert not (level == 0 and name.split(".")[0] == "kernels"), f"{path} imports `{name}`"


def _run(code, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env)


def test_installed_package_has_kernels_inside_and_no_top_level_kernels():
    with tempfile.TemporaryDirectory() as elsewhere:
        res = _run("import importlib.util, tlv_fast.kernels.attention as a; "
                   "print(importlib.util.find_spec('kernels') is None, a.__name__)", elsewhere)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "tlv_fast.kernels.attention"], res.stdout


def test_source_tree_imports_from_the_repository_root():
    res = _run("import tlv_fast, tlv_fast.kernels.attention as a, os; "
               "print(os.path.realpath(a.__file__).startswith(os.path.realpath(os.getcwd())))", REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True"


def test_import_is_cheap_and_touches_no_gpu():
    res = _run("import sys, torch, tlv_fast; "
               "print('triton' in sys.modules, torch.cuda.is_initialized())", REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"], res.stdout
