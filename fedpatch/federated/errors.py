"""Errors of the federation (server and client side)."""

from __future__ import annotations

from fedpatch.errors import FedPatchError


class FederationError(FedPatchError, RuntimeError):
    """The federation cannot finish: too few clients succeeded (the message names the others)."""


class ReplyError(FedPatchError, ValueError):
    """A client's reply is malformed; the message names the client and the field.

    ``kind`` is the short reason the server counts rejected replies under (see
    ``fedpatch.federated.strategy.REJECTION_KINDS``).
    """

    def __init__(self, message: str, kind: str = "malformed") -> None:
        super().__init__(message)
        self.kind = kind
