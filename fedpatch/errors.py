"""Exceptions that carry a user-facing message naming the file, field or client at fault.

Every error that a user can cause (bad data, bad config, bad model file, missing weights,
a misbehaving federation peer) is one of these, so the command line can print the message
without a traceback and tests can assert on the type.
"""

from __future__ import annotations


class FedPatchError(Exception):
    """Base class of all user-facing fedpatch errors."""


class DataError(FedPatchError, ValueError):
    """A data file or folder is missing, unreadable or inconsistent; the message names the path."""


class ConfigError(FedPatchError, ValueError):
    """A configuration key is unknown, mistyped or out of range; the message names the key."""


class ModelFileError(FedPatchError, ValueError):
    """A saved model file is unreadable, unsafe or does not match the requested model."""


class WeightsUnavailableError(FedPatchError, RuntimeError):
    """Pretrained backbone weights are neither cached nor downloadable; says how to get them."""


class BankValidationError(FedPatchError, ValueError):
    """A memory bank received from a peer is malformed (dimension, dtype, NaN/inf, size)."""
