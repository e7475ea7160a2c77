"""The SDK's exceptions, and the install hint their messages share. Every message names the argument or file and what was expected."""
from __future__ import annotations


class TimarInputError(ValueError):
    """A bad argument to a public call: the message names the argument and what was expected.
    The object it was called on is left exactly as it was."""


class TimarRuntimeError(RuntimeError):
    """A turn that could not be computed from valid input (the model produced NaN or Inf, or the
    backend failed). The session is left exactly as it was."""


class BundleError(ValueError):
    """A bundle that cannot be used: the message names the file and what is wrong."""


def install_hint(extra: str) -> str:
    """How to install an extra: the package is installed from its checkout, not from PyPI."""
    return f'pip install -e ".[{extra}]" in the timar-sdk checkout'
