"""Backends: one vocabulary for every op, module, model and integration, and what each backend of each op can run.

Names (``backend=`` everywhere, and the environment variable ``TLV_FAST_BACKEND``):

- ``"auto"``: the first implementation in the op's order for the tensors' device that can run the inputs.
- ``"triton"``: the Triton kernels in ``tlv_fast.kernels`` (CUDA tensors; CPU tensors only when the kernels were
  created under ``TRITON_INTERPRET=1``, as the tests do).
- ``"native"``: the compiled C++/CUDA extension in ``csrc/``: C++ code on CPU tensors, CUDA kernels on CUDA tensors.
  ``"cuda"`` is a deprecated alias.
- ``"reference"``: eager PyTorch (``tlv_fast.reference``), every device and floating dtype.

A backend may also be given per op family as a mapping, ``{"relpos_attention": "triton", "optimal_transport":
"native"}`` (ops not named use ``"auto"``); modules and models validate it when they are built.

Each backend of each op family declares its capabilities once, next to its implementation, as an
:class:`Implementation` (devices and dtypes, head dims, features, runtime conditions) in the way xformers' fmha
operators declare theirs; :func:`choose` reads those declarations. ``python -m tlv_fast.backend_table`` prints
the table README carries (a test keeps the two equal).
"""
import dataclasses
import warnings
from typing import Callable, Mapping, Optional

import torch

from ._env import env

NAMES = ("auto", "triton", "native", "reference")
ALIASES = {"cuda": "native"}  # deprecated spellings -> names
BACKENDS = NAMES  # the names a `backend=` argument accepts (aliases aside)
ENV = "TLV_FAST_BACKEND"

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
_warned = set()


def warn_once(key, message, category=RuntimeWarning, stacklevel=3):
    """warnings.warn(message) the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, category, stacklevel=stacklevel + 1)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a declaration needs to know about a call: device, dtype, head dim and the features it uses."""
    device: torch.device
    dtype: torch.dtype
    head_dim: int = 0
    features: frozenset = frozenset()


@dataclasses.dataclass(frozen=True)
class Implementation:
    """What one backend of one op family can run, declared once beside its code.

    dtypes: device type -> the dtypes it runs there (a device type absent here is not supported).
    max_head_dim: largest head dim (None: any).
    unsupported: features of the family this backend does not implement.
    runtime: device -> reasons it cannot run right now (an interpreter that is off, no compiler...).
    notes: device type -> a short remark for the generated table; summary: one for both devices.
    """
    family: str
    backend: str
    dtypes: Mapping[str, tuple]
    max_head_dim: Optional[int] = None
    unsupported: frozenset = frozenset()
    runtime: Optional[Callable[[torch.device], list]] = None
    notes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    summary: str = ""

    def not_supported_reasons(self, inputs: Inputs) -> list:
        """Why this implementation cannot run `inputs` ([] when it can)."""
        kind = inputs.device.type
        if kind not in self.dtypes:
            return [f"{kind} tensors are not supported (supported: {', '.join(self.dtypes)})"]
        reasons = []
        if inputs.dtype not in self.dtypes[kind]:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes[kind])
            reasons.append(f"dtype {str(inputs.dtype).replace('torch.', '')} on {kind} (supported: {names})")
        if self.max_head_dim is not None and inputs.head_dim > self.max_head_dim:
            reasons.append(f"head dim {inputs.head_dim} > {self.max_head_dim}")
        missing = sorted(inputs.features & self.unsupported)
        if missing:
            described = FAMILIES[self.family].features
            reasons.append("unsupported: " + ", ".join(described.get(f, f) for f in missing))
        if self.runtime is not None and not reasons:  # only when it matters: it may build or import something
            reasons += self.runtime(inputs.device)
        return reasons


@dataclasses.dataclass
class Family:
    """An op family (the public functions that share implementations) and its auto order per device type."""
    name: str
    public: tuple
    auto: Mapping[str, tuple]
    features: dict = dataclasses.field(default_factory=dict)  # name -> what it means, for messages
    implementations: dict = dataclasses.field(default_factory=dict)

    def declare(self, impl: Implementation) -> Implementation:
        if impl.family != self.name or impl.backend not in NAMES or impl.backend == "auto":
            raise ValueError(f"bad declaration {impl.backend!r} for family {self.name!r}")
        unknown = set(impl.unsupported) - set(self.features)
        if unknown:
            raise ValueError(f"{self.name}: {impl.backend} declares unknown features {sorted(unknown)}")
        self.implementations[impl.backend] = impl
        return impl


