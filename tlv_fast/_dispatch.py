"""Backend choice shared by every op.

``backend="auto"`` picks the first implementation in the op's preference order that can run the inputs; the
environment variable ``TLV_FAST_BACKEND`` replaces "auto" for every op that implements the named backend (tests use
it to force the kernels). An explicit backend that cannot run raises ``RuntimeError`` listing why. ``auto`` moves
past a preferred compiled backend only for the gaps the op documents, and warns once naming the reason.
"""
import os
import sys
import warnings

BACKENDS = ("auto", "triton", "cuda", "reference")
_warned = set()


def triton_interpreting():
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1 when tlv_fast.kernels loaded)."""
    mod = sys.modules.get("tlv_fast.kernels.attention")
    if mod is not None:
        return mod.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_device_reasons(device):
    """Why Triton kernels cannot run on tensors of `device` ([] when they can)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton is a dependency
        return [f"triton is not importable ({e})"]
    if device.type == "cuda":
        return []
    if device.type == "cpu":
        return [] if triton_interpreting() else ["CPU tensors run Triton kernels only under TRITON_INTERPRET=1"]
    return [f"device type {device.type!r} is not supported by the Triton kernels (cuda, or cpu interpreted)"]


def choose(op, backend, reasons, preferred):
    """Resolve `backend` for `op`.

    reasons: {backend name: list of reasons it cannot run these inputs} for every backend the op implements.
    preferred: the auto order for these inputs, best first; the last entry is the one that always runs.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("TLV_FAST_BACKEND", "auto") or "auto"
        if env not in BACKENDS:
            raise ValueError(f"TLV_FAST_BACKEND must be one of {BACKENDS}, got {env!r}")
        if env in reasons:
            backend = env
    if backend != "auto":
        if backend not in reasons:
            raise RuntimeError(f"{op}: backend {backend!r} is not implemented; implemented: {sorted(reasons)}")
        if reasons[backend]:
            raise RuntimeError(f"{op}: backend {backend!r} cannot run these inputs: " + "; ".join(reasons[backend]))
        return backend
    for i, name in enumerate(preferred):
        if not reasons[name]:
            if i > 0:
                skipped = "; ".join(f"{p}: " + ", ".join(reasons[p]) for p in preferred[:i])
                key = (op, name, skipped)
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(f"{op}: using the {name!r} backend ({skipped})", RuntimeWarning, stacklevel=3)
            return name
    raise RuntimeError(f"{op}: no backend can run these inputs: " +
                       "; ".join(f"{p}: " + ", ".join(reasons[p]) for p in preferred))
