"""Block table and block-granular prompt cache, on the real patched runtime (tiny models)."""

from __future__ import annotations

import numpy as np
import pytest

from edgemerge import Llama, MergeSettings
from edgemerge.native import kvcells
from edgemerge.prefix.blockcache import (
    BlockCache,
    BlockCacheError,
    BlockCacheWarning,
    DiskBackend,
    RamBackend,
    cut_context_state,
)
from edgemerge.prefix.blocktable import BlockTable, merged_blocks, token_signatures
from edgemerge.reference.hashing import hamming_distance, prefix_block_hashes
from tests_support import english_text

TEXT = english_text().encode()  # real prose, present on every machine
SMALL = MergeSettings(budget=160, sinks=4, recent=32, block_size=8, slack=16)
NO_RECALL = MergeSettings(budget=160, sinks=4, recent=32, block_size=8, slack=16, recall=False)
KW = {
    "n_ctx": 256,
    "n_batch": 32,
    "n_threads": 1,
    "n_threads_batch": 1,
    "seed": 7,
    "verbose": False,
}


def make(path, merge=None, **kw):
    return Llama(str(path), merge=merge, **{**KW, **kw})


def text_tokens(llm, start: int, n: int) -> list[int]:
    return llm.tokenize(TEXT)[start : start + n]


def complete(llm, tokens, max_tokens=8) -> str:
    return llm.create_completion(tokens, max_tokens=max_tokens, temperature=0)["choices"][0]["text"]


class Clock:
    def __init__(self) -> None:
        self.t = 1.0

    def __call__(self) -> float:
        return self.t


# -- block table ----------------------------------------------------------------------------


def test_block_table_hashes_positions_and_merged_flags():
    tokens = list(range(100, 140))
    spans = np.array([[0, 0], [1, 1], [9, 17], [18, 18]], np.int32)
    table = BlockTable.from_tokens(tokens, 8, root=b"m", spans=spans, now=5.0)
    assert len(table) == 5 and table.n_tokens == 40
    assert table.hashes == prefix_block_hashes(tokens, 8, root=b"m")
    assert [b.start for b in table.blocks] == [0, 8, 16, 24, 32]
    # the cell covering 9..17 reaches into blocks 1 and 2 only
    assert [b.merged for b in table.blocks] == [False, True, True, False, False]
    assert all(b.last_use == 5.0 and b.ref_count == 0 for b in table.blocks)
    assert table.signature_source == "tokens"


def test_merged_blocks_ignores_single_position_cells_and_blocks_past_the_end():
    out = merged_blocks(np.array([3, 20]), np.array([3, 40]), 3, 8)
    assert out.tolist() == [False, False, True]


def test_token_signatures_see_content_not_order():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 150_000, 64)
    shuffled = rng.permutation(a)
    other = rng.integers(0, 150_000, 64)
    sa, ss, so = (token_signatures(x, 64)[0] for x in (a, shuffled, other))
    assert sa == ss
    assert hamming_distance(sa, so) > 16  # unrelated blocks: about half the bits differ
    near = a.copy()
    near[:4] = other[:4]
    assert hamming_distance(sa, token_signatures(near, 64)[0]) < hamming_distance(sa, so)


def test_block_table_signature_from_keys():
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((4, 2, 32, 8)).astype(np.float32)
    table = BlockTable.from_tokens(list(range(32)), 8, keys=keys)
    assert table.signature_source == "keys"
    assert len({b.signature for b in table.blocks}) > 1
    with pytest.raises(ValueError, match="keys must be"):
        BlockTable.from_tokens(list(range(32)), 8, keys=keys[:, :, :16])


def test_hold_and_release_count_references():
    table = BlockTable.from_tokens(list(range(32)), 8)
    table.hold(2, now=9.0)
    table.hold(1)
    assert [b.ref_count for b in table.blocks] == [2, 1, 0, 0]
    assert table.blocks[0].last_use == 9.0 and table.ref_count == 2
    table.release(2)
    table.release(1)
    assert table.ref_count == 0
    with pytest.raises(ValueError, match="not held"):
        table.release(1)


# -- restoring ------------------------------------------------------------------------------


