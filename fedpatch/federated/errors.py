"""Errors of the federation (server and client side)."""

from __future__ import annotations

from fedpatch.errors import FedPatchError


class FederationError(FedPatchError, RuntimeError):
    """The federation cannot finish: too few clients succeeded (the message names the others)."""


class ReplyError(FedPatchError, ValueError):
    """A client's reply is malformed; the message names the client and the field."""
