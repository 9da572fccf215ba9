"""``blockmerge``: edgemerge's block-wise adaptive KV merging, offline, on a captured cache.

The rule is :mod:`edgemerge.merging.policy`, the one the runtime runs inside the cache
(:mod:`edgemerge.merging.planner`); its knobs are :class:`~edgemerge.settings.MergeSettings`.
This method only

1. computes the planning features from the snapshot exactly as the native features
   graph does (:func:`snapshot_features`: adjacent-key cosine, centred on the mean
   key of the cells when ``centre``; key and value norms; spans; ``log`` mass as bias),
2. asks :func:`edgemerge.merging.policy.plan` for a plan to ``budget`` cells, and
3. applies it with the reference merge (:func:`edgemerge.reference.merge.merge_kv`):
   keys by direction and magnitude (``magnitude``; SLERP for pairs), values by the
   weighted mean, as ``edgemerge.native.kvmerge.kv_merge`` does in the cache. Each merged
   cell sits at its pivot's position, spans its members and carries ``log`` of their
   mass as bias (``attention_bias``); evicted sets are dropped.

``MergeSettings.budget`` and ``slack`` do not apply here: ``compress`` is given the
budget, and the snapshot's last position ends the logical context.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edgemerge.merging import policy
from edgemerge.methods._build import identity, merged_cells, ranges_csr
from edgemerge.methods.base import CompressedKV, CompressionMethod, KVSnapshot
from edgemerge.reference.similarity import adjacent_similarity
from edgemerge.settings import MergeSettings, SettingsError


def snapshot_features(kv: KVSnapshot, *, centre: bool = True) -> policy.PlanningFeatures:
    """The planning features of a snapshot, as the native features graph computes them.

    The graph (native/src/llama-kv-merge.cpp) takes each layer's keys of the cells,
    subtracts their mean over those cells per head (``centre``), L2-normalises each
    key and dots it with the next one; the norms are of the uncentred rows. Here
    that is :func:`edgemerge.reference.similarity.adjacent_similarity` in float64
    (float32 on the device: they agree to about 1e-6).

    Returns:
        features of the snapshot's ``n_tok`` cells; ``n_logical`` is one past the last
        position any cell covers.
    """
    keys = kv.keys.astype(np.float64)
    values = kv.values.astype(np.float64)
    return policy.PlanningFeatures(
        k_sim=adjacent_similarity(kv.keys, centre=centre),
        k_norm=np.linalg.norm(keys, axis=3).astype(np.float32),
        v_norm=np.linalg.norm(values, axis=3).astype(np.float32),
        positions=kv.positions,
        spans=kv.spans,
        bias=np.log(kv.token_mass).astype(np.float32),
        n_logical=int(kv.spans[:, 1].max()) + 1,
    )


@dataclass(frozen=True)
class BlockMerge(CompressionMethod):
    """Block-wise adaptive merging of similar neighbouring cells (see the module doc).

    Attributes:
        settings: the policy's knobs (``budget`` and ``slack`` unused offline).
        layer_thresholds: calibrated threshold per snapshot layer, for
            ``settings.threshold == "calibrated"``.

    ``get_method("blockmerge", recent=64, centre=False)`` builds one from
    MergeSettings field names (see :meth:`from_options`).
    """

    name: ClassVar[str] = "blockmerge"
    settings: MergeSettings = MergeSettings()
    layer_thresholds: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.settings, MergeSettings):
            raise TypeError(f"settings must be a MergeSettings, not {type(self.settings)}")
        if self.layer_thresholds is not None:
            object.__setattr__(
                self, "layer_thresholds", tuple(float(t) for t in self.layer_thresholds)
            )

    @classmethod
    def option_names(cls) -> list[str]:
        """What :meth:`from_options` accepts."""
        return sorted({f.name for f in dataclasses.fields(MergeSettings)} | {"layer_thresholds"})

    @classmethod
    def from_options(
        cls, *, layer_thresholds: Sequence[float] | None = None, **options: object
    ) -> BlockMerge:
        """A BlockMerge from MergeSettings field names (``recent=64``, ``centre=False``),
        or ``settings=MergeSettings(...)`` itself.

        Raises:
            ValueError: a name that is neither a MergeSettings field nor
                ``layer_thresholds``, or a value out of range.
        """
        if "settings" in options:
            base = options.pop("settings")
            if not isinstance(base, MergeSettings):
                raise TypeError(f"settings must be a MergeSettings, not {type(base).__name__}")
        else:
            base = MergeSettings()
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ValueError(
                f"method 'blockmerge' has no setting(s) {', '.join(unknown)}; its settings: "
                f"settings, {', '.join(cls.option_names())}"
            )
        return cls(
            dataclasses.replace(base, **options),
            None if layer_thresholds is None else tuple(layer_thresholds),
        )

    def protected_cells(self, n_tok: int) -> int:
        return self.settings.protected()

    def _budget_hint(self) -> str:
        return f"sinks = {self.settings.sinks} + recent = {self.settings.recent}"

    def plan(self, kv: KVSnapshot, budget: int) -> policy.Plan:
        """The policy's plan for ``kv`` at ``budget`` cells (cell indices = token indices).

        Raises:
            SettingsError: the settings do not fit the snapshot (layers, thresholds).
        """
        thresholds = None
        if self.layer_thresholds is not None:
            thresholds = np.asarray(self.layer_thresholds, np.float32)
            if thresholds.shape != (kv.n_layer,):
                raise SettingsError(
                    f"layer_thresholds needs one value per snapshot layer ({kv.n_layer}), got "
                    f"{thresholds.size}"
                )
        feats = snapshot_features(kv, centre=self.settings.centre)
        return policy.plan(feats, self.settings, budget, layer_thresholds=thresholds)

    def compress(self, kv: KVSnapshot, budget: int) -> CompressedKV:
        """Merge (and, if it must, evict) until at most ``budget`` cells remain.

        Raises:
            ValueError: the budget is below the sinks plus the recent window, or a
                setting does not fit the snapshot (similarity_layers, layer_thresholds).
            BudgetError: merging alone cannot meet the budget and ``eviction="none"``.
        """
        budget = self.check_budget(kv, budget)
        s = self.settings
        if kv.n_tok <= budget:
            return identity(kv, bias=s.attention_bias, info={"threshold": math.inf})
        p = self.plan(kv, budget)
        kept = np.flatnonzero(p.keep)
        starts, ends = p.starts[kept], p.ends[kept]
        member_index, offsets = ranges_csr(starts, ends)
        sizes = ends - starts
        multi = sizes > 1
        pivots = starts.astype(np.int32)
        pivots[multi] = p.pivots
        # singletons are copied verbatim by merged_cells; their weight is 1
        weights = np.ones((kv.n_layer, kv.n_kv_head, member_index.size), np.float32)
        weights[:, :, np.repeat(multi, sizes)] = p.weights
        info = {
            "threshold": p.threshold,
            "met_by_merging": bool(p.keep.all()),
            "n_merged_sets": int(multi.sum()),
            "n_evicted_cells": len(p.evict_spans),
            "n_retained": int(p.retained.sum()),
        }
        return merged_cells(
            kv,
            member_index,
            offsets,
            pivots,
            weights,
            magnitude=s.magnitude,
            slerp_pairs=True,
            value_mode="mean",
            bias=s.attention_bias,
            info=info,
        )