def test_restored_context_generates_what_a_recomputed_one_does(tiny_qwen2_path):
    a = make(tiny_qwen2_path)
    cache = BlockCache.in_ram(1 << 30, block_size=16)
    a.set_cache(cache)
    prompt = text_tokens(a, 0, 200)
    complete(a, prompt, max_tokens=4)
    assert cache.stats.misses == 1 and cache.stats.stores == 1
    (entry,) = cache.entries()
    assert entry.depth == 12 and entry.valid == 192

    follow = prompt + text_tokens(a, 1000, 40)
    b = make(tiny_qwen2_path)
    b.set_cache(cache)
    restored = complete(b, follow)
    assert cache.stats.hits == 1 and cache.stats.restored_tokens == 192
    recomputed = complete(make(tiny_qwen2_path), follow)
    assert restored == recomputed


def test_a_prompt_sharing_only_the_first_blocks_restores_those(tiny_qwen2_path):
    a = make(tiny_qwen2_path)
    cache = BlockCache.in_ram(1 << 30, block_size=16)
    a.set_cache(cache)
    system = text_tokens(a, 0, 100)
    complete(a, system + text_tokens(a, 500, 60), max_tokens=2)
    b = make(tiny_qwen2_path)
    b.set_cache(cache)
    other_turn = system + text_tokens(a, 2000, 30)
    assert other_turn in cache
    assert cache._find_longest_prefix_key(other_turn) == tuple(other_turn[:96])
    restored = complete(b, other_turn)
    assert cache.stats.hits == 1 and cache.stats.restored_tokens == 96  # 6 whole blocks
    assert restored == complete(make(tiny_qwen2_path), other_turn)
    # an unrelated prompt is a miss
    with pytest.raises(KeyError):
        cache[text_tokens(a, 3000, 64)]
    assert cache.stats.misses == 2


def test_restored_merged_context_generates_what_a_recomputed_one_does(tiny_qwen2_path):
    # Recall acts at the end of each prompt, so with it on, a context built in two turns
    # (the stored prompt, then the follow-up) differs by design from one built in one
    # turn; this equivalence is about the cells the cache restores, so recall is off.
    # What recall does after a restore: test_a_restore_with_recall_on_starts_an_empty_store.
    a = make(tiny_qwen2_path, merge=NO_RECALL)
    cache = BlockCache.in_ram(1 << 30, block_size=16)
    a.set_cache(cache)
    prompt = text_tokens(a, 0, 320)  # a multiple of n_batch: the same chunks as a recompute
    complete(a, prompt, max_tokens=1)
    assert a.merge_stats().merges > 0
    (entry,) = cache.entries()
    assert any(b.merged for b in entry.table.blocks)

    follow = prompt + text_tokens(a, 1000, 8)
    b = make(tiny_qwen2_path, merge=NO_RECALL)
    b.set_cache(cache)
    restored = complete(b, follow)
    assert cache.stats.hits == 1 and cache.stats.restored_tokens == 320
    cells = kvcells.list_cells(b)
    assert np.any(cells.span_max > cells.span_min)  # the merged cells came back
    c = make(tiny_qwen2_path, merge=NO_RECALL)
    recomputed = complete(c, follow)
    # the recompute merged exactly where the cached run did, and not after
    assert c.merge_stats().compressions == a.merge_stats().compressions
    assert restored == recomputed


def test_a_restore_with_recall_on_starts_an_empty_store(tiny_qwen2_path):
    a = make(tiny_qwen2_path, merge=SMALL)
    cache = BlockCache.in_ram(1 << 30, block_size=16)
    a.set_cache(cache)
    prompt = text_tokens(a, 0, 320)
    complete(a, prompt, max_tokens=1)
    assert a.merge_stats().store_positions > 0  # the saving run had originals to recall
    follow = prompt + text_tokens(a, 1000, 8)
    b = make(tiny_qwen2_path, merge=SMALL)
    b.set_cache(cache)
    with_recall = complete(b, follow)
    stats = b.merge_stats()
    assert cache.stats.hits == 1 and stats.recall_turns == 1
    # the entry holds cells, not the saving run's store: nothing from it can come back
    assert stats.store_positions == 0 and stats.recall_hits == 0 and stats.blocks_restored == 0
    c = make(tiny_qwen2_path, merge=NO_RECALL)
    c.set_cache(cache)
    assert complete(c, follow) == with_recall


def wide_cell(llm) -> tuple[int, int]:
    cells = kvcells.list_cells(llm)
    wide = np.flatnonzero(cells.span_max > cells.span_min)
    assert wide.size, "no merged cell"
    # one whose first position is even: a 2-token block boundary then falls inside it
    i = next((i for i in wide if cells.span_min[i] % 2 == 1), wide[0])
    return int(cells.span_min[i]), int(cells.span_max[i])


