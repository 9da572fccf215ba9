"""Rotary position embedding (RoPE) as llama.cpp applies it, for methods that move queries.

Cached keys and captured queries are post-RoPE: a vector at position ``p`` is
``R(p) x`` for its position-free ``x``. ``R(p)`` turns each pair of dimensions
``(a_k, b_k)`` by the angle ``p * theta_k`` with
``theta_k = freq_scale * freq_base ** (-2k / n_rot)`` for ``k < n_rot / 2``
(ggml's ``rope_yarn`` with ``ext_factor = 0``)::

    x'[a_k] = cos * x[a_k] - sin * x[b_k]
    x'[b_k] = sin * x[a_k] + cos * x[b_k]

The pairing is the style: ``"norm"`` (llama) pairs ``(2k, 2k + 1)``, ``"neox"``
(qwen2, gemma3) pairs ``(k, k + n_rot / 2)``. Dimensions from ``n_rot`` on are not
rotated. YaRN, LongRoPE, M-RoPE and per-frequency factor tensors are not described
here (:func:`edgemerge.native.capture.model_layout` gives no :class:`Rope` for them).

Every dimension ``i`` then has a frequency ``phi[i]`` (0 when unrotated), a partner
``partner[i]`` (itself when unrotated) and a sign (``-1`` for ``a_k``, ``+1`` for
``b_k``, 0 unrotated), and ``(R(p) x)[i] = cos(p phi_i) x[i] + sign_i sin(p phi_i)
x[partner_i]``; :func:`rope_tables` returns them, :func:`rotate` applies ``R(p)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

RopeStyle = Literal["norm", "neox"]


@dataclass(frozen=True)
class Rope:
    """The rotation a model's attention layers apply to queries and keys.

    Attributes:
        style: ``"norm"`` (adjacent pairs) or ``"neox"`` (halves).
        n_rot: rotated dimensions (even, at most the head size).
        freq_base: the base of the frequencies (``rope_theta``).
        freq_scale: linear position scaling (1.0 without scaling).
    """

    style: RopeStyle
    n_rot: int
    freq_base: float = 10_000.0
    freq_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.style not in ("norm", "neox"):
            raise ValueError(f"Rope.style must be 'norm' or 'neox', got {self.style!r}")
        if isinstance(self.n_rot, bool) or not isinstance(self.n_rot, (int, np.integer)):
            raise ValueError(f"Rope.n_rot must be an integer, got {self.n_rot!r}")
        if self.n_rot < 2 or self.n_rot % 2:
            raise ValueError(f"Rope.n_rot must be even and >= 2, got {self.n_rot}")
        object.__setattr__(self, "n_rot", int(self.n_rot))
        for name in ("freq_base", "freq_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise ValueError(f"Rope.{name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"Rope.{name} must be positive and finite, got {value!r}")
            object.__setattr__(self, name, float(value))


def rope_tables(rope: Rope, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-dimension ``(phi, partner, sign)`` of ``rope`` on vectors of ``d`` dimensions.

    Returns:
        float64 ``[d]`` angle per position, int64 ``[d]`` partner dimension, float64
        ``[d]`` sign (see the module docstring).

    Raises:
        ValueError: ``rope.n_rot > d``.
    """
    if rope.n_rot > d:
        raise ValueError(f"Rope.n_rot = {rope.n_rot} exceeds the head size {d}")
    half = rope.n_rot // 2
    k = np.arange(half)
    theta = rope.freq_scale * rope.freq_base ** (-2.0 * k / rope.n_rot)
    if rope.style == "norm":
        a, b = 2 * k, 2 * k + 1
    else:
        a, b = k, k + half
    phi = np.zeros(d)
    partner = np.arange(d)
    sign = np.zeros(d)
    phi[a] = phi[b] = theta
    partner[a], partner[b] = b, a
    sign[a], sign[b] = -1.0, 1.0
    return phi, partner, sign


def rotate(x: np.ndarray, positions: np.ndarray, rope: Rope) -> np.ndarray:
    """``R(p) x`` for vectors ``x`` ``[..., n, d]`` at ``positions`` ``[n]`` (float64).

    A negative position undoes a rotation: ``R(-p) = R(p)^T``.
    """
    x = np.asarray(x, dtype=np.float64)
    phi, partner, sign = rope_tables(rope, x.shape[-1])
    angle = np.asarray(positions, dtype=np.float64)[:, None] * phi[None, :]  # [n, d]
    return np.cos(angle) * x + sign * np.sin(angle) * x[..., partner]
