"""``quant``: K and V rounded through a ggml cache type (q8_0, q4_0, ...), no cell reduction.

A reference point for what llama.cpp's quantized KV cache costs in accuracy:
every row of ``d`` values per layer, head and token is encoded and decoded
exactly as ggml does (:mod:`edgemerge.reference.ggml_quants`). The head size must
be a multiple of the type's block size (32 for q8_0 and q4_0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from edgemerge.methods._build import identity
from edgemerge.methods.base import CompressedKV, CompressionMethod, KVSnapshot
from edgemerge.reference.ggml_quants import dequantize_rows, ggml_type, quantize_rows


@dataclass(frozen=True)
class KVQuant(CompressionMethod):
    """Round-trip keys and values through ggml row types.

    Attributes:
        key_type: ggml type of K (``"f32"``, ``"f16"``, ``"bf16"``, ``"q8_0"``, ``"q4_0"``).
        value_type: ggml type of V; None: the same as ``key_type``.
    """

    name: ClassVar[str] = "quant"
    reduces_cells: ClassVar[bool] = False
    key_type: str = "q8_0"
    value_type: str | None = None

    def __post_init__(self) -> None:
        ggml_type(self.key_type)
        if self.value_type is not None:
            ggml_type(self.value_type)

    def compress(self, kv: KVSnapshot, budget: int) -> CompressedKV:
        """Every cell kept, K and V replaced by their decoded ggml encodings.

        Raises:
            ValueError: ``budget < kv.n_tok``, or a head size that is not a multiple of
                the type's block size.
        """
        self.check_budget(kv, budget)
        vtype = self.value_type or self.key_type
        d_k, d_v = kv.keys.shape[3], kv.values.shape[3]
        keys = dequantize_rows(quantize_rows(kv.keys, self.key_type), self.key_type, d_k)
        values = dequantize_rows(quantize_rows(kv.values, vtype), vtype, d_v)
        base = identity(kv, info={"key_type": self.key_type, "value_type": vtype})
        return CompressedKV(
            keys=keys,
            values=values,
            positions=base.positions,
            span=base.span,
            bias=base.bias,
            mass=base.mass,
            member_offsets=base.member_offsets,
            member_index=base.member_index,
            n_source=base.n_source,
            error=None,
            info=base.info,
        )
