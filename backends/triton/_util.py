"""Host-side helpers shared by the Triton backend's modules (no kernels here).

``triton``, ``tl`` and ``torch`` are imported once, here; where triton is missing they are None
and the kernel modules define no kernels, so importing the package never fails.
"""
from __future__ import annotations

import functools
import inspect
import math
import os

try:  # importing this backend must never fail where triton is missing
    import triton
    import triton.language as tl
    TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TRITON_ERROR = exc

try:
    import torch
except Exception:  # pragma: no cover
    torch = None


def _has_pdl() -> bool:
    """Whether this Triton has programmatic dependent launch: the griddepcontrol instructions
    (``tl.extra.cuda.gdc_wait``) and the ``launch_pdl`` launch option (Triton 3.5 on), which
    config._fwd_pdl uses on sm_90 and up."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        return (hasattr(tl.extra.cuda, "gdc_wait")
                and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}))
    except Exception:  # noqa: BLE001 -- no triton, or another layout of it: no PDL
        return False


_HAS_PDL = tl is not None and _has_pdl()


#: Whether the kernels run on Triton's CPU interpreter: TRITON_INTERPRET when this package is
#: imported, which is when ``triton.jit`` makes each kernel an interpreted or a compiled one.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpret() -> bool:
    """Whether the kernels run on Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (triton.cdiv is a JIT function: ~7 us per call from the host)."""
    return -(-a // b)


def _tokens(x):
    """(lead, T, n, D) of x [*lead, n, D]: the token dims as the caller shaped them (the front
    end hands [B, S, ...]: LEADING_TOKEN_DIMS), and their number of tokens T.  The kernels
    index every per-token tensor as flat [T, ...] memory, so outputs are allocated with the
    caller's leading dims and need no reshaping."""
    shape = x.shape
    lead = shape[:-2]
    return lead, math.prod(lead), shape[-2], shape[-1]


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _f_pad(n: int) -> int:
    """F_PAD: the gate columns F = n*n + 2n padded to a power of two, at least 16 (the
    tensor cores' smallest dot dimension)."""
    return max(16, _next_pow2(n * n + 2 * n))


