"""Pure-numpy/numba reference implementations that the native paths are checked against.

Modules (import them directly; nothing is imported here, so loading one module
does not compile the others' numba kernels):

- :mod:`~edgemerge.reference.similarity`: centred adjacent-key cosine similarity, aggregation.
- :mod:`~edgemerge.reference.merging_sets`: KVMerger's merging sets, budget-driven threshold.
- :mod:`~edgemerge.reference.gaussian`: Gaussian-kernel merge weights and the sigma rule.
- :mod:`~edgemerge.reference.merge`: direction/magnitude merge (oracle of GGML_OP_MERGE_ROWS).
- :mod:`~edgemerge.reference.bias`: log-mass attention bias (proportional attention).
- :mod:`~edgemerge.reference.hashing`: prefix block hashes, SimHash signatures, Hamming distance.
- :mod:`~edgemerge.reference.error`: per-set and whole-cache error estimates.
- :mod:`~edgemerge.reference.attention`: plain softmax attention with GQA.
- :mod:`~edgemerge.reference.ggml_quants`: bit-exact ggml row encodings (f16, bf16, q8_0, q4_0).
- :mod:`~edgemerge.reference.rope`: llama.cpp's RoPE (norm/neox pairing, base, scale).

Conventions: float32 arrays in and out (float64 inside), shapes ``[n_layer, n_head, n_tok, d]``
for per-token K/V, groups of tokens as CSR (``member_index`` int32 ``[nnz]``, ``offsets``
int32 ``[n_group + 1]``), and ``ValueError`` naming the argument for any bad input (NaN/inf
included).
"""

from edgemerge._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(globals())
