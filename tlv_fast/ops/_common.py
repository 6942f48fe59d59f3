"""Pieces the op modules share: output allocation in the inputs' memory order, the Triton runtime condition of the
backend declarations, and argument checks that more than one op makes."""
import torch

from .. import testing

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PRECISIONS = ("ieee", "tf32")


def empty_layout(like, shape, dtype=None, poison=None):
    """Uninitialised tensor of `shape` whose first three dims are ordered in memory as `like`'s, last dim dense
    (a BSHD tensor viewed as BHSD gives a BSHD-ordered result, as torch's SDPA does). Poisoned under testing."""
    s0, s1, s2, _ = like.stride()
    if s0 >= s1 >= s2:  # the usual (B, H, N, D) order
        out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    else:
        order = sorted(range(3), key=lambda i: (-(s0, s1, s2)[i], i)) + [3]
        out = torch.empty_permuted(shape, order, dtype=dtype or like.dtype, device=like.device)
    return testing.poison(out, poison)


def triton_runtime(kernels_module):
    """A declaration's runtime condition for Triton kernels: `kernels_module()` returns the kernel module, whose
    `interpreted()` says whether its kernels run in Triton's CPU interpreter."""
    def reasons(device):
        if device.type == "cuda":
            return []
        if device.type == "cpu":
            try:
                interp = kernels_module().interpreted()
            except ImportError as e:  # pragma: no cover - triton is a dependency
                return [f"triton is not importable ({e})"]
            return [] if interp else ["CPU tensors run the Triton kernels only when they were created under "
                                      "TRITON_INTERPRET=1 (set it before tlv_fast.kernels is imported)"]
        return [f"device type {device.type!r} is not supported by the Triton kernels (cuda, or cpu interpreted)"]
    return reasons


def native_runtime(device):
    """A declaration's runtime condition for the csrc extension: it loads (built on first use); a build that fails
    says why, once per process."""
    from .. import _ext
    try:
        _ext.load("cuda" if device.type == "cuda" else "cpu")
    except _ext.BuildError as e:
        return [str(e)]
    return []


def cpu_native_ops(register):
    """Decorator for an op module's accessor of its C++ CPU ops: the accessor loads the CPU extension and runs
    `register` (their fake implementations and autograd) once, then returns torch.ops.tlv_fast."""
    done = []

    def ops():
        if not done:
            from .. import _ext
            _ext.load("cpu")
            register()
            done.append(True)
        return torch.ops.tlv_fast
    ops.__doc__ = register.__doc__
    return ops


def check_tensor(op, name, t, min_ndim, shape_doc):
    """A floating-point tensor with at least `min_ndim` dims, else TypeError / ValueError naming `name`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim < min_ndim:
        raise ValueError(f"{op}: {name} must be {shape_doc}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def check_precision(op, fp32_precision):
    if fp32_precision not in PRECISIONS:
        raise ValueError(f"{op}: fp32_precision must be 'ieee' or 'tf32', got {fp32_precision!r}")


def no_double_backward(op, public):
    """Register an autograd formula for the backward op `op` that raises: a second-order gradient through it would
    otherwise be silently zero (torch only warns for custom ops without one)."""
    def backward(ctx, *grads):
        raise RuntimeError(f"{public}: second-order gradients (double backward, e.g. a Hessian-vector product) are "
                           "not implemented by this backend; use backend='reference' for them")

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)


def eager_path(*tensors):
    """True when a call may run its implementation directly instead of through its torch.library custom op (whose
    dispatch costs ~30 us of host time): plain eager execution, with no torch.compile / export tracing, no tensor
    subclass, functorch transform, or dispatch or function mode that expects to see the op."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled() \
            or torch._C._len_torch_dispatch_stack():
        return False
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or torch._C._functorch.is_functorch_wrapped_tensor(t)):
            return False
    return True


def needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def eager_twin(impl, setup_context, backward):
    """An autograd.Function with a custom op's forward (`impl`), setup_context and backward: what eager calls run
    instead of the op (see `call`)."""
    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)
    return EagerOp


def call(op, impl, twin, inputs, tensors):
    """Run a custom op: through torch.library when traced or transformed, else directly (`twin` when autograd must
    record it, `impl` when not) -- the same code, without ~30 us of dispatch per call."""
    if not eager_path(*tensors):
        return op(*inputs)
    if needs_grad(*tensors):
        return twin.apply(*inputs)
    return impl(*inputs)