FAMILIES = {}   # family name -> Family
_PUBLIC = {}    # public op name -> family name


def family(name, public, auto, features=()):
    """Declare an op family once (its module does, at import). features: names, or {name: description}."""
    fam = FAMILIES.get(name)
    if fam is None:
        described = dict(features) if isinstance(features, Mapping) else {f: f for f in features}
        fam = FAMILIES[name] = Family(name, tuple(public), dict(auto), described)
        for p in (name, *public):
            _PUBLIC[p] = name
    return fam


def _load_declarations():
    from . import ops  # noqa: F401  (the op modules declare their families and implementations)


def normalize(backend, what="backend"):
    """A backend name or alias -> the name (aliases warn once); anything else raises ValueError."""
    if isinstance(backend, str):
        if backend in NAMES:
            return backend
        if backend in ALIASES:
            new = ALIASES[backend]
            warnings.warn(f"backend {backend!r} is deprecated: use {new!r} (the compiled C++/CUDA extension, which "
                          "also runs C++ code on CPU tensors)", DeprecationWarning, stacklevel=3)
            return new
    raise ValueError(f"{what} must be one of {NAMES} (or a mapping from op to one of them), got {backend!r}")


def validate(backend, ops=None, where="backend"):
    """Check a `backend=` argument when a module, model or integration is built; return it normalised.

    backend: a name, or a mapping {op family or public op name: name}. ops: the op families the caller runs (None:
    any). An explicit name must be implemented by every op in `ops`; a mapping may name only ops in `ops`.
    """
    _load_declarations()
    ops = tuple(_PUBLIC[o] for o in ops) if ops is not None else None
    if isinstance(backend, Mapping):
        out = {}
        for op, name in backend.items():
            fam = _PUBLIC.get(op)
            if fam is None or (ops is not None and fam not in ops):
                allowed = sorted(ops) if ops is not None else sorted(_PUBLIC)
                raise ValueError(f"{where}: {op!r} is not an op this runs (ops: {allowed})")
            out[fam] = _check_implemented(fam, normalize(name, f"{where}[{op!r}]"), where)
        return out
    name = normalize(backend, where)
    for fam in ops or ():
        _check_implemented(fam, name, where)
    return name


def pick(backend, op):
    """The name a validated backend gives op `op`: the name itself, or the mapping's entry ("auto" if absent)."""
    if isinstance(backend, Mapping):
        return backend.get(_PUBLIC[op], "auto")
    return backend


def _check_implemented(fam, name, where):
    impls = FAMILIES[fam].implementations
    if name != "auto" and name not in impls:
        raise ValueError(f"{where}: op {fam!r} has no {name!r} backend (implemented: {sorted(impls)}); pass a "
                         f"mapping such as {{{fam!r}: {sorted(impls)[0]!r}}} to choose per op")
    return name


def _env_choice(fam):
    """The backend TLV_FAST_BACKEND names for `fam` ("auto" when none), validated."""
    raw = env(ENV, "").strip()
    if not raw or raw == "auto":
        return "auto"
    if "=" in raw:  # op=name,op=name
        choice = "auto"
        for part in raw.split(","):
            op, _, name = part.partition("=")
            if op.strip() not in _PUBLIC:
                raise ValueError(f"{ENV}: unknown op {op.strip()!r} in {raw!r} (ops: {sorted(_PUBLIC)})")
            if _PUBLIC[op.strip()] == fam:
                choice = normalize(name.strip(), ENV)
        return choice
    name = normalize(raw, ENV)
    if name != "auto" and name not in FAMILIES[fam].implementations:
        warn_once(("env", fam, name), f"{ENV}={raw}: op {fam!r} has no {name!r} backend; it keeps 'auto'")
        return "auto"
    return name


_chosen = {}  # (op, backend, TLV_FAST_BACKEND, inputs) -> the name choose() returned


