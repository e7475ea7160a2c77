"""The SDK's exceptions. Every message names the argument or file and what was expected."""
from __future__ import annotations


class TimarInputError(ValueError):
    """A bad argument to a public call: the message names the argument and what was expected.
    The object it was called on is left exactly as it was."""


class TimarRuntimeError(RuntimeError):
    """A turn that could not be computed from valid input (the model produced NaN or Inf, or the
    backend failed). The session is left exactly as it was."""


class BundleError(ValueError):
    """A bundle that cannot be used: the message names the file and what is wrong."""
