"""How the public functions reach their custom ops: through the dispatcher, or directly.

Every maefast op is a `torch.library.custom_op` (fake impl + registered autograd), so
torch.compile and torch.export see it as one opaque node. Called eagerly, though, a custom op with
Python autograd costs several times what a plain `torch.autograd.Function` does (measured on this
project's 2-core CPU, 2026-11-27, torch 2.13: LayerNorm forward+backward through the custom ops
212 us, through an autograd.Function around the same Python 131 us, the math alone 69 us), and on
GPU hosts that cost is what bounds a training step at ViT-B sizes.

So the public functions call `call(op, *args)`:

- while torch.compile / export / torch.jit.trace traces (`torch.compiler.is_compiling()` /
  `is_exporting()` / `torch.jit.is_tracing()`: a Triton or CUDA kernel writes through raw pointers
  the jit tracer never sees, so a direct call's trace would hold its outputs' allocations only), for
  tensor subclasses (FakeTensor, DTensor, ...), for meta tensors (the dispatcher runs the op's fake
  implementation: shapes and dtypes, no data), or when `MAEFAST_EAGER_DISPATCH=custom_op`, it
  calls the custom op (unchanged semantics);
- otherwise ("direct", the default) it runs the op's own Python implementation — inside one
  autograd.Function (same setup_context / backward as the registered autograd) when a gradient is
  needed, as a plain call when none is. The backward then calls the backward op's implementation
  directly too (`bwd(ctx, op)`).

Both routes run the same Python and kernels; tests check they agree bit for bit.

Before either, while a torch.func transform is active (grad, vmap, jvp, jacrev, hessian: also as
Dynamo traces one) or forward-mode AD gives an argument a tangent, the op runs its reference
implementation as plain torch ops (`_composite`), which the transform differentiates and batches
itself: a kernel reads raw storage (no tangent, no batched tensor) and the registered autograd has
no jvp (through the dispatcher torch.func.jvp got a zero tangent, silently). Slower, exact, and of
any order (the kernels' backwards are first order only: `first_order_only`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os

import torch
import torch.autograd.forward_ad as _fwad

from .._validate import compiling, transform_level

DISPATCH_MODES = ("direct", "custom_op")
_ENV = "MAEFAST_EAGER_DISPATCH"


def _mode_from_env() -> str | None:
    """The variable's route, or None for a value that is none: refused at the first call of an op (or
    of get_eager_dispatch), not at import, so that `maefast --help` and the CLIs' one-line errors work."""
    mode = os.environ.get(_ENV, "direct") or "direct"
    return mode if mode in DISPATCH_MODES else None


def _bad_env() -> ValueError:
    return ValueError(f"{_ENV} must be one of {DISPATCH_MODES}, got {os.environ.get(_ENV)!r}")


_mode = _mode_from_env()


def get_eager_dispatch() -> str:
    """"direct" (default) or "custom_op" (see the module docstring)."""
    if _mode is None:
        raise _bad_env()
    return _mode


@contextlib.contextmanager
def eager_dispatch(mode: str):
    """Temporarily route eager calls "direct" or through the "custom_op" dispatcher (not thread-safe;
    meant for tests and benchmarks)."""
    global _mode
    if mode not in DISPATCH_MODES:
        raise ValueError(f"mode must be one of {DISPATCH_MODES}, got {mode!r}")
    old, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = old


