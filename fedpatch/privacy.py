"""Protecting the memory-bank rows a federated client sends (``federated.privacy``).

What a bank reveals. A bank row is a patch feature vector of one of the client's real
training images. Features of a pretrained CNN can be inverted to approximate image content,
and a k-center coreset keeps exactly the rare, unusual patches (a foreign part, a label, a
person's hand) because it maximises coverage. Sending the bank therefore sends a sketch of
the client's images. Two options change what leaves the client:

``rotation`` (obfuscation, NOT a formal guarantee)
    Every client of a federation holds the same secret key (node config ``rotation-key`` or
    environment variable ``FEDPATCH_ROTATION_KEY``; never part of the run configuration, so
    the server never receives it). From the key each client derives the same random
    orthogonal matrix ``Q`` (:func:`rotation_matrix`) and sends ``bank @ Q``. Rotations keep
    every L2 distance, so the server can still merge banks; a client un-rotates the global bank
    it receives (``bank @ Q.T``) and scores exactly as without rotation (float32 rounding
    aside). One exception: when the server reduces the union (``global_ratio < 1``) with a
    random projection (features more than twice ``model.projection_dim`` wide), projecting
    rotated rows is a different random projection, so it selects other rows (measured: 57-64 %
    the same, AUROC within 0.03 either way); with exact distances the selection is the same.
    The server still sees every distance and norm between rows (the whole Gram
    matrix), and ``Q`` can be recovered from a handful of known (plain, rotated) row pairs, or
    guessed from structure (backbone features are non-negative after ReLU), so this only keeps
    the raw vectors from being fed straight into a feature-inversion model. A weak key can be
    brute-forced, so keys must have at least :data:`MIN_KEY_LENGTH` characters (use
    ``python -c "import secrets; print(secrets.token_hex(16))"``).

``gaussian`` (clipping + the analytic Gaussian mechanism)
    Each bank row is clipped to L2 norm ``clip_norm`` (C), then N(0, sigma^2) noise is added
    to every coordinate, with sigma calibrated by :func:`gaussian_sigma` (Balle & Wang 2018,
    the analytic Gaussian mechanism, exact for every epsilon > 0; the textbook
    ``sigma = Delta * sqrt(2 ln(1.25/delta)) / epsilon`` only holds for epsilon < 1). What is
    covered: each released row, as a function of the one patch vector it came from, is
    (epsilon, delta)-differentially private with respect to REPLACING that patch vector by any
    other vector (after clipping both, the L2 sensitivity is 2C). What is NOT covered:
    (1) which patches the greedy coreset selects: selection runs on the clean features and
    depends on all of them, and it is not privatised; (2) several rows from one image (an image
    contributes about ``coreset_percentage`` x its patches, which also overlap through the
    3x3 neighbourhood): k rows of one image compose to a Gaussian mechanism with sensitivity
    2C*sqrt(k), i.e. a much larger epsilon per image; (3) repeated rounds, which release fresh
    noise each time and compose the same way. So the guarantee is per released row, not per
    image or per client data set. Measured AUROC costs are in ``benchmarks/results/privacy.md``.

Both transforms run on the client only (:class:`BankPrivacy`); the server code is unchanged.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedpatch.errors import ConfigError

PRIVACY_MODES: tuple[str, ...] = ("none", "rotation", "gaussian")
ROTATION_KEY_ENV = "FEDPATCH_ROTATION_KEY"
"""Environment variable holding the rotation key (read on the client only)."""
ROTATION_KEY_NODE = "rotation-key"
"""Node-config key holding the rotation key (``flower-supernode --node-config``)."""
MIN_KEY_LENGTH = 16
_KDF_PERSON = b"fedpatch-rot-v1"  # domain separation: the key's hash is used for nothing else


# --------------------------------------------------------------------------------------------
# Rotation
# --------------------------------------------------------------------------------------------
def check_rotation_key(key: object, source: str) -> str:
    """The key as a string, or ConfigError naming ``source`` when it is missing or too short."""
    if not isinstance(key, str) or not key:
        raise ConfigError(
            f"federated.privacy is 'rotation' but no rotation key was found ({source}); give every client "
            f"the same secret key in node config {ROTATION_KEY_NODE!r} or environment variable {ROTATION_KEY_ENV}"
        )
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(f"the rotation key from {source} has {len(key)} characters; use at least {MIN_KEY_LENGTH} random ones")
    return key


def key_seed(key: str) -> int:
    """A 256-bit seed from the key (BLAKE2b with a fedpatch-specific personalisation)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=32, person=_KDF_PERSON).digest()
    return int.from_bytes(digest, "little")


def rotation_matrix(key: str, dim: int) -> np.ndarray:
    """The key's random orthogonal ``[dim, dim]`` matrix (float64), the same on every machine.

    QR of a seeded standard Gaussian matrix with the signs of R's diagonal moved into Q, which
    makes Q Haar-distributed (uniform over orthogonal matrices) and unique for the seed.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    rng = np.random.Generator(np.random.PCG64(key_seed(key)))
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    return q * signs


@dataclass
class Rotation:
    """Rotates rows with the key's orthogonal matrix (one matrix per feature width, cached)."""

    key: str
    _matrices: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def matrix(self, dim: int) -> np.ndarray:
        if dim not in self._matrices:
            self._matrices[dim] = rotation_matrix(self.key, dim)
        return self._matrices[dim]

    def rotate(self, rows: np.ndarray) -> np.ndarray:
        """``rows @ Q`` computed in float64, returned as float32."""
        rows = _rows(rows)
        return np.ascontiguousarray(rows.astype(np.float64) @ self.matrix(rows.shape[1]), dtype=np.float32)

    def unrotate(self, rows: np.ndarray) -> np.ndarray:
        """``rows @ Q.T``: the inverse of :meth:`rotate`."""
        rows = _rows(rows)
        return np.ascontiguousarray(rows.astype(np.float64) @ self.matrix(rows.shape[1]).T, dtype=np.float32)