def test_a_merged_cell_across_the_boundary_is_cut_with_it(tiny_qwen2_path):
    llm = make(tiny_qwen2_path, merge=SMALL)
    llm.eval(text_tokens(llm, 0, 600))
    cells = kvcells.list_cells(llm)
    lo, hi = wide_cell(llm)
    state, valid, spans = cut_context_state(llm.save_state().llama_state, lo + 1)
    assert valid == lo
    assert spans[:, 1].max() < valid
    assert len(spans) == int(np.sum(cells.span_max < valid))
    # a boundary on a plain cell keeps everything before it
    _, valid, _ = cut_context_state(llm.save_state().llama_state, 3)
    assert valid == 3
    with pytest.raises(BlockCacheError, match="cannot be read"):
        cut_context_state(state[:-7], 16)


def test_restore_at_an_earlier_block_of_a_merged_entry(tiny_qwen2_path):
    a = make(tiny_qwen2_path, merge=SMALL)
    tokens = text_tokens(a, 0, 600)
    a.eval(tokens)
    lo, hi = wide_cell(a)
    block = 2 if lo % 2 else 1  # a block boundary inside the merged cell's span
    cache = BlockCache.in_ram(1 << 30, block_size=block)
    cache[tokens] = a.save_state()
    cut = lo + 1
    prompt = tokens[:cut] + text_tokens(a, 2000, 5)
    state = cache[prompt]
    assert state.n_tokens == lo  # only the tokens whose cells are all in the state
    assert list(state.input_ids[:lo]) == tokens[:lo]
    assert np.all(state.input_ids[lo:] == -1)
    b = make(tiny_qwen2_path, merge=SMALL)
    b.load_state(state)
    cells = kvcells.list_cells(b)
    assert cells.span_max.max() < lo
    assert np.any(cells.span_max > cells.span_min)
    assert len(complete(b, prompt, max_tokens=4)) > 0
    assert b.n_tokens == len(prompt) + 3


# -- eviction -------------------------------------------------------------------------------


def store(cache: BlockCache, llm: Llama, tokens: list[int]) -> bytes:
    llm.reset()
    llm.eval(tokens)
    cache[tokens] = llm.save_state()
    return prefix_block_hashes(tokens, cache.block_size, root=cache.namespace)[-1]


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        # default: held never, then least recently used, then the deeper prefix first
        (("refcount", "lru", "position"), ["deep_old", "shallow_old", "deep_new", "shallow_new"]),
        (("position", "lru"), ["deep_old", "deep_new", "shallow_old", "shallow_new"]),
    ],
)
def test_eviction_follows_the_stated_order(tiny_qwen2_path, order, expected):
    llm = make(tiny_qwen2_path)
    clock = Clock()
    cache = BlockCache(RamBackend(1 << 30), block_size=16, eviction=order, clock=clock)
    keys = {}
    for name, start, n, t in [
        ("deep_old", 0, 64, 1.0),
        ("shallow_old", 200, 32, 1.0),
        ("deep_new", 400, 64, 2.0),
        ("shallow_new", 600, 32, 2.0),
        ("held", 800, 32, 0.0),
    ]:
        clock.t = t
        keys[name] = store(cache, llm, text_tokens(llm, start, n))
    held = text_tokens(llm, 800, 32)
    assert cache.hold(held) == keys["held"]
    cache.backend.capacity_bytes = 1  # everything must go that may go
    with pytest.warns(BlockCacheWarning, match="every other entry is held"):
        dropped = cache.evict_to_fit()
    names = {v: k for k, v in keys.items()}
    assert [names[k] for k in dropped] == expected
    assert [e.key for e in cache.entries()] == [keys["held"]]
    assert cache.stats.evictions == 4
    cache.release(keys["held"])
    assert cache.evict_to_fit() == [keys["held"]]


def test_storing_past_the_limit_evicts_the_least_recently_used(tiny_qwen2_path):
    llm = make(tiny_qwen2_path)
    clock = Clock()
    cache = BlockCache(RamBackend(1 << 30), block_size=16, clock=clock)
    first = store(cache, llm, text_tokens(llm, 0, 48))
    clock.t = 2.0
    second = store(cache, llm, text_tokens(llm, 300, 48))
    clock.t = 3.0
    cache[text_tokens(llm, 0, 48) + [11]]  # a hit makes the first the most recent
    cache.backend.capacity_bytes = cache.cache_size + 10
    clock.t = 4.0
    third = store(cache, llm, text_tokens(llm, 600, 48))
    assert {e.key for e in cache.entries()} == {first, third}
    assert second not in {e.key for e in cache.entries()}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="eviction must be"):
        BlockCache(RamBackend(), eviction=("lru", "size"))
    with pytest.raises(ValueError, match="eviction must be"):
        BlockCache(RamBackend(), eviction=())
    with pytest.raises(ValueError, match="capacity_bytes"):
        RamBackend(0)
    with pytest.raises(ValueError, match="block_size"):
        BlockCache(RamBackend(), block_size=0)


