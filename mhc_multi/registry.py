"""The backend registry: names -> backend modules, availability, and the ``"auto"`` choice.

A backend is a module exposing (see ``backends/numpy_ref.py`` for the full interface):

    ARRAY_KIND          "numpy" (computes on numpy arrays, CPU) or "torch" (torch tensors)
    LEADING_TOKEN_DIMS  (optional) True: takes [B, S, ...] as they come, not flattened to T
    SUPPORTS_SINKHORN   whether forward/backward accept sinkhorn_iters > 0
    availability()      None when it can run here, else the reason it cannot
    forward(...), backward(...)        the pre operator
    post_forward(...), post_backward(...)   the post operator (optional)

Adding a backend means adding one module under ``backends/`` and one line below.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NamedTuple

from .errors import BackendUnavailableError

#: name -> module path, in the order ``"auto"`` prefers them
BACKENDS: dict[str, str] = {
    "triton": "mhc_multi.backends.triton",
    "numba": "mhc_multi.backends.numba",
    "numpy": "mhc_multi.backends.numpy_ref",
}
ENV_VAR = "MHC_MULTI_BACKEND"


class BackendInfo(NamedTuple):
    name: str
    available: bool
    reason: str | None  # why it cannot run here; None when it can


_loaded: dict[str, ModuleType | str] = {}


def _load(name: str) -> ModuleType | str:
    """The backend module, or the reason it failed to import (cached)."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(BACKENDS[name])
        except ImportError as exc:  # a missing optional dependency inside the module
            _loaded[name] = f"cannot import {BACKENDS[name]}: {exc}"
    return _loaded[name]


def _reason(name: str) -> str | None:
    mod = _load(name)
    return mod if isinstance(mod, str) else mod.availability()


def available_backends() -> list[BackendInfo]:
    """Every backend with whether it can run here and, if not, why."""
    return [BackendInfo(name, (r := _reason(name)) is None, r) for name in BACKENDS]


#: bumped by register / unregister: the front end's cached plans name the generation they
#: were made in (api._env), so a plan never outlives the backend it chose
generation = 0


def register(name: str, module: ModuleType) -> None:
    """Add (or replace) a backend under ``name``: a module or object with the interface above."""
    global generation
    BACKENDS[name] = getattr(module, "__name__", name)
    _loaded[name] = module
    generation += 1


def unregister(name: str) -> None:
    global generation
    BACKENDS.pop(name, None)
    _loaded.pop(name, None)
    generation += 1


def check_name(backend: str) -> str:
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        valid = ", ".join(repr(b) for b in ("auto", *BACKENDS))
        raise ValueError(f"backend: expected one of {valid}, got {backend!r}")
    return backend


_CAPABILITY = {"sinkhorn": ("SUPPORTS_SINKHORN", "sinkhorn_iters > 0"),
               "post": ("post_forward", "the post operator")}


def _lacks(mod: ModuleType, needs: str | None) -> str | None:
    if needs is None:
        return None
    attr, what = _CAPABILITY[needs]
    return None if getattr(mod, attr, None) else what


def resolve(backend: str, *, on_cuda: bool, needs: str | None = None) -> tuple[str, ModuleType]:
    """Turn a requested name (or ``"auto"``) into a runnable backend module.

    ``"auto"`` (overridden by $MHC_MULTI_BACKEND): CUDA tensors -> triton; anything on the
    CPU -> numba when it can run (and has the capability ``needs``: "sinkhorn" or "post"),
    else numpy.
    """
    check_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"${ENV_VAR}: expected one of {', '.join(BACKENDS)}, got {env!r}")
            backend = env
        elif on_cuda:
            backend = "triton"
        else:
            numba_ok = _reason("numba") is None and not _lacks(_load("numba"), needs)
            backend = "numba" if numba_ok else "numpy"
    reason = _reason(backend)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run here: {reason}")
    mod = _load(backend)
    missing = _lacks(mod, needs)
    if missing:
        raise BackendUnavailableError(f"backend {backend!r} does not implement {missing} yet")
    return backend, mod