def _rows(rows: np.ndarray) -> np.ndarray:
    array = np.asarray(rows)
    if array.ndim != 2 or array.dtype.kind != "f":
        raise ValueError(f"expected a 2-D float array [N, D], got {array.dtype} {array.shape}")
    return array


# --------------------------------------------------------------------------------------------
# Clipping + Gaussian noise
# --------------------------------------------------------------------------------------------
def clip_rows(rows: np.ndarray, clip_norm: float) -> np.ndarray:
    """Rows scaled down to L2 norm ``clip_norm`` where longer (float64)."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    rows = _rows(rows).astype(np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * np.minimum(1.0, clip_norm / np.maximum(norms, np.finfo(np.float64).tiny))


def _gaussian_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """The smallest delta of the Gaussian mechanism with noise ``sigma`` at ``epsilon``
    (Balle & Wang 2018, Theorem 8): Phi(D/2s - e s/D) - exp(e) Phi(-D/2s - e s/D)."""
    from scipy.special import log_ndtr

    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    return float(math.exp(log_ndtr(a - b)) - math.exp(epsilon + log_ndtr(-a - b)))


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest noise standard deviation for an (epsilon, delta)-DP Gaussian mechanism with the
    given L2 ``sensitivity`` (analytic calibration, bisection to 1e-10 relative)."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not sensitivity > 0:
        raise ValueError(f"sensitivity must be > 0, got {sensitivity}")
    lo, hi = 1e-6 * sensitivity, sensitivity
    while _gaussian_delta(hi, epsilon, sensitivity) > delta:
        hi *= 2.0
    while _gaussian_delta(lo, epsilon, sensitivity) <= delta and lo > 1e-300:
        lo /= 2.0
    while (hi - lo) > 1e-10 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if _gaussian_delta(mid, epsilon, sensitivity) <= delta else (mid, hi)
    return hi


def classic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """The textbook bound ``Delta * sqrt(2 ln(1.25/delta)) / epsilon`` (valid for epsilon < 1 only;
    shown for comparison, never used for calibration)."""
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def privatize_rows(
    rows: np.ndarray, clip_norm: float, epsilon: float, delta: float, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, float]:
    """Clip every row to ``clip_norm`` and add N(0, sigma^2) per coordinate; returns (float32
    rows, sigma). Sensitivity is 2 * clip_norm (one row replaced by another clipped row).

    ``rng`` None draws fresh OS entropy (what a client does: its noise must not be
    reproducible by anyone else); pass a seeded generator only for measurements.
    """
    sigma = gaussian_sigma(epsilon, delta, 2.0 * clip_norm)
    generator = rng if rng is not None else np.random.default_rng()
    clipped = clip_rows(rows, clip_norm)
    noisy = clipped + generator.standard_normal(clipped.shape) * sigma
    return np.ascontiguousarray(noisy, dtype=np.float32), sigma


# --------------------------------------------------------------------------------------------
# What a client applies
# --------------------------------------------------------------------------------------------
@dataclass
class BankPrivacy:
    """A client's transform of the banks it sends (``outgoing``) and receives (``incoming``).

    Build it with :meth:`from_settings`; ``mode`` "none" passes banks through unchanged.
    """

    mode: str = "none"
    rotation: Rotation | None = None
    clip_norm: float | None = None
    epsilon: float | None = None
    delta: float | None = None

    @classmethod
    def from_settings(
        cls,
        mode: str,
        dp_epsilon: float | None = None,
        dp_delta: float | None = None,
        clip_norm: float | None = None,
        node_config: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> BankPrivacy:
        """From the ``federated`` config values and, for rotation, the client-side key.

        The key comes from ``node_config["rotation-key"]``, else ``environ`` (default
        ``os.environ``) ``FEDPATCH_ROTATION_KEY``.
        """
        if mode == "none":
            return cls()
        if mode == "rotation":
            node = node_config or {}
            env = os.environ if environ is None else environ
            if node.get(ROTATION_KEY_NODE):
                key = check_rotation_key(node.get(ROTATION_KEY_NODE), f"node config {ROTATION_KEY_NODE!r}")
            else:
                key = check_rotation_key(env.get(ROTATION_KEY_ENV), f"environment variable {ROTATION_KEY_ENV}")
            return cls(mode, rotation=Rotation(key))
        if mode == "gaussian":
            if dp_epsilon is None or clip_norm is None or dp_delta is None:
                raise ConfigError("federated.privacy 'gaussian' needs federated.dp_epsilon, federated.dp_delta and federated.clip_norm")
            gaussian_sigma(dp_epsilon, dp_delta, 2.0 * clip_norm)  # checks the ranges once
            return cls(mode, clip_norm=clip_norm, epsilon=dp_epsilon, delta=dp_delta)
        raise ConfigError(f"federated.privacy must be one of {', '.join(PRIVACY_MODES)}, got {mode!r}")

    def outgoing(self, bank: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The bank as it leaves the client: rotated, clipped + noised, or unchanged."""
        if self.mode == "rotation":
            assert self.rotation is not None
            return self.rotation.rotate(bank)
        if self.mode == "gaussian":
            assert self.epsilon is not None and self.delta is not None and self.clip_norm is not None
            return privatize_rows(bank, self.clip_norm, self.epsilon, self.delta, rng)[0]
        return bank

    def incoming(self, bank: np.ndarray) -> np.ndarray:
        """A global bank as the client scores with it: un-rotated under rotation, else unchanged."""
        if self.mode == "rotation":
            assert self.rotation is not None
            return self.rotation.unrotate(bank)
        return bank