def test_an_entry_larger_than_the_cache_is_not_stored(tiny_qwen2_path):
    llm = make(tiny_qwen2_path)
    cache = BlockCache(RamBackend(1000), block_size=16)
    with pytest.warns(BlockCacheWarning, match="raise capacity_bytes"):
        store(cache, llm, text_tokens(llm, 0, 48))
    assert len(cache) == 0 and cache.cache_size == 0


# -- disk -----------------------------------------------------------------------------------


def test_disk_cache_survives_a_restart(tiny_qwen2_path, tmp_path):
    a = make(tiny_qwen2_path)
    a.set_cache(BlockCache.on_disk(tmp_path, 1 << 30, block_size=16, namespace="tiny"))
    prompt = text_tokens(a, 0, 150)
    complete(a, prompt, max_tokens=2)
    assert len(list(tmp_path.glob("*.kvblock"))) == 1

    reopened = BlockCache.on_disk(tmp_path, 1 << 30, block_size=16, namespace="tiny")
    assert len(reopened) == 1 and reopened.cache_size > 0
    b = make(tiny_qwen2_path)
    b.set_cache(reopened)
    follow = prompt + text_tokens(a, 900, 20)
    restored = complete(b, follow)
    assert reopened.stats.hits == 1 and reopened.stats.restored_tokens == 144
    assert restored == complete(make(tiny_qwen2_path), follow)
    # another namespace (model) does not see these entries
    other = BlockCache.on_disk(tmp_path, 1 << 30, block_size=16, namespace="other")
    assert follow not in other


def _disk_entry(tiny_qwen2_path, directory):
    llm = make(tiny_qwen2_path)
    llm.set_cache(BlockCache.on_disk(directory, 1 << 30, block_size=16))
    prompt = text_tokens(llm, 0, 100)
    complete(llm, prompt, max_tokens=2)
    (path,) = directory.glob("*.kvblock")
    return prompt + text_tokens(llm, 700, 20), path


def test_a_corrupted_disk_entry_is_rejected_and_recomputed(tiny_qwen2_path, tmp_path):
    follow, path = _disk_entry(tiny_qwen2_path, tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF  # one flipped byte in the K/V data
    path.write_bytes(bytes(raw))
    cache = BlockCache.on_disk(tmp_path, 1 << 30, block_size=16)
    llm = make(tiny_qwen2_path)
    llm.set_cache(cache)
    with pytest.warns(BlockCacheWarning, match="corrupt.*recomputing instead"):
        text = complete(llm, follow)
    assert cache.stats.rejected == 1 and cache.stats.hits == 0 and cache.stats.misses == 1
    assert not path.exists()
    assert text == complete(make(tiny_qwen2_path), follow)


def test_a_truncated_disk_entry_is_rejected_and_recomputed(tiny_qwen2_path, tmp_path):
    follow, path = _disk_entry(tiny_qwen2_path, tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.warns(BlockCacheWarning, match="truncated"):
        cache = BlockCache.on_disk(tmp_path, 1 << 30, block_size=16)
    assert len(cache) == 0 and not path.exists()
    llm = make(tiny_qwen2_path)
    llm.set_cache(cache)
    assert complete(llm, follow) == complete(make(tiny_qwen2_path), follow)
    assert cache.stats.misses == 1


def test_a_disk_entry_truncated_while_open_is_rejected(tiny_qwen2_path, tmp_path):
    follow, path = _disk_entry(tiny_qwen2_path, tmp_path)
    cache = BlockCache.on_disk(tmp_path, 1 << 30, block_size=16)
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.warns(BlockCacheWarning, match="truncated"):
        with pytest.raises(KeyError):
            cache[follow]
    assert cache.stats.rejected == 1 and len(cache) == 0


def test_disk_backend_refuses_an_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BlockCacheError, match="cannot create the cache directory"):
        DiskBackend(blocker / "sub")
