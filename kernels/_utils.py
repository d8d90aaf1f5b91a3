"""Dispatch and validation helpers shared by the spsr_kernels ops.

Backend rule (docs/kernels_*.md): CUDA tensors run the Triton kernels; CPU tensors run the
PyTorch path, except under ``TRITON_INTERPRET=1`` where CPU tensors go through the
Triton kernels in the interpreter (that is how CI tests the kernels without a GPU).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from ._triton import HAS_TRITON, TRITON_MISSING

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ON = ("1", "true", "on", "yes")  # TRITON_INTERPRET values read as on where triton's reader is not used


def _triton_interprets() -> bool:
    """TRITON_INTERPRET as triton itself reads it (``triton.knobs``; e.g. "2" is off), which is
    what ``@triton.jit`` follows when it decorates a kernel."""
    if not HAS_TRITON:
        return False
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # a triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _ON


# How the kernels were built: the kernel modules import this one just before they decorate them.
KERNELS_INTERPRETED = _triton_interprets()


def interpreter_active() -> bool:
    """True when Triton kernels run in the CPU interpreter: they were built interpreted
    (TRITON_INTERPRET=1 when spsr_kernels was imported) and the variable still says so.

    Both, because ``@triton.jit`` reads the variable once, at import: set after the import it
    would send CPU tensors to compiled kernels ("0 active drivers"); cleared after the import,
    the PyTorch path runs instead.
    """
    # Not triton's own reader here: torch.compile traces this call and cannot trace that C function.
    return KERNELS_INTERPRETED and os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _ON


def first_order_only(op: str, fix: str, inputs: Callable) -> Callable:
    """Decorator for an autograd Function's ``backward`` that is not differentiable itself.

    Under ``create_graph=True`` the gradients it returns hang from a node that raises
    ``"<op>: this backward is not twice differentiable ...; <fix>"`` as soon as a gradient
    computation passes through it. ``inputs(ctx)`` gives the forward's tensor inputs aligned with
    the backward's outputs (saved with ``save_for_backward``): each gradient is tied to its input
    through that node, so ``torch.autograd.grad(penalty, x)`` must cross it. torch's
    ``once_differentiable`` ties nothing and acts only when an incoming gradient requires grad: a
    penalty on the gradient (an R1-style gradient penalty; its incoming gradient is a constant)
    then differentiated to zero in silence, or failed with "appears to not have been used".
    """
    message = (f"{op}: this backward is not twice differentiable (its gradient was differentiated "
               f"again, e.g. by a gradient penalty); {fix}").encode()

    def wrap(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            sources = list(inputs(ctx)) + [None] * len(outputs)
            tied = []
            for grad, source in zip(outputs, sources):
                if isinstance(grad, torch.Tensor):
                    grad = grad.detach()
                    if isinstance(source, torch.Tensor) and source.requires_grad:
                        # An edge to the input whose value is exactly 0: the sum of no elements
                        # (0 * source.sum() would be NaN for an inf anywhere in the input).
                        grad = grad + source.reshape(-1)[:0].sum()
                    else:
                        grad.requires_grad_(True)
                tied.append(grad)
            out = torch._C._functions.DelayedError(message, len(tied))(*tied)
            return out if isinstance(out, tuple) else (out,)

        return wrapper

    return wrap


def resolve_backend(backend: str, *tensors: torch.Tensor, op: str) -> str:
    """Return "triton" or "torch" for these tensors, or raise a ValueError naming the fix."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return "torch"
    if not HAS_TRITON:
        if backend == "triton":
            raise ValueError(f"{op}: backend='triton': {TRITON_MISSING}")
        return "torch"
    if backend == "triton":
        if not on_cuda and not interpreter_active():
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors (got device {tensors[0].device}); "
                "set TRITON_INTERPRET=1 before importing spsr_kernels to run it on CPU, "
                "or use backend='torch'"
            )
        return "triton"
    return "triton" if (on_cuda or interpreter_active()) else "torch"


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"{op}: all inputs must be on one device, got {listed}")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype}; expected one of float32, float16, bfloat16 "
            "(float64 for gradcheck); convert with .float()"
        )
