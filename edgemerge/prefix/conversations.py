"""One bounded cache per conversation, for a server that many clients talk to.

An OpenAI-style client resends the whole history with every request. The server
keeps one llama.cpp context and, beside it, the saved state of each conversation:
:class:`ConversationCache` is a :class:`~edgemerge.prefix.blockcache.BlockCache` (so
``Llama._create_completion`` drives it unchanged: it asks ``cache[prompt]`` before
evaluating and stores ``cache[prompt + completion]`` after) that keeps **one entry per
conversation**:

- Lookup walks the prompt's block hashes from the longest prefix down, so a request
  restores the conversation that shares the most leading blocks with it (the block
  table's prefix hashes; see ``docs/blockcache.md``). Only the tail past the last
  shared block is evaluated again.
- Store replaces the entry the conversation had: an older entry is *superseded* when
  the new request's prompt repeats all of that entry's prompt (a next turn, or a
  regenerated reply), whatever the client did to the reply's tokens when it sent them
  back (a reply is often tokenized differently the second time). A different
  conversation that only shares a system prompt, or a document with another question
  after it, repeats less than the entry's prompt and keeps its own entry.
- When there are more than ``max_conversations`` entries or more than
  ``capacity_bytes`` of them, whole idle conversations are dropped in the configured
  order (by default: not held, then least recently used, then the deeper prefix).

With ``edgemerge.Llama(merge=...)`` every entry holds at most the merge budget's cells
(merged cells keep their spans and bias), so the memory per conversation stays bounded
however long the conversation grows.

:class:`ServedLlama` is ``edgemerge.Llama`` with per-request counters (prompt tokens
reused and evaluated, merges) that the server reports with each response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import llama_cpp
import numpy as np

from edgemerge.llama import Llama
from edgemerge.native import kvcells
from edgemerge.prefix.blockcache import DEFAULT_EVICTION, BlockCache, RamBackend


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two 1-D integer arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class ConversationCache(BlockCache):
    """A RAM prompt cache with one entry per conversation (see module doc).

    Args:
        capacity_bytes: most bytes of saved states (and their tokens) kept.
        max_conversations: most entries (conversations) kept.
        block_size: tokens per block of the prefix hashes (reuse is block-granular).
        namespace: mixed into the hashes; one per model.
        eviction: the order idle conversations are dropped in (see
            :class:`~edgemerge.prefix.blockcache.BlockCache`).
    """

    def __init__(
        self,
        capacity_bytes: int = 2 << 30,
        *,
        max_conversations: int = 16,
        block_size: int = 16,
        namespace: bytes | str = b"",
        eviction: Sequence[str] = DEFAULT_EVICTION,
        **kwargs: Any,
    ) -> None:
        if isinstance(max_conversations, bool) or not isinstance(max_conversations, int):
            raise ValueError(f"max_conversations must be an int >= 1, got {max_conversations!r}")
        if max_conversations < 1:
            raise ValueError(f"max_conversations must be >= 1, got {max_conversations}")
        super().__init__(
            RamBackend(capacity_bytes),
            block_size=block_size,
            namespace=namespace,
            eviction=eviction,
            **kwargs,
        )
        self.max_conversations = max_conversations
        self.superseded = 0
        self._prompt_len: dict[bytes, int] = {}  # entry key -> its prompt's length
        self._prompt: np.ndarray | None = None  # the prompt of the request being served
        self.last_key: bytes | None = None  # the entry the last store wrote or kept

    def __getitem__(self, key: Sequence[int]) -> llama_cpp.LlamaState:
        # llama-cpp-python looks the prompt up before it evaluates it: remember the prompt
        # so that the store after the completion knows where the prompt ended
        self._prompt = np.asarray([int(t) for t in key], dtype=np.int64)
        return super().__getitem__(key)

    def entry_tokens(self, key: bytes) -> np.ndarray:
        """The tokens an entry was stored for (its whole blocks), int32 ``[n]``."""
        entry = self._entries[key]
        body = self.backend.read(entry)
        return np.frombuffer(body, dtype=np.int32, count=entry.table.n_tokens)

    def entry_bytes(self, key: bytes | None) -> int | None:
        """Bytes one entry holds (its state and tokens), or None when it is not stored."""
        entry = self._entries.get(key) if key is not None else None
        return None if entry is None else entry.nbytes

    def _store(self, key: Sequence[int], value: llama_cpp.LlamaState) -> None:
        tokens = np.asarray([int(t) for t in key], dtype=np.int64)
        prompt = self._prompt
        self._prompt = None
        if prompt is None or _common_prefix(prompt, tokens) < len(prompt):
            prompt = tokens  # stored without a lookup: the whole key counts as prompt
        super()._store(key, value)
        n = min(len(tokens), int(value.n_tokens))
        boundary = n // self.block_size * self.block_size
        if boundary == 0:
            return
        new_key = self._hashes(tokens[:boundary])[-1]
        if new_key not in self._entries:
            return  # not stored (a warning said why)
        self.last_key = new_key
        self._prompt_len.setdefault(new_key, len(prompt))
        self._supersede(new_key, prompt)
        self._evict_conversations(protect=new_key)

    def _supersede(self, new_key: bytes, prompt: np.ndarray) -> None:
        """Drop the entries whose whole prompt the new request repeated: the same
        conversation's older turns (the new entry holds all they could restore)."""
        for entry in list(self._entries.values()):
            if entry.key == new_key or entry.refcount > 0:
                continue
            old = self.entry_tokens(entry.key)
            covered = min(self._prompt_len.get(entry.key, len(old)), len(old))
            if _common_prefix(old.astype(np.int64), prompt) >= covered:
                self._drop(entry)
                self.superseded += 1

    def _evict_conversations(self, protect: bytes) -> None:
        while len(self._entries) > self.max_conversations:
            idle = [e for e in self._entries.values() if e.refcount == 0 and e.key != protect]
            if not idle:
                break
            self._drop(min(idle, key=self._eviction_key))
            self.stats.evictions += 1

    def _drop(self, entry: Any) -> None:
        super()._drop(entry)
        self._prompt_len.pop(entry.key, None)
        if self.last_key == entry.key:
            self.last_key = None