def choose(op, backend, inputs: Inputs):
    """The backend that runs `inputs` for public op `op` (remembered per op, backend, environment and inputs).

    backend: a name or a mapping (see :func:`validate`). "auto" (after TLV_FAST_BACKEND, which replaces it) takes
    the first implementation in the family's order for the device that can run the inputs, warning once when it
    passes over a preferred one; an explicit name that cannot run raises RuntimeError listing why.
    """
    if isinstance(backend, str):
        key = (op, backend, env(ENV), inputs)
        name = _chosen.get(key)
        if name is None:
            name = _choose(op, backend, inputs)
            if not torch.compiler.is_compiling():  # no global side effect inside a traced graph
                _chosen[key] = name
        return name
    return _choose(op, backend, inputs)


def _choose(op, backend, inputs):
    fam = FAMILIES[_PUBLIC[op]]
    if isinstance(backend, Mapping):
        backend = validate(backend)
        backend = backend.get(fam.name, "auto")
    else:
        backend = normalize(backend, f"{op}: backend")
    if backend == "auto":
        backend = _env_choice(fam.name)
    if backend != "auto":
        impl = fam.implementations.get(backend)
        if impl is None:
            raise RuntimeError(f"{op}: backend {backend!r} is not implemented; implemented: "
                               f"{sorted(fam.implementations)}")
        reasons = impl.not_supported_reasons(inputs)
        if reasons:
            raise RuntimeError(f"{op}: backend {backend!r} cannot run these inputs: " + "; ".join(reasons))
        return backend
    order = fam.auto.get(inputs.device.type, ())
    skipped = []
    for name in order:
        reasons = fam.implementations[name].not_supported_reasons(inputs)
        if not reasons:
            if skipped:
                why = "; ".join(f"{n}: " + ", ".join(r) for n, r in skipped)
                warn_once((op, name, why), f"{op}: using the {name!r} backend ({why})")
            return name
        skipped.append((name, reasons))
    if not order:
        raise RuntimeError(f"{op}: no backend runs {inputs.device.type} tensors")
    raise RuntimeError(f"{op}: no backend can run these inputs: " +
                       "; ".join(f"{n}: " + ", ".join(r) for n, r in skipped))


def forget():
    """Forget the remembered choices and the warnings already given (tests that expect a warning again)."""
    _warned.clear()
    _chosen.clear()


# ------------------------------------------------------------------------------------------------------------------
# the table in README
# ------------------------------------------------------------------------------------------------------------------
def _cell(impl, kind):
    if kind not in impl.dtypes:
        return "not implemented"
    parts = ["/".join(_DTYPE_NAMES.get(d, str(d)) for d in impl.dtypes[kind])]
    if impl.max_head_dim is not None:
        parts.append(f"head dim ≤ {impl.max_head_dim}")
    if impl.unsupported:
        described = FAMILIES[impl.family].features
        parts.append("no " + ", ".join(described.get(f, f) for f in sorted(impl.unsupported)))
    if kind in impl.notes:
        parts.append(impl.notes[kind])
    return "; ".join(parts)


def _auto_cell(fam, backend):
    places = []
    for kind, label in (("cuda", "CUDA"), ("cpu", "CPU")):
        order = fam.auto.get(kind, ())
        if backend in order:
            i = order.index(backend)
            places.append(f"first on {label}" if i == 0 else f"on {label} when {', '.join(order[:i])} cannot run "
                                                               "(warns once)")
    return "; ".join(places) or "never (ask for it)"


def markdown_table():
    """The backend table of README, generated from the declarations."""
    _load_declarations()
    lines = ["| op | backend | CUDA tensors | CPU tensors | auto picks it |", "|---|---|---|---|---|"]
    for fam in FAMILIES.values():
        ops = ", ".join(f"`{p}`" for p in fam.public)
        for i, (name, impl) in enumerate(sorted(fam.implementations.items(), key=lambda kv: NAMES.index(kv[0]))):
            summary = f" ({impl.summary})" if impl.summary else ""
            lines.append(f"| {ops if i == 0 else ''} | `{name}`{summary} | {_cell(impl, 'cuda')} | "
                         f"{_cell(impl, 'cpu')} | {_auto_cell(fam, name)} |")
    return "\n".join(lines)
