"""mhc_multi: the mHC "pre" operator (and its "post" partner), forward and backward, over
interchangeable backends: Triton (NVIDIA GPUs), Numba (CPUs) and a NumPy float64 reference.

    import mhc_multi
    out = mhc_multi.forward(x, phi, alpha, bias, gamma)           # ForwardOutput
    grads = mhc_multi.backward(x, phi, alpha, bias, out.inv_rms, out.h_mix, out.h_pre,
                               out.h_post, dh_in, dh_post, dh_res, gamma)   # Gradients

The math and the accuracy promised are in CONTRACT.md (docs/contract.md). torch, numba and
triton are optional at import time; ``available_backends()`` says what can run here.
"""
from .api import (ForwardOutput, Gradients, PostGradients, backward, forward, post_backward,
                  post_forward)
from .crosscheck import Report, crosscheck, random_inputs
from .errors import BackendUnavailableError
from .registry import BackendInfo, available_backends
from .tolerances import tolerance

__version__ = "0.1.0"

__all__ = ["forward", "backward", "post_forward", "post_backward", "ForwardOutput", "Gradients",
           "PostGradients", "available_backends", "BackendInfo", "BackendUnavailableError",
           "crosscheck", "Report", "random_inputs", "tolerance", "mhc_pre", "mhc_post", "MHCPre",
           "MHCLayer", "MHCStack", "expand_streams", "merge_streams"]

_TORCH_NAMES = {"mhc_pre": "autograd", "mhc_post": "autograd", "MHCPre": "autograd",
                "MHCLayer": "layer", "MHCStack": "layer", "expand_streams": "layer", "merge_streams": "layer"}


def __getattr__(name):  # the torch API is imported on first use, so numpy-only users skip torch
    if name in _TORCH_NAMES:
        import importlib
        return getattr(importlib.import_module(f".{_TORCH_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'mhc_multi' has no attribute {name!r}")
