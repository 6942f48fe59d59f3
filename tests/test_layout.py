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
    with open(path) as f:
        tree = ast.parse(f.read(), path)
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


# README's "What happens on bad input": every row is exercised by the tests named here (which must exist)
_API, _SK = "ops/test_attention_api.py::", "ops/test_sinkhorn.py::"
BAD_INPUT_TESTS = {
    "`scaled_dot_product_attention`, `attention`": [
        _API + "test_bad_input_raises_naming_the_argument", _API + "test_head_dim_zero_says_so",
        _API + "test_second_order_gradients_through_the_kernel_raise"],
    "`relpos_attention`": ["ops/test_relpos.py::test_bad_input",
                           "ops/test_relpos.py::test_second_order_gradients_through_the_kernel_raise"],
    "`sinkhorn`, `optimal_transport`": [
        _SK + "test_bad_input", _SK + "test_empty_problems_give_empty_plans",
        _SK + "test_zero_marginals_run_on_the_reference_with_a_warning_and_native_says_why",
        _SK + "test_second_order_gradients_raise_on_native_and_work_on_the_reference"],
    "`nn.MultiheadAttention`": ["nn/test_mha.py::test_shape_rules_match_torch",
                                "nn/test_mha.py::test_empty_batch_gives_empty_outputs_like_torch"],
    "`patch`, `sdpa_override`, `register_hf`, modules, model configs": [
        "test_backends.py::test_unknown_names_raise_everywhere_at_construction",
        "models/test_models.py::test_configs_reject_sizes_below_one"],
    "`GPT`, `BERT`, `ViT` forward and `generate`": [
        "models/test_models.py::test_gpt_bad_input", "models/test_models.py::test_bert_bad_input",
        "models/test_models.py::test_vit_rejects_images_the_patches_do_not_tile"],
    "`STTR` forward, `from_checkpoint`, `sttr_loss`, `stereo_metrics`": [
        "models/test_sttr.py::test_bad_inputs_say_what_is_wrong",
        "models/test_sttr.py::test_from_checkpoint_on_files_that_hold_no_state_dict",
        "models/test_sttr.py::test_loss_without_valid_pixels_is_zero_with_zero_gradient",
        "models/test_sttr.py::test_metrics_average_over_the_images_that_have_ground_truth"],
    "the C++/CUDA extension (`native`)": [
        "test_ext.py::test_a_compiler_that_fails_falls_back_under_auto_and_raises_when_asked",
        "test_ext.py::test_an_empty_read_only_cache_falls_back_or_says_why"],
    "`python -m tlv_fast.demo stereo`": ["models/test_sttr.py::test_demo_refuses_bad_arguments_before_training"],
}


def test_every_bad_input_row_of_readme_has_its_tests():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text.split("## What happens on bad input", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| entry point")]
    assert rows and set(rows) == set(BAD_INPUT_TESTS), set(rows) ^ set(BAD_INPUT_TESTS)
    for row, tests in BAD_INPUT_TESTS.items():
        for test in tests:
            path, name = test.split("::")
            with open(os.path.join(REPO, "tests", path)) as f:
                names = {n.name for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.FunctionDef)}
            assert name in names, f"{row}: {test} does not exist"
