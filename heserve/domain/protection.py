"""Protecting the catalog from what clients decrypt: noise flooding and score noise.

A client decrypts W·u for vectors u of its choice; enough queries reveal W. Two
opt-in defences, applied to every output ciphertext before it leaves the server:

- Noise flooding: CKKS ciphertext noise after scoring depends on W (it is
  Σ D ⊙ e over the catalog's diagonals), so a decrypted result can leak W beyond
  the scores themselves. Flooding adds fresh complex Gaussian noise to every slot,
  2^flood_bits times the preset's measured noise, so that the noise a client sees
  is (statistically, up to 2^-flood_bits) independent of W. Full statistical
  security (40+ bits) would cost 40 bits of precision, more than the parameters
  hold; each flooding bit costs one bit of score precision (bench.precision
  measures the recall cost).
- Score noise: real Gaussian noise of a chosen standard deviation on each score,
  the Gaussian mechanism of differential privacy: with per-row sensitivity
  ||u|| <= 1, std σ gives (ε, δ)-DP per released score for
  σ >= sqrt(2 ln(1.25/δ)) / ε. Combined with a per-token query budget it bounds
  what a client can reconstruct of W.

The noise is drawn from the operating system's CSPRNG. Adding a plaintext does not
change the ciphertext's level or scale, so clients decode as before.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import tenseal.sealapi as seal

from heserve.protocol.params import CkksParameters

# Typical std of one score's CKKS noise per preset (slot units), measured with
# bench.precision on unit-norm rows and queries (mean absolute error × 1.25).
MEASURED_NOISE_STD = {"precise": 2.5e-8, "fast": 5e-5, "compact": 1.5e-4}


@dataclass(frozen=True)
class ScoreProtection:
    """Opt-in noise on encrypted scores; all zero means off."""

    flood_bits: int = 0
    score_noise_std: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.flood_bits <= 40:
            raise ValueError("flood_bits must be between 0 and 40")
        if not (self.score_noise_std >= 0 and math.isfinite(self.score_noise_std)):
            raise ValueError("score_noise_std must be a finite number >= 0")

    @property
    def enabled(self) -> bool:
        return self.flood_bits > 0 or self.score_noise_std > 0


def _gaussian(count: int) -> npt.NDArray[np.float64]:
    """Standard normal samples from os.urandom (Box-Muller on 53-bit uniforms)."""
    raw = np.frombuffer(os.urandom(16 * count), dtype=np.uint64) >> np.uint64(11)
    uniform = (raw.astype(np.float64) + 0.5) / float(1 << 53)
    first, second = uniform[:count], uniform[count:]
    normal: npt.NDArray[np.float64] = np.sqrt(-2.0 * np.log(first)) * np.cos(2 * np.pi * second)
    return normal


class NoiseAdder:
    """Adds the configured noise to score ciphertexts."""

    def __init__(self, params: CkksParameters, preset: str, protection: ScoreProtection) -> None:
        self.protection = protection
        context = params.seal_context()
        self._encoder = seal.CKKSEncoder(context)
        self._evaluator = seal.Evaluator(context)
        self._slots = params.slot_count
        base = MEASURED_NOISE_STD.get(preset, max(MEASURED_NOISE_STD.values()))
        self.flood_std = base * 2.0**protection.flood_bits if protection.flood_bits else 0.0

    def add_to(self, ciphertext: seal.Ciphertext) -> None:
        """Add fresh noise to a score ciphertext in place; nothing when protection is off.

        Score noise goes on both the real and the imaginary parts of every slot (the
        two halves of a chunk's scores); flooding noise too, with std `flood_std` on
        each part: every score gets 2^flood_bits times the preset's noise.
        """
        if not self.protection.enabled:
            return
        count = self._slots
        normal = _gaussian(2 * count)
        noise = self.protection.score_noise_std * (normal[:count] + 1j * normal[count:])
        if self.flood_std:
            flood = _gaussian(2 * count) * self.flood_std
            noise += flood[:count] + 1j * flood[count:]
        plaintext = seal.Plaintext()
        self._encoder.encode(noise.tolist(), ciphertext.parms_id(), ciphertext.scale, plaintext)
        self._evaluator.add_plain_inplace(ciphertext, plaintext)