def custom_op(name: str, *, mutates_args=()):
    """`torch.library.custom_op(name, mutates_args=...)` that keeps its Python implementation for
    the direct route."""
    def deco(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        op._maefast_impl = fn
        op._maefast_name = name.split("::")[-1]
        op._maefast_function = None
        op._maefast_args = tuple(a.name for a in op._opoverload._schema.arguments)
        return op
    return deco


def first_order_only(name: str, backward):
    """``backward`` that refuses ``create_graph=True`` (a gradient of the gradient) with a clear error.

    The backwards treat the saved statistics (and the fused loss's residual) as constants, so a second
    derivative through them would be silently wrong. torch's ``once_differentiable`` raises only when the
    incoming gradient requires grad, and its raising node hangs off detached copies, so
    ``torch.autograd.grad(penalty, inputs)`` prunes it: a gradient penalty on a loss made of these ops got
    first-order gradients silently. Raising here, when the backward runs with the graph kept, is the one
    place that sees every such use."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled() and not compiling():  # the engine enables grad mode only for create_graph
            raise RuntimeError(f"maefast::{name} has no second derivative: backward(create_graph=True) through "
                               "it would give wrong higher-order gradients (its backward treats saved statistics "
                               "as constants); for a gradient penalty or meta-learning use torch's own ops")
        return backward(ctx, *grads)
    return wrapper


def register_autograd(op, backward, *, setup_context) -> None:
    """`op.register_autograd(backward, setup_context=...)` plus the equivalent autograd.Function
    for the direct route (its ctx carries `maefast_direct = True`, which `bwd` reads). On both routes the
    gradients are first order only (`first_order_only`)."""
    backward = first_order_only(op._maefast_name, backward)
    op.register_autograd(backward, setup_context=setup_context)
    impl = op._maefast_impl

    # The old-style forward(ctx, ...): with a separate setup_context, Function.apply binds its
    # arguments through inspect.signature on every call (~25 us here).
    def forward(ctx, *args):
        out = impl(*args)
        ctx.maefast_direct = True
        setup_context(ctx, args, out)
        return out

    # named so that its graph node reads e.g. "maefast_layer_normBackward"
    op._maefast_function = type(f"maefast_{op._maefast_name}", (torch.autograd.Function,),
                                {"forward": staticmethod(forward), "backward": staticmethod(backward),
                                 "__module__": __name__})


def _needs_grad(args) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _exporting() -> bool:
    f = getattr(torch.compiler, "is_exporting", None)
    return bool(f and f())


def _traced(args) -> bool:
    """Tensor subclasses (FakeTensor, FunctionalTensor, DTensor, ...) belong to a tracer or a wrapper
    that knows the custom op (its fake impl, its sharding) and not our Python: they take that route.
    So do meta tensors: the dispatcher's Meta kernel is the registered fake implementation, where our
    Python would try to read values that a meta tensor does not have."""
    return any(isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or a.device.type == "meta") for a in args)


def _transformed(args) -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, jacrev, ...) is active, or forward-mode AD
    carries a tangent on one of ``args``: neither the kernels nor the custom ops' autograd serve them
    (a kernel drops tangents and cannot read a batched tensor; the registered autograd has no jvp)."""
    if transform_level() is not None:
        return True
    return _fwad._current_level >= 0 and any(
        isinstance(a, torch.Tensor) and _fwad.unpack_dual(a).tangent is not None for a in args)


def _composite(op, args):
    """The op's reference implementation run as plain torch ops, which every transform and forward-mode
    AD differentiate (and batch) themselves: the same values as ``impl="reference"``."""
    names = op._maefast_args
    args = tuple("reference" if n == "impl" else a for n, a in zip(names, args))
    return op._maefast_impl(*args)


def call(op, *args):
    """Runs custom op `op` on positional `args` by the route chosen above."""
    if _transformed(args):
        return _composite(op, args)
    if _mode != "direct" or compiling() or _exporting() or _traced(args) or torch.jit.is_tracing():
        if _mode is None:
            raise _bad_env()
        return op(*args)
    fn = op._maefast_function
    if fn is not None and _needs_grad(args):
        return fn.apply(*args)
    with torch.no_grad():  # no graph either way (the custom op's implementation runs below autograd)
        return op._maefast_impl(*args)


def bwd(ctx, op):
    """The callable a registered backward should use for its backward op: the implementation
    itself on the direct route, the custom op otherwise (e.g. while AOTAutograd traces). Batched gradients
    (``torch.autograd.grad(is_grads_batched=True)``, ``jacobian(vectorize=True)``: vmap over the backward)
    take the reference backward, which vmap batches (a kernel cannot read a batched tensor)."""
    fn = op._maefast_impl if getattr(ctx, "maefast_direct", False) and not compiling() else op

    def run(*args):
        # only the incoming gradients (every backward op's first one or two arguments) are batched there: vmap's
        # legacy batched tensors (a torch.func transform runs the ops' reference forward, never this backward)
        if any(isinstance(a, torch.Tensor) and _is_batched(a) for a in args[:2]):
            return _composite(op, args)
        return fn(*args)
    return run


_is_batched = torch._C._functorch.is_legacy_batchedtensor


_TAG_PREFIX = "maefast-ops-"


def ops_fingerprint(folder: str | None = None) -> str:
    """A hash of the sources of maefast's op definitions: the .py files of `folder` (default this
    package: schemas, fake implementations, autograd formulas)."""
    folder = folder or os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    read = 0
    try:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
                read += 1
    except OSError:
        read = 0
    if not read:  # no readable sources (a zip or sourceless install): the installed version, at least
        try:
            from importlib.metadata import version

            h.update(b"version\0" + version("maefast").encode())
        except Exception:  # noqa: BLE001 - not installed either: a constant tag, as without one
            h.update(b"unknown")
    return h.hexdigest()[:16]


def tag_compile_caches() -> None:
    """Adds `ops_fingerprint()` to torch.compile's cache key tag (`torch.compiler.config.cache_key_tag`,
    the user's own tag kept in front). torch's FX-graph and AOTAutograd caches key a graph by its nodes
    and inputs, not by what a custom op's fake implementation or backward says: after maefast changes
    one (an output dtype, a gradient formula), a graph cached by the old maefast would be reused with
    the old metadata and give wrong numbers silently (seen: a cached graph read an op's new fp32
    output as bf16, NaN loss). With the fingerprint in the key a changed maefast compiles afresh."""
    cfg = getattr(getattr(torch, "compiler", None), "config", None)
    if cfg is None or not hasattr(cfg, "cache_key_tag"):
        return  # an older torch: no tag to set
    own = _TAG_PREFIX + ops_fingerprint()
    parts = [t for t in str(cfg.cache_key_tag or "").split("+") if t and not t.startswith(_TAG_PREFIX)]
    cfg.cache_key_tag = "+".join(parts + [own])
