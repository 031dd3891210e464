"""Between the caller's containers and a backend's: arguments in, results out.

A backend receives contiguous arrays in its own container (numpy arrays or torch tensors,
``registry``); the caller gets results in x's container, device and shape.
"""
from __future__ import annotations

import weakref

import numpy as np

from .checks import _Args, _is_tensor, _torch, dtype_name


def _cast_like(a, ref):
    """``a`` in ``ref``'s dtype (itself, with no dispatch, when it already is)."""
    if a.dtype == ref.dtype:
        return a
    if _is_tensor(a):
        return a.to(ref.dtype)
    return a.astype(ref.dtype)


def _cast_to(a, name: str):
    """``a`` in the dtype named ``name`` ("fp32" or "fp64"; itself when it already is)."""
    if a is None or dtype_name(a) == name:
        return a
    if _is_tensor(a):
        torch = _torch()
        return a.to(torch.float64 if name == "fp64" else torch.float32)
    return a.astype(np.float64 if name == "fp64" else np.float32)


class _DLPack:
    """A DLPack capsule as ``np.from_dlpack`` takes it (a CPU tensor's, from ``to_dlpack``)."""
    __slots__ = ("capsule",)

    def __init__(self, capsule):
        self.capsule = capsule

    def __dlpack__(self, stream=None, **_):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)   # kDLCPU


def _to_backend(a, kind: str, on_cpu: bool = False):
    """An argument as the backend's contiguous container (bf16 -> uint16 words for numpy).

    A CPU tensor is viewed through DLPack, which leaves its storage resizable:
    ``Tensor.numpy()`` would make it non-resizable for good, and FSDP2 frees its gathered
    parameters with ``storage.resize_(0)``. The array holds the tensor alive. ``on_cpu``: the
    caller knows that a tensor is on the CPU (validated: on x's device)."""
    if a is None:
        return None
    if kind == "numpy":
        if _is_tensor(a):
            torch = _torch()
            if type(a) is torch.nn.Parameter:   # not isinstance: its metaclass check is slow
                return _param_view(a, on_cpu)
            t = a.detach() if a.requires_grad else a
            if not on_cpu and t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()
            bf16 = t.dtype == torch.bfloat16
            if bf16:
                t = t.view(torch.int16)
            a = np.from_dlpack(_DLPack(torch.utils.dlpack.to_dlpack(t)))
            return a.view(np.uint16) if bf16 else a
        return np.ascontiguousarray(a)
    torch = _torch()
    if _is_tensor(a):
        if not a.requires_grad and a.is_contiguous():   # as it is: no new tensor object
            return a
        return a.detach().contiguous()
    return torch.from_numpy(np.ascontiguousarray(a))


#: id(Parameter) -> ((its memory address, shape, strides, dtype), numpy view): a module hands the
#: same Parameter object to every call, and a contiguous one's view shares its memory, so it
#: follows in-place updates and is built once. An entry serves while the Parameter lives (a
#: finalizer drops it) and sits over the same memory with the same layout (FSDP2 frees and
#: re-gathers parameters: a new address builds a new view).
_PARAM_VIEWS: dict = {}


def _param_view(p, on_cpu: bool):
    """``_to_backend(p, "numpy")`` of a Parameter, from _PARAM_VIEWS where it holds."""
    key, where = id(p), (p.data_ptr(), p.shape, p.stride(), p.dtype)
    hit = _PARAM_VIEWS.get(key)
    if hit is not None and hit[0] == where:
        return hit[1]
    arr = _to_backend(p.detach(), "numpy", on_cpu)
    if p.device.type == "cpu" and p.is_contiguous():
        if hit is None:
            weakref.finalize(p, _PARAM_VIEWS.pop, key, None)
        _PARAM_VIEWS[key] = (where, arr)
    return arr


def _from_backend(a, args: _Args, shape: tuple | None = None):
    """A backend result in the caller's container and device, reshaped to ``shape``."""
    if a is None:
        return None
    if args.kind == "numpy":
        if _is_tensor(a):
            a = a.cpu().numpy()
        return a if shape is None else a.reshape(shape)
    torch = _torch()
    if isinstance(a, np.ndarray):   # reshaped first: a numpy view is cheaper than a torch one
        if shape is not None:
            a, shape = a.reshape(shape), None
        a = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype == np.uint16
             else torch.from_numpy(a))
    if not args.on_cpu and a.device != args.device:
        a = a.to(args.device)
    return a if shape is None else a.reshape(shape)


def _run(args: _Args, mod, fn: str, inputs: dict, **kw):
    """``mod.fn(**inputs, **kw)`` with each input (a value, or ``(value, shape)``) in the
    backend's container, reshaped there (a view: the conversion made it contiguous)."""
    kind, conv, on_cpu = mod.ARRAY_KIND, {}, args.on_cpu
    for k, v in inputs.items():
        v, shape = v if isinstance(v, tuple) else (v, None)
        a = _to_backend(v, kind, on_cpu)
        conv[k] = a if shape is None or a is None else a.reshape(shape)
    return getattr(mod, fn)(**conv, **kw)
