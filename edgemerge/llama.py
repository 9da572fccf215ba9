"""`edgemerge.Llama`: llama-cpp-python's `Llama` with a KV cache that stays in budget.

With ``merge=None`` it is ``llama_cpp.Llama`` unchanged (running on edgemerge's
patched library). With ``merge=MergeSettings(...)``:

- the physical cache is ``n_ctx`` cells, and the *logical* context (token
  positions, ``input_ids``) may grow up to ``n_ctx_logical`` (default: the
  model's trained context);
- before every chunk of evaluation (prefill is chunked by ``n_batch``, decode is
  one token at a time), if the sequence would pass its budget plus ``slack``,
  the planner (:mod:`edgemerge.merging.planner`) merges cells inside the cache
  (:mod:`edgemerge.native.kvmerge`) until the chunk fits in the budget, evicting only
  when merging cannot;
- prefix reuse across calls respects merged spans: when a call rewinds to a
  position inside a merged cell's span, the rewind moves back to the span's start
  and the tokens after it are evaluated again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from edgemerge.merging.planner import BlockMergePlanner, MergePlan
from edgemerge.models import cache_dir, resolve_model
from edgemerge.native import _llamalog, kvcells, kvmerge
from edgemerge.recall import RecallEngine, StoreSnapshot
from edgemerge.reference.ggml_quants import row_bytes
from edgemerge.settings import CALIBRATED, MergeSettings, SettingsError


@dataclass(frozen=True)
class MergeStats:
    """Counters of one ``edgemerge.Llama`` since it was created.

    Attributes:
        cells: cells the sequence occupies now.
        logical_tokens: tokens of the sequence (positions), merged or not.
        merges: merge sets applied (each turns several cells into one).
        cells_merged: cells freed by merging.
        cells_evicted: cells freed by the eviction fallback.
        compressions: times the budget was enforced.
        bytes_per_cell: KV bytes of one cell of the mergeable cache (all layers, K and V).
        kv_bytes: KV bytes the sequence's cells occupy now.
        bytes_saved: KV bytes the logical tokens would need beyond ``kv_bytes``.
        mean_merge_error: mean estimated relative key error of the merge sets applied.
        merge_time_s: seconds spent planning and merging.
        eval_time_s: seconds spent evaluating tokens (prefill and decode).
        store_positions: positions whose original K/V the recall store holds.
        store_ram_bytes, store_disk_bytes: the store's bytes in RAM and in its spill file.
        recall_turns: times recall ran (prompts, and replies' recalls); recall_hits: those
            that brought blocks back.
        reply_recalls: recalls inside replies (``MergeSettings.recall_every``).
        blocks_restored: blocks brought back in all.
        recall_time_s: seconds spent storing, scoring and restoring (incl. re-evaluation).
        tokens_reevaluated: tokens evaluated a second time after a restore.
    """

    cells: int
    logical_tokens: int
    merges: int
    cells_merged: int
    cells_evicted: int
    compressions: int
    bytes_per_cell: int
    kv_bytes: int
    bytes_saved: int
    mean_merge_error: float
    merge_time_s: float
    eval_time_s: float
    store_positions: int = 0
    store_ram_bytes: int = 0
    store_disk_bytes: int = 0
    recall_turns: int = 0
    recall_hits: int = 0
    blocks_restored: int = 0
    recall_time_s: float = 0.0
    tokens_reevaluated: int = 0
    reply_recalls: int = 0


_llamalog.install()  # llama-cpp-python's own log filter mixes up ggml's levels


class GenerationStopped(Exception):
    """Raised by ``Llama.eval`` in place of an evaluation that ``Llama.stop_when`` stopped."""


class Llama(llama_cpp.Llama):
    """A drop-in ``llama_cpp.Llama`` whose cache can stay inside a budget.

    Args:
        model: registry name (``"qwen2.5-coder-0.5b"``) or a GGUF path. ``model_path=``
            works too, as in ``llama_cpp.Llama``.
        merge: the merge policy, or None for plain llama-cpp-python behaviour.
        n_ctx_logical: the longest logical context when merging (default: the model's
            trained context).
        **kwargs: everything ``llama_cpp.Llama`` takes (``n_ctx`` is the physical cache).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        merge: MergeSettings | None = None,
        n_ctx_logical: int | None = None,
        **kwargs: Any,
    ) -> None:
        model_path = kwargs.pop("model_path", None)
        if (model is None) == (model_path is None):
            raise TypeError("pass the model once: Llama(model) or Llama(model_path=...)")
        path = resolve_model(model if model is not None else model_path)
        if merge is not None and not isinstance(merge, MergeSettings):
            raise TypeError(f"merge must be a MergeSettings or None, not {type(merge).__name__}")
        if merge is not None and kwargs.get("logits_all"):
            raise SettingsError(
                "logits_all=True keeps logits for every logical token, which merging lets grow "
                "past the cache; use merge=None for logprobs over the whole prompt"
            )
        super().__init__(model_path=str(path), **kwargs)
        self.merge_settings = merge
        self._planner: BlockMergePlanner | None = None
        self._recall: RecallEngine | None = None
        if merge is None:
            return

        self._shape = kvmerge.kv_shape(self)
        physical = self.n_ctx()
        logical = (
            n_ctx_logical if n_ctx_logical is not None else max(self._model.n_ctx_train(), physical)
        )
        if logical < physical:
            raise SettingsError(
                f"n_ctx_logical={logical} is below the physical cache n_ctx={physical}"
            )
        self._check_fits(merge)
        thresholds = None
        if merge.threshold == CALIBRATED:
            thresholds = self._calibrated_thresholds(path)
        self._planner = BlockMergePlanner(merge, self._shape, thresholds)
        self._n_ctx = logical
        self.input_ids = np.ndarray((logical,), dtype=np.intc)
        self._cells = 0
        self._cache_end = 0
        self._merges = self._merged = self._evicted = self._compressions = 0
        self._err_sum = 0.0
        self._merge_time = self._eval_time = 0.0
        self._merged_upto = 0  # every merged span ends before this position
        self._replay_from = 1 << 62
        self._seq_rm = self._ctx.kv_cache_seq_rm
        self._ctx.kv_cache_seq_rm = self._span_aware_seq_rm
        ctx_params = self.context_params
        self._bytes_per_cell = self._shape.n_layer * (
            row_bytes(int(ctx_params.type_k), self._shape.n_head_kv * self._shape.head_dim_k)
            + row_bytes(int(ctx_params.type_v), self._shape.n_head_kv * self._shape.head_dim_v)
        )
        self._recall_time = 0.0
        self._reevaluated = 0
        self._reply_recalls = 0
        self._decoded_since_recall = 0  # decoded tokens of the reply since its last recall
        self._set_recall(merge)

    def _set_recall(self, merge: MergeSettings) -> None:
        """Start or stop the recall engine to match ``merge.recall``."""
        if merge.recall and self._recall is None:
            self._recall = RecallEngine(
                self._ctx.ctx,
                self._model.model,
                merge,
                tuple(self._shape.layer_ids),
                cache_dir() / "store",
                cache_types=(int(self.context_params.type_k), int(self.context_params.type_v)),
                row_widths=(
                    self._shape.n_head_kv * self._shape.head_dim_k,
                    self._shape.n_head_kv * self._shape.head_dim_v,
                ),
            )
        elif merge.recall:
            self._recall.settings = merge
        elif self._recall is not None:
            self._recall.close()
            self._recall = None

    def _check_fits(self, merge: MergeSettings) -> None:
        """The budget must fit the physical cache and leave room for a batch and the
        protected cells."""
        physical = self.n_ctx()
        if isinstance(merge.budget, int) and merge.budget > physical:
            raise SettingsError(
                f"budget: {merge.budget} cells do not fit the physical cache n_ctx={physical}; "
                "lower the budget or raise n_ctx"
            )
        room = (merge.budget if isinstance(merge.budget, int) else physical) - self.n_batch
        if room < merge.protected() + 2:
            raise SettingsError(
                f"budget: {merge.budget} leaves {room} cells once a batch of "
                f"n_batch={self.n_batch} arrives, fewer than sinks + recent = "
                f"{merge.protected()} + 2; raise the budget "
                "or n_ctx, or lower n_batch, sinks or recent"
            )

    def set_merge_settings(self, merge: MergeSettings) -> None:
        """Change the policy of a merging Llama (e.g. a new budget); applies from the next
        evaluation. Turning merging on or off needs a new Llama."""
        if self._planner is None:
            raise SettingsError("merging is off for this Llama; build one with merge=...")
        self._check_fits(merge)
        planner = BlockMergePlanner(merge, self._shape, self._planner.layer_thresholds)
        self._set_recall(merge)  # may refuse (store_type); nothing has changed yet then
        self._planner = planner
        self.merge_settings = merge

    def _calibrated_thresholds(self, path: Path) -> np.ndarray:
        from edgemerge.merging.calibration import read_calibration

        cal = read_calibration(path)
        if cal is None:
            raise SettingsError(
                f"threshold: 'calibrated' but {path} carries no edgemerge calibration; run "
                "`edgemerge calibrate` on it, or give a numeric threshold"
            )
        if cal.settings.centre != self.merge_settings.centre:
            raise SettingsError(
                f"threshold: {path} was calibrated with centre={cal.settings.centre}, these "
                f"settings say centre={self.merge_settings.centre}; use the same, or calibrate "
                "again with `edgemerge calibrate --centre/--no-centre`"
            )
        layers = np.asarray(self._shape.layer_ids)
        return np.asarray(cal.thresholds, np.float32)[layers]

    # -- evaluation ----------------------------------------------------------------------

    def eval(self, tokens: Any) -> None:
        self._stop_if_asked()
        if self._planner is None:
            super().eval(tokens)
            return
        t0 = time.perf_counter()
        if self.n_tokens != self._cache_end:
            # a rewind (prefix reuse, regenerate, reset): cut there, then recount; a reply's
            # count of decoded tokens starts again from here
            self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)
            self._replay_evicted_tail()
            self._decoded_since_recall = 0
            if self._recall is not None and self._recall.capture.armed:
                self._recall.capture.disarm()
        tokens = self._replay_cut_spans(list(tokens))
        if self.n_tokens != self._cache_end:
            self._cells = len(kvcells.list_cells(self)) if self.n_tokens else 0
        # a prompt (not one decoded token) ends with recall: capture its last queries
        recall = self._recall is not None and len(tokens) > 1
        window = self.merge_settings.recall_window
        every = self.merge_settings.recall_every
        # in a reply, every `every` decoded tokens recall too: capture the last `window`
        # of them, the capture staying armed from one decode to the next
        in_reply = self._recall is not None and every > 0 and len(tokens) == 1
        if not in_reply:
            self._decoded_since_recall = 0
        keep_armed = False
        try:
            for i in range(0, len(tokens), self.n_batch):
                batch = tokens[i : i + self.n_batch]
                if self.n_tokens + len(batch) > self._n_ctx:
                    raise ValueError(
                        f"the logical context is full: {self.n_tokens + len(batch)} tokens "
                        f"exceed n_ctx_logical={self._n_ctx}"
                    )
                self._make_room(len(batch))
                arm = (recall and i + len(batch) > len(tokens) - window) or (
                    in_reply and self._decoded_since_recall >= every - window
                )
                if arm and not self._recall.capture.armed:
                    self._recall.capture.arm()
                super().eval(batch)
                self._cells += len(batch)
            keep_armed = in_reply
        finally:
            if self._recall is not None and self._recall.capture.armed and not keep_armed:
                self._recall.capture.disarm()
        if in_reply:
            self._decoded_since_recall += 1
            if self._decoded_since_recall >= every:
                self._recall.capture.disarm()
                self._decoded_since_recall = 0
                self._reply_recalls += 1
                self._recall_turn()
        if recall:
            self._recall_turn()
        self._cache_end = self.n_tokens
        self._eval_time += time.perf_counter() - t0

    def _recall_turn(self) -> None:
        """Bring back the stored blocks the captured queries attend to (a prompt's last
        ones, or a reply's last decoded ones), then evaluate the last ``recall_reeval``
        tokens again so that what follows sees them."""
        t0 = time.perf_counter()
        s = self.merge_settings
        budget = min(s.budget_cells(self.n_tokens), self.n_ctx())
        result = self._recall.recall(self.input_ids, self.n_tokens, budget)
        if result.blocks:
            self._cells = len(kvcells.list_cells(self))
            # the cut at n_tokens - r needs the exact cell just before it: only the last
            # `recent` positions are sure to be one (a restore may evict the cell before)
            r = min(s.recall_reeval, max(s.recent - 1, 0), self.n_tokens - 1)
            if r > 0:
                p0 = self.n_tokens - r
                again = [int(t) for t in self.input_ids[p0 : self.n_tokens]]
                self._seq_rm(-1, p0, -1)
                self.n_tokens = p0
                for i in range(0, r, self.n_batch):
                    super().eval(again[i : i + self.n_batch])
                self._reevaluated += r
        self._recall_time += time.perf_counter() - t0

    def _span_aware_seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        """llama-cpp-python's tail cut, remembering where a cut merged cell began.

        Cutting at ``p0`` removes every cell whose span reaches ``p0`` (patch 0003), so a
        merged cell straddling the cut takes positions before ``p0`` with it; the next
        :meth:`eval` evaluates those again.
        """
        if self._recall is not None and (p1 is None or p1 < 0):
            self._recall.forget_from(max(0, p0))
        if p0 < self._merged_upto and (p1 is None or p1 < 0):
            cells = kvcells.list_cells(self)
            straddle = (cells.span_min < p0) & (cells.span_max >= p0)
            if straddle.any():
                self._replay_from = min(self._replay_from, int(cells.span_min[straddle].min()))
        return self._seq_rm(seq_id, p0, p1)

    def _replay_evicted_tail(self) -> None:
        """After a cut at ``n_tokens`` the cells must reach position ``n_tokens - 1`` for
        the sequence to go on (llama.cpp refuses a batch that skips positions). A rewind
        into a stretch that was evicted (or merged and cut) leaves them short: the
        positions from the last kept cell up to the cut are evaluated again."""
        if self.n_tokens == 0:
            return
        cells = kvcells.list_cells(self)
        reach = int(cells.span_max.max()) + 1 if len(cells) else 0
        if reach < self.n_tokens:
            self._replay_from = min(self._replay_from, reach)

    def _replay_cut_spans(self, tokens: list[int]) -> list[int]:
        start = self._replay_from
        self._replay_from = 1 << 62
        if start >= self.n_tokens:
            return tokens
        replay = [int(t) for t in self.input_ids[start : self.n_tokens]]
        self._ctx.kv_cache_seq_rm(-1, start, -1)
        self.n_tokens = start
        return replay + tokens

    def _make_room(self, incoming: int) -> None:
        s = self.merge_settings
        physical = self.n_ctx()
        budget = min(s.budget_cells(self.n_tokens + incoming), physical)
        if self._cells + incoming <= min(budget + s.slack, physical):
            return
        target = budget - incoming
        if target < 1 or self._cells < 2:
            raise SettingsError(
                f"budget: {budget} cells cannot take a chunk of {incoming} tokens; raise the "
                "budget or lower n_batch"
            )
        self._compress(target)

    def _compress(self, target: int) -> None:
        t0 = time.perf_counter()
        cells = kvcells.list_cells(self)
        feats = self._planner.features(self, cells)
        plan = self._planner.plan(cells, feats, self.n_tokens, target)
        s = self.merge_settings
        if self._recall is not None:
            t1 = time.perf_counter()
            self._recall.save_originals(_leaving_exact(cells, plan), self.input_ids)
            self._recall_time += time.perf_counter() - t1
        if plan.groups.n_group:
            kvmerge.kv_merge(self, plan.groups, magnitude=s.magnitude)
        mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        for lo, hi in plan.evict_spans.tolist():
            llama_cpp.llama_memory_seq_rm(mem, 0, lo, hi + 1)
        n_freed = int(plan.groups.offsets[-1]) - plan.groups.n_group if plan.groups.n_group else 0
        if plan.groups.n_group:
            self._merged_upto = max(self._merged_upto, int(plan.groups.span[:, 1].max()) + 1)
        self._merges += plan.groups.n_group
        self._merged += n_freed
        self._evicted += len(plan.evict_spans)
        self._err_sum += float(plan.errors.sum())
        self._compressions += 1
        self._cells = len(kvcells.list_cells(self))
        self._merge_time += time.perf_counter() - t0

    # -- reporting and state -------------------------------------------------------------

    def merge_stats(self) -> MergeStats:
        """Counters of merging so far (see :class:`MergeStats`)."""
        if self._planner is None:
            raise SettingsError("merge_stats() needs merging on: pass merge=MergeSettings(...)")
        cells = len(kvcells.list_cells(self)) if self.n_tokens else 0
        kv = cells * self._bytes_per_cell
        store = self._recall.store.stats() if self._recall is not None else None
        recall = {}
        if store is not None:
            recall = dict(
                store_positions=store.positions,
                store_ram_bytes=store.ram_bytes,
                store_disk_bytes=store.disk_bytes,
                recall_turns=self._recall.turns,
                recall_hits=self._recall.hits,
                blocks_restored=self._recall.blocks_restored,
                recall_time_s=self._recall_time,
                tokens_reevaluated=self._reevaluated,
                reply_recalls=self._reply_recalls,
            )
        return MergeStats(
            cells=cells,
            logical_tokens=self.n_tokens,
            merges=self._merges,
            cells_merged=self._merged,
            cells_evicted=self._evicted,
            compressions=self._compressions,
            bytes_per_cell=self._bytes_per_cell,
            kv_bytes=kv,
            bytes_saved=max(0, self.n_tokens * self._bytes_per_cell - kv),
            mean_merge_error=self._err_sum / self._merges if self._merges else 0.0,
            merge_time_s=self._merge_time,
            eval_time_s=self._eval_time,
            **recall,
        )

    def close(self) -> None:
        # __init__ may stop (bad settings, missing model) before llama_cpp.Llama set it up
        recall = getattr(self, "_recall", None)
        if recall is not None:
            recall.close()  # its query capture must go before the context
            self._recall = None
        if hasattr(self, "_stack"):
            super().close()

    def reset(self) -> None:
        super().reset()
        if self._planner is not None:
            self._cache_end = 0
            self._cells = 0
            if self._recall is not None:
                self._recall.store.clear()

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        if self._planner is not None and len(state.input_ids) != len(self.input_ids):
            raise ValueError(
                f"this state holds {len(state.input_ids)} logical positions; this Llama has "
                f"{len(self.input_ids)} (n_ctx_logical): load it into a Llama built the same way"
            )
        super().load_state(state)
        if self._recall is not None:
            # the store described the old cache; a loaded one may have another history
            self._recall.store.clear()
        self.resync_cache()  # the restored cache may hold merged cells
        if self._planner is not None:
            # a state cut inside an evicted stretch ends short of n_tokens: evaluate the rest
            self._replay_evicted_tail()

    def recall_store(self) -> StoreSnapshot | None:
        """What the recall store holds (the originals of cells that left the cache), to
        save beside :meth:`save_state`; None when recall is off. A state loaded without
        it can no longer recall what had left its cache before it was saved."""
        return self._recall.store.snapshot() if self._recall is not None else None

    def load_recall_store(self, snap: StoreSnapshot) -> int:
        """Give a state loaded with :meth:`load_state` the store saved with it (from
        :meth:`recall_store`). Keeps the positions that still fit the sequence (same
        token, not an exact cell now); returns how many. Raises :class:`SettingsError`
        without recall, and ``StoreFileError`` when the rows cannot be this cache's
        (another model, cache type or block size); the store is then empty."""
        if self._recall is None:
            raise SettingsError("load_recall_store() needs recall on: MergeSettings(recall=True)")
        try:
            return self._recall.load_store(snap, np.asarray(self.input_ids), self.n_tokens)
        except Exception:
            self._recall.store.clear()
            raise

    # -- public seams (chat, evaluation) -------------------------------------------------

    @property
    def model_handle(self) -> llama_cpp.llama_model_p:
        """The ``llama_model *`` this Llama runs, for llama.cpp calls and
        :mod:`edgemerge.native.capture` (a borrowed pointer: valid until :meth:`close`)."""
        return self._model.model

    @property
    def context_handle(self) -> llama_cpp.llama_context_p:
        """The ``llama_context *`` holding this Llama's cache (borrowed, as
        :attr:`model_handle`). Edits to the cache through it call for
        :meth:`resync_cache` afterwards."""
        return self._ctx.ctx

    def check_settings(self, merge: MergeSettings) -> None:
        """Check that ``merge`` fits this Llama's physical cache and batch.

        Raises:
            SettingsError: the budget exceeds ``n_ctx``, or leaves too few cells for a
                batch of ``n_batch`` tokens plus the sink and recent cells.
        """
        self._check_fits(merge)

    def resync_cache(self) -> None:
        """Make the merge bookkeeping agree with the cache again.

        Cells past ``n_tokens`` are cut, then the cell count and the end of the merged
        spans are read from the cache. Call it after anything that changed the cache
        behind this Llama: a state load (:meth:`load_state` does), direct edits through
        :attr:`context_handle`, or an exception (KeyboardInterrupt) that stopped
        :meth:`eval` between a merge and its bookkeeping. No-op when merging is off.
        """
        if self._planner is None:
            return
        self._seq_rm(-1, self.n_tokens, -1)
        self._replay_from = 1 << 62
        self._cache_end = self.n_tokens
        if not self.n_tokens:
            self._cells = self._merged_upto = 0
            return
        cells = kvcells.list_cells(self)
        self._cells = len(cells)
        wide = cells.span_max > cells.span_min
        self._merged_upto = int(cells.span_max[wide].max()) + 1 if wide.any() else 0

    @contextmanager
    def stop_when(self, should_stop: Callable[[], bool]) -> Iterator[None]:
        """While active, every :meth:`eval` first asks ``should_stop()`` and, once it says
        so, raises :class:`GenerationStopped` instead of evaluating.

        llama-cpp-python evaluates each sampled token before sampling the next, so this
        ends a generation (``create_completion``, ``create_chat_completion``, streaming
        or not) within one token, and only between evaluations: the cache and
        ``n_tokens`` agree when it is raised.
        """
        previous = getattr(self, "_should_stop", None)
        self._should_stop = should_stop
        try:
            yield
        finally:
            self._should_stop = previous

    def _stop_if_asked(self) -> None:
        check = getattr(self, "_should_stop", None)
        if check is not None and check():
            raise GenerationStopped


def _leaving_exact(cells: kvcells.KVCells, plan: MergePlan) -> np.ndarray:
    """Positions of the exact cells that ``plan`` merges or evicts (their originals go to
    the recall store first; merged cells' members are stored already)."""
    leaving = (
        np.isin(cells.cell, plan.groups.src) if plan.groups.n_group else np.zeros(len(cells), bool)
    )
    for lo, hi in plan.evict_spans.tolist():
        leaving |= (cells.span_min >= lo) & (cells.span_max <= hi)
    return cells.pos[leaving & (cells.span_min == cells.span_max)]
