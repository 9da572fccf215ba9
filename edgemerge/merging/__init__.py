"""The merge policy: which cells merge, when, and with what thresholds.

- :mod:`~edgemerge.merging.policy`: the one merge rule (features and settings in, a plan
  of sets, weights, biases and evictions out), run by both BlockMerges.
- :mod:`~edgemerge.merging.planner`: its online adapter on a live cache (features from
  :mod:`edgemerge.native.kvmerge`, cells from :mod:`edgemerge.native.kvcells`).
- :mod:`~edgemerge.merging.calibration`: per-layer thresholds measured on a text and
  stored in a copy of the GGUF (``edgemerge calibrate``).
- :mod:`~edgemerge.merging.gguf_meta`: a fast reader of a GGUF header (calibration
  metadata, tiny test models).

Its knobs are :class:`edgemerge.MergeSettings` (:mod:`edgemerge.settings`).
"""

from edgemerge._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(globals())