def _dtype_name(dt) -> str:
    """The contract's name of a torch dtype the kernels take ("bf16", "fp16", "fp32")."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dt]


def _as(a, dtype):
    """``a`` as a contiguous tensor of ``dtype`` (returned as is when it already is one: no
    dispatch, as this runs several times per launch)."""
    if a.dtype is dtype and a.is_contiguous():
        return a
    return a.to(dtype).contiguous()


def _f32(a):
    """``a`` as a contiguous fp32 tensor (_as)."""
    return _as(a, torch.float32)


def _on_x_device(fn):
    """``fn`` run with x's CUDA device current.  Triton launches (and _resident compiles) on
    the current device and its current stream, so tensors on cuda:1 while cuda:0 is current
    would go to the wrong GPU.  The device is switched only when it differs (otherwise the
    cost is one current_device() call); nothing changes on the CPU (the interpreter)."""
    @functools.wraps(fn)
    def run(*args, **kw):
        dev = (args[0] if args else kw["x"]).device
        if dev.type != "cuda" or dev.index == torch.cuda.current_device():
            return fn(*args, **kw)
        with torch.cuda.device(dev.index):
            return fn(*args, **kw)
    return run


#: Whether launch sites go past Triton's per-call binding once a kernel has compiled (_Launch);
#: False launches every time through ``fn[grid](...)`` (for A/B timing: bench/tokens.py).
DIRECT_LAUNCH = True

try:   # what _Launch needs of Triton: its launch hooks and the current stream
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
    _KNOBS = _knobs.runtime
except Exception:  # noqa: BLE001 -- another Triton (or none): every launch through the JIT
    _KNOBS = _driver = None


class _Launch:
    """One launch site of a launch plan: ``fn[grid](*args, **dyn, **kw)``, with ``grid`` and
    ``kw`` (constexprs and launch options) fixed by the plan, ``args`` and ``dyn`` (runtime
    arguments passed by name) given per call.

    ``fn[grid](...)`` binds and specializes every argument at every call: about 15 us of host
    time per launch on the H200 machine, where the compiled kernel's own launcher takes about
    5.5.  Of what that binding decides, the plan fixes the constexprs, the options and the
    device (its signature holds them); the rest, what Triton specializes on per call, makes
    the key: each tensor's dtype and 16-byte alignment and the ints' values; an argument that
    is None where the first call had a tensor, or the reverse, goes through ``fn[grid]``
    every time.  The first call with a new key goes through ``fn[grid]``, which compiles or
    finds the kernel and launches it; later calls with that key hand the compiled kernel's own
    launcher all of fn's arguments in order, with Triton's launch hooks when any are set, on
    the current stream of the current device (the wrappers run under x's device,
    _on_x_device), as ``fn[grid]`` does.  The interpreter, a Triton whose compiled kernels
    lack these attributes, and DIRECT_LAUNCH = False launch through ``fn[grid]`` every time."""
    __slots__ = ("fn", "grid", "kw", "tail", "slot", "tpos", "ipos", "npos", "kernels")

    def __init__(self, fn, grid, kw):
        self.fn, self.kw = fn, kw
        self.grid = tuple(grid) + (1, 1, 1)[len(grid):]
        self.tail = None     # the values of fn's parameters after the positional ones
        self.slot = {}       # name -> its index in tail
        self.tpos = self.ipos = self.npos = ()   # where fn's runtime tensors, ints, Nones sit
        self.kernels = {}    # key -> the compiled kernel

    def __call__(self, *args, **dyn):
        if not DIRECT_LAUNCH or _INTERPRET or _KNOBS is None:
            self.fn[self.grid](*args, **dyn, **self.kw)
            return
        if self.tail is None:
            self._bind(args, dyn)
        vals = self._values(args, dyn, self.tail)
        key = self._key(vals)
        ck = self.kernels.get(key)
        if ck is None:
            ck = self.fn[self.grid](*args, **dyn, **self.kw)
            if key is not None and _launchable(ck):
                if len(self.kernels) >= 16:
                    self.kernels.clear()
                self.kernels[key] = ck
            return
        enter, leave = _KNOBS.launch_enter_hook, _KNOBS.launch_exit_hook
        hooked = bool(getattr(enter, "calls", enter) or getattr(leave, "calls", leave))
        g = self.grid
        stream = _stream()
        meta = ck.launch_metadata(g, stream, *vals) if hooked else None
        ck.run(g[0], g[1], g[2], stream, ck.function, ck.packed_metadata, meta,
               enter if hooked else None, leave if hooked else None, *vals)

    def _key(self, vals):
        """What Triton specializes on per call, of fn's arguments ``vals`` in order: each
        runtime tensor's dtype and 16-byte alignment and each int's value; None where an
        argument is None where the first call had a tensor, or the reverse (the JIT decides)."""
        try:
            key = (tuple([(vals[i].dtype, vals[i].data_ptr() & 15 == 0) for i in self.tpos]),
                   tuple([vals[i] for i in self.ipos]))
        except AttributeError:
            return None
        return None if any([vals[i] is not None for i in self.npos]) else key

    def _values(self, args, dyn, tail) -> tuple:
        """All of fn's arguments in order: ``args``, then ``tail`` with ``dyn``'s in their
        slots."""
        if not dyn:
            return args + tail
        tail = list(tail)
        for name, v in dyn.items():
            tail[self.slot[name]] = v
        return args + tuple(tail)

    def _bind(self, args, dyn) -> None:
        """The values of fn's parameters after the positional ones (plan's constexprs, else
        defaults; a call's ``dyn`` replaces its own), and where the runtime tensors, ints and
        Nones sit (floats are not specialized), from the first call."""
        params = self.fn.params
        rest = params[len(args):]
        tail = tuple(self.kw.get(p.name, None if p.default is inspect.Parameter.empty
                                 else p.default) for p in rest)
        self.slot = {p.name: i for i, p in enumerate(rest)}
        vals = self._values(args, dyn, tail)
        runtime = [(i, v) for i, (p, v) in enumerate(zip(params, vals)) if not p.is_constexpr]
        self.tpos = tuple(i for i, v in runtime if hasattr(v, "data_ptr"))
        self.ipos = tuple(i for i, v in runtime if isinstance(v, int))
        self.npos = tuple(i for i, v in runtime if v is None)
        self.tail = tail   # last: another thread reads the rest once tail is set


def _stream():
    """The current CUDA device's current stream, as Triton's launcher takes it."""
    return _driver.active.get_current_stream(torch.cuda.current_device())


def _launchable(ck) -> bool:
    """Whether ``ck``, what ``fn[grid](...)`` returned, is a compiled kernel _Launch can launch
    itself."""
    return all(hasattr(ck, a) for a in ("run", "function", "packed_metadata",
                                         "launch_metadata"))
