"""Block identity hashes and content signatures.

Prefix hash (identity, for reuse and sharing of sealed blocks), full blocks only::

    h_0 = blake2b(root || tokens(block 0)),  h_i = blake2b(h_{i-1} || tokens(block i))

with ``tokens(block)`` the block's token ids as little-endian int32 (llama_token)
and ``root`` an optional byte string that namespaces the chain (e.g. a model id);
a partial tail block has no hash. Equal hashes mean equal token prefixes.

SimHash signature (content, for finding similar blocks without comparing keys):
for block ``b`` (tokens ``b*B .. b*B+B-1``) and a layer group ``G``, the vector

    v = concat over layers l in G (in the given order), heads h:
            unit( mean_{t in block} (k[l, h, t] - mu[l, h]) )      (zeros if that mean is 0)

of length ``D = |G| * n_head * d`` is projected on ``n_bits`` fixed pseudo-random
+-1 directions; bit ``j`` of the signature is 1 iff ``sum_i r(j, i) v_i > 0``.
``r(j, i) = -1`` if the top bit of ``splitmix64(seed, j * D + i)`` is set, else +1, where::

    z = seed + (c + 1) * 0x9E3779B97F4A7C15            (all mod 2^64)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    splitmix64(seed, c) = z ^ (z >> 31)

(a counter-based generator any native port reproduces exactly). The Hamming
distance of two signatures estimates the angle between their vectors:
``E[hamming] = n_bits * angle / pi``. A projection within rounding of 0 may
flip between implementations that sum in another order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from edgemerge.reference._checks import float_array, layer_selection, positive_int

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def prefix_block_hashes(
    tokens: Sequence[int] | np.ndarray,
    block_size: int = 16,
    *,
    digest_size: int = 16,
    root: bytes = b"",
) -> list[bytes]:
    """Chained blake2b hashes of the full blocks of a token sequence.

    Args:
        tokens: token ids (0 <= id < 2^31).
        block_size: tokens per block.
        digest_size: 16 or 32 bytes.
        root: bytes prepended to the first block (namespace; default none).

    Returns:
        one digest per full block (``len(tokens) // block_size`` of them).

    Raises:
        ValueError: bad block or digest size, or a token id outside int32/negative.
    """
    b = positive_int(block_size, "block_size")
    if digest_size not in (16, 32):
        raise ValueError(f"digest_size must be 16 or 32 bytes, got {digest_size!r}")
    if not isinstance(root, (bytes, bytearray)):
        raise ValueError(f"root must be bytes, got {type(root).__name__}")
    ids = np.asarray(tokens)
    if ids.size == 0:
        return []
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"tokens must be a flat sequence of integer ids, got {ids.dtype} shape {ids.shape}"
        )
    if ids.min() < 0 or ids.max() > np.iinfo(np.int32).max:
        raise ValueError("token ids must lie in [0, 2^31)")
    raw = ids.astype("<i4")
    out: list[bytes] = []
    parent = bytes(root)
    for i in range(ids.size // b):
        h = hashlib.blake2b(parent, digest_size=digest_size)
        h.update(raw[i * b : (i + 1) * b].tobytes())
        parent = h.digest()
        out.append(parent)
    return out


def splitmix64(seed: int, counter: np.ndarray) -> np.ndarray:
    """The counter-based generator of the projection (see module doc), vectorised."""
    c = np.asarray(counter, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + (c + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def projection_signs(n_bits: int, dim: int, seed: int) -> np.ndarray:
    """The ``[n_bits, dim]`` +-1 projection (float64) of the SimHash."""
    counter = np.arange(n_bits * dim, dtype=np.uint64)
    top = splitmix64(seed, counter) >> np.uint64(63)
    return np.where(top == 1, -1.0, 1.0).reshape(n_bits, dim)


def block_directions(
    keys: np.ndarray,
    block_size: int,
    layers: Sequence[int],
    mean: np.ndarray | None = None,
) -> np.ndarray:
    """The SimHash input vectors ``v`` of every full block for one layer group.

    Returns:
        float64 ``[n_block, len(layers) * n_head * d]``.
    """
    k = float_array(keys, "keys", 4, dtype=np.float64)
    n_layer, n_head, n_tok, d = k.shape
    b = positive_int(block_size, "block_size")
    sel = layer_selection(layers, n_layer, "layer group")
    mu = k.mean(axis=2) if mean is None else float_array(mean, "mean", 3, dtype=np.float64)
    if mu.shape != (n_layer, n_head, d):
        raise ValueError(f"mean must have shape {(n_layer, n_head, d)}, got {mu.shape}")
    n_block = n_tok // b
    part = k[sel, :, : n_block * b].reshape(sel.size, n_head, n_block, b, d)
    c = part.mean(axis=3) - mu[sel][:, :, None, :]  # [g, h, block, d]
    norm = np.linalg.norm(c, axis=-1, keepdims=True)
    u = np.divide(c, norm, out=np.zeros_like(c), where=norm > 0)
    return u.transpose(2, 0, 1, 3).reshape(n_block, sel.size * n_head * d)


def simhash_signatures(
    keys: np.ndarray,
    block_size: int = 16,
    layer_groups: Sequence[Sequence[int]] | None = None,
    *,
    mean: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """64-bit SimHash of each full block's centred mean key direction, per layer group.

    Args:
        keys: float32 ``[n_layer, n_head, n_tok, d]``.
        block_size: tokens per block; the partial tail block gets no signature.
        layer_groups: lists of indices into axis 0; default one group, the latter
            half of the layers.
        mean: float32 ``[n_layer, n_head, d]`` centring vector (default: mean over tokens).
        seed: projection seed.

    Returns:
        uint64 ``[n_block, n_group]``; bit j (value ``1 << j``) is projection j's sign.
    """
    k = float_array(keys, "keys", 4)
    groups = [None] if layer_groups is None else list(layer_groups)
    if not groups:
        raise ValueError("layer_groups must hold at least one group")
    n_block = k.shape[2] // positive_int(block_size, "block_size")
    out = np.zeros((n_block, len(groups)), dtype=np.uint64)
    weights = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))
    for gi, group in enumerate(groups):
        sel = layer_selection(group, k.shape[0], "layer group")
        v = block_directions(k, block_size, sel.tolist(), mean)
        proj = v @ projection_signs(64, v.shape[1], seed).T  # [n_block, 64]
        bits = (proj > 0).astype(np.uint64)
        out[:, gi] = np.bitwise_or.reduce(bits * weights, axis=1) if n_block else 0
    return out


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Number of differing bits of uint64 signatures, elementwise (broadcasting).

    Returns:
        int32 array of the broadcast shape.
    """
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    flat = np.ascontiguousarray(x).reshape(-1)
    counts = _POPCOUNT8[flat.view(np.uint8)].reshape(flat.shape[0], 8)
    return counts.sum(axis=-1, dtype=np.int32).reshape(x.shape)
