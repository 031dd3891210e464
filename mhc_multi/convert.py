"""Between the caller's containers and a backend's: arguments in, results out.

A backend receives contiguous arrays in its own container (numpy arrays or torch tensors,
``registry``); the caller gets results in x's container, device and shape.
"""
from __future__ import annotations

import weakref

import numpy as np

from .checks import _Args, _is_tensor, _torch


def _cast_like(a, ref):
    """``a`` in ``ref``'s dtype (itself, with no dispatch, when it already is)."""
    if a.dtype == ref.dtype:
        return a
    if _is_tensor(a):
        return a.to(ref.dtype)
    return a.astype(ref.dtype)


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
            return _cpu_tensor_as_numpy(t.contiguous(), torch)
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
        a = _numpy_as_cpu_tensor(a, torch)
    if not args.on_cpu and a.device != args.device:
        a = a.to(args.device)
    return a if shape is None else a.reshape(shape)


class _Mover:
    """How one signature's arguments go into a backend's containers and its results come back.

    A plan (api.py) picks the conversions once, from what its signature fixes (the caller's
    container and device, the backend's container, the parameters' compute dtype), so a call
    runs only the ones it needs:

    * ``cast(a)``: a parameter or gate in the compute dtype (itself when it already is);
    * ``into(a, shape)``: an argument in the backend's container;
    * ``back(a, shape)``: a result in the caller's.

    Each takes None through; ``shape``, when given, reshapes (a view: the conversion made the
    array contiguous), except where the backend takes the caller's token dims as they are
    (``leading``: a backend's LEADING_TOKEN_DIMS) and the containers match: there arguments go
    in and results come back with their shapes untouched."""
    __slots__ = ("cast", "into", "back")

    def __init__(self, args: _Args, kind: str, leading: bool = False):
        self.cast = _caster(args)
        if args.kind == "torch" and args.on_cpu and kind == "numpy":
            self.into, self.back = _cpu_tensor_movers(_torch())
        elif args.kind == "torch" and kind == "torch":   # the backend allocates on x's device
            self.into, self.back = ((_tensor_in_as_is, _as_is) if leading
                                    else (_tensor_in, _reshaped))
        else:
            on_cpu = args.on_cpu

            def into(a, shape=None):
                a = _to_backend(a, kind, on_cpu)
                return a if shape is None or a is None else a.reshape(shape)

            def back(a, shape=None):
                return _from_backend(a, args, shape)
            self.into, self.back = into, back


def _caster(args: _Args):
    """``cast(a)``: ``a`` in ``args.compute_dtype``, in the caller's container."""
    fp64 = args.compute_dtype == "fp64"
    if args.kind == "torch":
        torch = _torch()
        dt = torch.float64 if fp64 else torch.float32

        def cast(a):
            return a if a is None or a.dtype is dt else a.to(dt)
    else:
        dt = np.dtype(np.float64 if fp64 else np.float32)

        def cast(a):
            return a if a is None or a.dtype == dt else a.astype(dt)
    return cast


def _reshaped(a, shape=None):
    """A torch backend's result (contiguous: it allocates them) in the caller's shape; ``view``
    costs about half of ``reshape`` per call."""
    return a if shape is None or a is None else a.view(shape)


def _as_is(a, shape=None):
    return a


def _tensor_in_as_is(a, shape=None):
    """A tensor for a torch backend, in the caller's shape (``shape`` is ignored: the backend
    takes the token dims as they come): itself when contiguous and not requiring grad."""
    if a is None:
        return None
    if a.requires_grad or not a.is_contiguous():
        a = a.detach().contiguous()
    return a


def _tensor_in(a, shape=None):
    """A tensor for a torch backend: itself when contiguous and not requiring grad, viewed as
    ``shape`` when given."""
    a = _tensor_in_as_is(a)
    return a if shape is None or a is None else a.view(shape)


def _cpu_tensor_movers(torch):
    """``(into, back)`` between CPU tensors and a numpy backend: ``_to_backend(a, "numpy")``
    and ``_from_backend`` with the containers known, for every argument and result of a
    call."""
    Parameter = torch.nn.Parameter

    def into(a, shape=None):
        if a is None:
            return None
        if type(a) is Parameter:
            a = _param_view(a, True)
        else:
            if a.requires_grad:
                a = a.detach()
            a = _cpu_tensor_as_numpy(a if a.is_contiguous() else a.contiguous(), torch)
        return a if shape is None else a.reshape(shape)

    def back(a, shape=None):
        if a is None:
            return None
        if shape is not None:   # reshaped first: a numpy view is cheaper than a torch one
            a = a.reshape(shape)
        return _numpy_as_cpu_tensor(a, torch)
    return into, back


_U16 = np.dtype(np.uint16)


def _cpu_tensor_as_numpy(t, torch):
    """A contiguous CPU tensor's memory as a numpy array, through DLPack (bf16 as uint16
    words); the array holds the tensor alive."""
    if t.dtype is torch.bfloat16:
        return np.from_dlpack(_DLPack(torch._C._to_dlpack(t.view(torch.int16)))).view(np.uint16)
    return np.from_dlpack(_DLPack(torch._C._to_dlpack(t)))


def _numpy_as_cpu_tensor(a, torch):
    """A numpy array as a CPU tensor sharing its memory (uint16 words as bf16)."""
    if a.dtype == _U16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
