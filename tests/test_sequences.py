"""Prefix sharing between live sequences of one context (tiny model, real llama.cpp).

Exactness: a shared sequence's greedy continuation must equal a fresh context's token
for token; its logits equal a fresh context's to float tolerance only. The arithmetic
is the same, but the layout of the unified cache is not: the second sequence's own
cells sit after the first one's, so the attention sums over the cache group their
terms differently (masked cells add exact zeros, yet SIMD accumulation regroups) and
round differently. Measured on the tiny qwen2 (logits up to ~9): 4e-5 without flash
attention, 1.5e-3 with it (llama.cpp's own result moves by 3.6e-3 with flash attention
when only ``n_batch`` changes). The bounds below leave about 20x headroom.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgemerge import Llama
from edgemerge.native import kvcells, kvmerge
from edgemerge.prefix.sequences import PoolError, SharedPrefixPool
from edgemerge.reference.hashing import prefix_block_hashes
from tests_support import english_text

TEXT = english_text().encode()  # real prose, present on every machine
ATOL = {True: 3e-2, False: 1e-3}  # flash attention on / off (see module doc)
BS = 16


class Clock:
    def __init__(self) -> None:
        self.t = 1.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def llm(tiny_qwen2_path):
    model = Llama(str(tiny_qwen2_path), n_ctx=64, n_threads=1, verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def text(llm) -> list[int]:
    return llm.tokenize(TEXT)


def make(llm, **kw) -> SharedPrefixPool:
    args = {"n_ctx": 512, "n_seq_max": 4, "n_threads": 1, "n_batch": 64, "block_size": BS}
    return SharedPrefixPool(llm, **{**args, **kw})


def fresh(llm, tokens: list[int], n_gen: int, **kw) -> tuple[np.ndarray, list[int]]:
    """Logits after ``tokens`` and the greedy continuation, in a context of their own."""
    with make(llm, **kw) as pool:
        seq = pool.open(tokens)
        return pool.logits(seq), pool.generate(seq, n_gen)


def cells_of(pool: SharedPrefixPool, seq: int) -> dict[int, int]:
    cells = kvcells.list_cells(pool.ctx, seq)
    return dict(zip(cells.pos.tolist(), cells.cell.tolist(), strict=True))


# -- sharing --------------------------------------------------------------------------------


@pytest.mark.parametrize("flash_attn", [True, False])
def test_a_second_sequence_decodes_only_its_suffix_and_matches_a_fresh_context(
    llm, text, flash_attn
):
    system = text[:100]
    first, second = system + text[500:530], system + text[2000:2025]
    with make(llm, flash_attn=flash_attn) as pool:
        a = pool.open(first)
        assert pool.stats.tokens_decoded == len(first)
        b = pool.open(second)
        # 6 whole blocks (96 tokens) of the system prompt come from the first sequence
        assert pool.stats.tokens_shared == 96 and pool.stats.blocks_shared == 6
        assert pool.stats.tokens_decoded == len(first) + len(second) - 96
        ca, cb = cells_of(pool, a), cells_of(pool, b)
        assert all(cb[p] == ca[p] for p in range(96))  # the same cells, not copies
        assert not set(cb[p] for p in range(96, len(second))) & set(ca.values())
        assert pool.used_cells() == len(first) + len(second) - 96
        logits, continuation = pool.logits(b), pool.generate(b, 12)
    ref_logits, ref_continuation = fresh(llm, second, 12, flash_attn=flash_attn)
    assert continuation == ref_continuation
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=ATOL[flash_attn])


def test_reference_counts_follow_sharing_and_closing(llm, text):
    system = text[:100]
    first, second = system + text[500:530], system + text[2000:2025]
    with make(llm) as pool:
        a = pool.open(first)
        assert [blk.ref_count for blk in pool.table(a).blocks] == [1] * 8
        b = pool.open(second)
        assert [blk.ref_count for blk in pool.table(a).blocks] == [2] * 6 + [1, 1]
        assert [blk.ref_count for blk in pool.table(b).blocks] == [2] * 6 + [1]
        shared = pool.table(a).hashes[:6]
        assert all(pool.holders(h) == {a, b} for h in shared)
        own_a = pool.table(a).hashes[6:]
        before = cells_of(pool, b)

        pool.close(a, keep=False)
        assert pool.open_ids == [b] and pool.parked_ids == []
        assert [blk.ref_count for blk in pool.table(b).blocks] == [1] * 7
        assert all(pool.holders(h) == {b} for h in shared)
        assert not any(pool.holders(h) for h in own_a)  # no cells left: not reusable
        assert {blk.prefix_hash for blk in pool.blocks()} == set(pool.table(b).hashes)
        assert cells_of(pool, b) == before  # the shared cells survived in b
        assert pool.used_cells() == len(second)
        logits, continuation = pool.logits(b), pool.generate(b, 10)
        pool.close(b, keep=False)
        assert pool.blocks() == [] and pool.used_cells() == 0
    ref_logits, ref_continuation = fresh(llm, second, 10)
    assert continuation == ref_continuation
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=ATOL[True])


def test_a_parked_sequence_keeps_its_blocks_for_the_next_open(llm, text):
    system = text[:100]
    first, second = system + text[500:530], system + text[2000:2025]
    with make(llm) as pool:
        a = pool.open(first)
        pool.close(a)  # keep=True: parked
        assert pool.parked_ids == [a] and pool.open_ids == []
        assert pool.tokens(a) == first[:128]  # the partial last block went
        assert [blk.ref_count for blk in pool.table(a).blocks] == [0] * 8
        assert pool.used_cells() == 128
        b = pool.open(second)
        assert pool.stats.hits == 1 and pool.stats.tokens_shared == 96
        assert [blk.ref_count for blk in pool.table(a).blocks] == [1] * 6 + [0, 0]
        logits = pool.logits(b)
        with pytest.raises(PoolError, match="closed"):
            pool.generate(a, 1)
    np.testing.assert_allclose(logits, fresh(llm, second, 0)[0], rtol=0, atol=ATOL[True])


def test_a_prefix_diverging_mid_block_shares_only_the_full_matching_blocks(llm, text):
    first = text[:80]
    second = text[:40] + text[3000:3030]  # block 2 (tokens 32..47) differs from token 40
    with make(llm) as pool:
        pool.open(first)
        b = pool.open(second)
        assert pool.stats.tokens_shared == 32 and pool.stats.blocks_shared == 2
        assert pool.stats.tokens_decoded == len(first) + len(second) - 32
        assert pool.table(b).hashes == prefix_block_hashes(second, BS)
        assert [blk.ref_count for blk in pool.table(b).blocks] == [2, 2, 1, 1]
        logits = pool.logits(b)
    np.testing.assert_allclose(logits, fresh(llm, second, 0)[0], rtol=0, atol=ATOL[True])


def test_hits_and_misses_are_counted_and_the_last_token_is_always_decoded(llm, text):
    with make(llm, n_seq_max=5) as pool:
        pool.open(text[:96])
        assert (pool.stats.hits, pool.stats.misses) == (0, 1)
        # the same 6 whole blocks: the last one is decoded again, for live logits
        pool.open(text[:96])
        assert (pool.stats.hits, pool.stats.misses) == (1, 1)
        assert pool.stats.tokens_shared == 80
        pool.open(text[1000:1050])  # unrelated
        pool.open(text[:16])  # its one block ends at its last token: nothing to share
        assert (pool.stats.hits, pool.stats.misses) == (1, 3)
        pool.open(text[:20])
        assert (pool.stats.hits, pool.stats.misses) == (2, 3)
        assert pool.stats.opened == 5 and pool.stats.tokens_shared == 96
        assert pool.stats.tokens_decoded == 96 + 16 + 50 + 16 + 4


def test_generated_blocks_are_shared_too(llm, text):
    with make(llm) as pool:
        a = pool.open(text[:40])
        generated = pool.generate(a, 30)  # seals blocks 2 and 3 while generating
        assert len(pool.table(a)) == 4
        pool.open(text[:40] + generated + text[900:905])
        assert pool.stats.tokens_shared == 64


# -- merged cells ---------------------------------------------------------------------------


def merge_two(pool: SharedPrefixPool, seq: int, pos: int) -> None:
    """Merge the cells at ``pos`` and ``pos + 1`` of ``seq`` into one cell."""
    c0, c1 = (kvcells.list_cells(pool.ctx, seq).index_of_pos(p) for p in (pos, pos + 1))
    groups = kvmerge.MergeGroups(
        dst=np.array([c0], np.uint32),
        offsets=np.array([0, 2], np.int32),
        src=np.array([c0, c1], np.uint32),
        bias=np.array([np.log(2.0)], np.float32),
        span=np.array([[pos, pos + 1]], np.int32),
    )
    kvmerge.kv_merge(pool.ctx, groups, seq_id=seq)


@pytest.mark.parametrize(("pos", "shared"), [(20, 16), (15, 0), (40, 32)])
def test_sharing_stops_before_the_first_merged_block(llm, text, pos, shared):
    prompt = text[:64] + text[700:720]
    with make(llm) as pool:
        a = pool.open(text[:64])
        merge_two(pool, a, pos)  # a cell spanning pos..pos+1 (15..16 straddles blocks 0, 1)
        b = pool.open(prompt)
        assert pool.stats.tokens_shared == shared
        assert len(pool.table(a)) == shared // BS  # a's chain was cut at the merged block
        cb = kvcells.list_cells(pool.ctx, b)
        assert np.all(cb.span_min == cb.span_max)  # b received no merged cell
        assert len(cb) == len(prompt)
        logits = pool.logits(b)
    np.testing.assert_allclose(logits, fresh(llm, prompt, 0)[0], rtol=0, atol=ATOL[True])


def test_a_merged_block_is_dropped_when_the_sequence_is_parked(llm, text):
    with make(llm) as pool:
        a = pool.open(text[:64])
        merge_two(pool, a, 36)
        pool.close(a)
        assert len(pool.table(a)) == 2 and pool.tokens(a) == text[:32]
        assert len(kvcells.list_cells(pool.ctx, a)) == 32


# -- bad input ------------------------------------------------------------------------------


def test_bad_input_is_refused_with_a_clear_error(llm, text):
    with make(llm, n_ctx=256, n_seq_max=2) as pool:
        assert pool.n_ctx == 256
        for tokens, message in [
            ([], "no tokens"),
            ([1.5, 2.0], "flat sequence of ints"),
            ([[1, 2]], "flat sequence of ints"),
            ([-1, 5], r"token ids must lie in \[0, "),
            ([pool.n_vocab], r"token ids must lie in \[0, "),
            (text[:257], "257 tokens do not fit a sequence of at most n_ctx=256"),
        ]:
            with pytest.raises(PoolError, match=message):
                pool.open(tokens)
        a = pool.open(text[:100])
        b = pool.open(text[:20])
        with pytest.raises(PoolError, match="all n_seq_max=2 sequences are open"):
            pool.open(text[300:310])
        for call in (lambda: pool.generate(7, 1), lambda: pool.logits("a"), lambda: pool.close(9)):
            with pytest.raises(PoolError, match="no sequence .* in this pool"):
                call()
        with pytest.raises(PoolError, match="do not fit"):
            pool.extend(a, text[:157])
        with pytest.raises(PoolError, match="cannot generate 157 tokens after 100"):
            pool.generate(a, 157)
        pool.close(b)
        # 160 cells do not fit next to a's 100; refused before b (parked) loses its id
        with pytest.raises(PoolError, match="KV cache is full: 160 new cells"):
            pool.open(text[1000:1160])
        assert (pool.open_ids, pool.parked_ids, pool.stats.opened) == ([a], [b], 2)
        assert pool.stats.dropped_sequences == 0
    with pytest.raises(PoolError, match="the pool is closed"):
        pool.open(text[:10])
    with pytest.raises(PoolError, match="n_seq_max is 0"):
        make(llm, n_seq_max=0)
    with pytest.raises(PoolError, match="block_size is 0"):
        make(llm, block_size=0)
    with pytest.raises(ValueError, match="eviction must be"):
        make(llm, eviction=("lru", "size"))


# -- eviction -------------------------------------------------------------------------------


def parked(pool: SharedPrefixPool, clock: Clock, tokens: list[int], t: float) -> list[bytes]:
    clock.t = t
    seq = pool.open(tokens)
    pool.close(seq)
    return pool.table(seq).hashes


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        # default: reference count 0 only, oldest first, then the deeper block first
        (("refcount", "lru", "position"), ["p3", "p2", "q4", "q3", "q2", "q1", "q0"]),
        (("position", "lru"), ["q4", "p3", "q3", "p2", "q2", "q1", "q0"]),
        (("lru",), ["p3", "p2", "q4", "q3", "q2", "q1", "q0"]),
    ],
)
def test_eviction_follows_the_configured_order_and_spares_open_sequences(
    llm, text, order, expected
):
    clock = Clock()
    with make(llm, eviction=order, clock=clock) as pool:
        p = parked(pool, clock, text[:70], 1.0)  # 4 blocks
        q = parked(pool, clock, text[2000:2085], 2.0)  # 5 blocks
        clock.t = 3.0
        o = pool.open(text[:40])  # holds p's blocks 0 and 1
        before = cells_of(pool, o)
        names = {h: f"p{i}" for i, h in enumerate(p)} | {h: f"q{i}" for i, h in enumerate(q)}
        evicted = []
        while (block := pool.evict()) is not None:
            evicted.append(names[block.prefix_hash])
        assert evicted == expected
        assert pool.stats.evicted_blocks == 7
        # p's blocks 0 and 1 stay: the open sequence uses them (p stays parked for them)
        assert {blk.prefix_hash for blk in pool.blocks()} == set(p[:2])
        assert cells_of(pool, o) == before
        logits = pool.logits(o)
        assert pool.generate(o, 8) == fresh(llm, text[:40], 8)[1]
    np.testing.assert_allclose(logits, fresh(llm, text[:40], 0)[0], rtol=0, atol=ATOL[True])


def test_a_full_cache_evicts_parked_blocks_from_their_tail(llm, text):
    with make(llm, n_ctx=256) as pool:
        a = pool.open(text[:200])
        pool.close(a)  # 192 cells stay parked
        b = pool.open(text[1000:1150])  # needs 150: 64 free, so 86 more (6 blocks) go
        assert pool.stats.evicted_blocks == 6
        assert pool.tokens(a) == text[:96] and pool.used_cells() == 96 + 150
        logits = pool.logits(b)
        continuation = pool.generate(b, 12)  # 10 cells are free; the 11th token evicts
        assert pool.stats.evicted_blocks == 7 and pool.tokens(a) == text[:80]
    ref_logits, ref_continuation = fresh(llm, text[1000:1150], 12, n_ctx=256)
    assert continuation == ref_continuation
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=ATOL[True])


def test_a_sequence_id_is_freed_by_dropping_the_cheapest_parked_sequence(llm, text):
    clock = Clock()
    with make(llm, n_seq_max=4, clock=clock) as pool:
        old = parked(pool, clock, text[3000:3050], 1.0)  # blocks only it holds
        mid = parked(pool, clock, text[4000:4050], 1.5)  # the same, used later
        clock.t = 2.0
        newer = pool.open(text[:48])
        pool.close(newer)
        clock.t = 3.0
        o = pool.open(text[:48] + text[500:520])  # holds all of newer's blocks
        assert pool.holders(pool.table(newer).hashes[-1]) == {newer, o}
        # every id is taken: newer goes first although it is the most recent, since its
        # blocks all live on in o and dropping it loses nothing
        x = pool.open(text[5000:5010])
        assert x == newer and pool.stats.dropped_sequences == 1
        assert len(pool.table(o)) == 4 and pool.parked_ids == [0, 1]
        # then the least recently used: old before mid
        y = pool.open(text[5100:5110])
        assert y == 0 and pool.parked_ids == [1] and pool.table(1).hashes == mid
        assert old not in [pool.table(s).hashes for s in pool.open_ids]
        pool.open(text[5200:5210])
        assert pool.stats.dropped_sequences == 3 and pool.parked_ids == []
        with pytest.raises(PoolError, match="all n_seq_max=4 sequences are open"):
            pool.open(text[10:20])


def test_the_only_parked_sequence_is_reused_when_it_is_the_source(llm, text):
    system = text[:100]
    with make(llm, n_seq_max=2) as pool:
        a = pool.open(system + text[500:530])
        pool.close(a)
        b = pool.open(text[2000:2030])
        # no free id, and a is both the only parked sequence and the source: it is cut
        # back to the shared blocks and goes on as the new sequence
        c = pool.open(system + text[3000:3020])
        assert c == a and pool.open_ids == [a, b] and pool.parked_ids == []
        assert pool.stats.tokens_shared == 96 and pool.stats.dropped_sequences == 0
        assert pool.tokens(c) == system + text[3000:3020]
        assert [blk.ref_count for blk in pool.table(c).blocks] == [1] * 7
        logits = pool.logits(c)
    np.testing.assert_allclose(
        logits, fresh(llm, system + text[3000:3020], 0)[0], rtol=0, atol=ATOL[True]
    )


def test_extend_continues_an_open_sequence(llm, text):
    system = text[:100]
    with make(llm) as pool:
        pool.open(system + text[500:530])
        b = pool.open(system + text[2000:2010])
        logits = pool.extend(b, text[2500:2540])  # a second turn seals two more blocks
        assert pool.tokens(b) == system + text[2000:2010] + text[2500:2540]
        assert len(pool.table(b)) == 9 and np.array_equal(logits, pool.logits(b))
        c = pool.open(pool.tokens(b) + [11])
        assert pool.stats.tokens_shared == 96 + 144
        assert pool.holders(pool.table(b).hashes[-1]) == {b, c}
    ref = fresh(llm, system + text[2000:2010] + text[2500:2540], 0)[0]
    np.testing.assert_allclose(logits, ref, rtol=0, atol=ATOL[True])


def test_a_pool_can_load_its_own_model(tiny_qwen2_path, llm, text):
    kw = {"n_ctx": 256, "n_seq_max": 2, "n_threads": 1, "n_batch": 64, "flash_attn": False}
    with SharedPrefixPool(tiny_qwen2_path, **kw) as own, SharedPrefixPool(llm, **kw) as lent:
        a, b = own.open(text[:50]), lent.open(text[:50])
        assert own.generate(a, 6) == lent.generate(b, 6)