@dataclass
class RequestStats:
    """What one response did to the cache; sent as the response's ``edgemerge`` field.

    Attributes:
        merging: whether the cache merges (False: plain llama-cpp-python).
        cells: KV cells the conversation occupies after the response.
        logical_tokens: tokens (positions) of the conversation, merged or not.
        merges: merge sets applied during this response.
        cells_merged: cells freed by merging during this response.
        cells_evicted: cells freed by the eviction fallback during this response.
        prompt_tokens_cached: prompt tokens taken from the cache, not evaluated.
        prompt_tokens_evaluated: prompt tokens evaluated (the tail past the cached
            prefix, and the tokens of a merged span that a rewind cut into).
        conversation_bytes: bytes the conversation's saved entry holds (None: not saved).
        conversations: conversations the server keeps.
        cache_bytes: bytes all saved conversations hold.
    """

    merging: bool
    cells: int
    logical_tokens: int
    merges: int
    cells_merged: int
    cells_evicted: int
    prompt_tokens_cached: int
    prompt_tokens_evaluated: int
    conversation_bytes: int | None
    conversations: int
    cache_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _CountingEval(llama_cpp.Llama):
    """Counts the tokens llama-cpp-python evaluates. It sits between ``edgemerge.Llama``
    and ``llama_cpp.Llama`` in :class:`ServedLlama`'s MRO, so it sees every chunk that
    ``edgemerge.Llama.eval`` passes on, replayed spans included."""

    _tokens_evaluated = 0

    def eval(self, tokens: Sequence[int]) -> None:
        super().eval(tokens)
        self._tokens_evaluated += len(tokens)


class ServedLlama(Llama, _CountingEval):
    """``edgemerge.Llama`` with per-request counters for the server.

    Call :meth:`begin_request` before a completion and :meth:`request_stats` after it.
    The first :meth:`eval` of a request is its prompt (llama-cpp-python evaluates the
    uncached prompt tail in one call, then one token per step).
    """

    def begin_request(self) -> None:
        self._req_eval_calls = 0
        self._req_prompt_cached = 0
        self._req_prompt_evaluated = 0
        self._req_base = self._merge_counters()
        if isinstance(self.cache, ConversationCache):
            self.cache.last_key = None

    def eval(self, tokens: Sequence[int]) -> None:
        first = getattr(self, "_req_eval_calls", None) == 0
        before = self._tokens_evaluated
        again = self._reevaluated_so_far() if first else 0  # only the prompt's eval asks
        super().eval(tokens)
        if first:
            self._req_eval_calls = 1
            # recall's second pass over the prompt's last tokens is not prompt work
            self._req_prompt_evaluated = (
                self._tokens_evaluated - before - (self._reevaluated_so_far() - again)
            )
            self._req_prompt_cached = self.n_tokens - self._req_prompt_evaluated

    def _reevaluated_so_far(self) -> int:
        if self.merge_settings is None or not self.merge_settings.recall:
            return 0
        return self.merge_stats().tokens_reevaluated

    def _merge_counters(self) -> tuple[int, int, int]:
        if self.merge_settings is None:
            return (0, 0, 0)
        return (self._merges, self._merged, self._evicted)

    def request_stats(self) -> RequestStats:
        """Counters of the request since :meth:`begin_request`."""
        now = self._merge_counters()
        base = getattr(self, "_req_base", now)
        cache = self.cache if isinstance(self.cache, ConversationCache) else None
        return RequestStats(
            merging=self.merge_settings is not None,
            cells=len(kvcells.list_cells(self)) if self.n_tokens else 0,
            logical_tokens=self.n_tokens,
            merges=now[0] - base[0],
            cells_merged=now[1] - base[1],
            cells_evicted=now[2] - base[2],
            prompt_tokens_cached=getattr(self, "_req_prompt_cached", 0),
            prompt_tokens_evaluated=getattr(self, "_req_prompt_evaluated", 0),
            conversation_bytes=cache.entry_bytes(cache.last_key) if cache else None,
            conversations=len(cache) if cache else 0,
            cache_bytes=cache.cache_size if cache else 0,
        )

    def save_partial(self) -> None:
        """Store the context as it is (a stream the client left): the conversation's
        next request then starts from what was evaluated."""
        if self.cache is None or self.n_tokens == 0:
            return
        # BlockCache warns and skips a state it cannot store; nothing else is lost
        self.cache[self.input_ids[: self.n_tokens].tolist()] = self.save_state()
