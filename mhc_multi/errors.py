"""Exceptions of mhc_multi's public API."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (not installed, no device, ...)."""
