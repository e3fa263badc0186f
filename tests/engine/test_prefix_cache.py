"""Prefix caching in the block manager and the scheduler: naming, reuse, LRU eviction, partitions.

(Randomized runs against a fake paged model are in test_scheduler_random.py; outputs against
transformers in test_engine_prefix_cache.py.)
"""

import pytest

from moeserve.engine.block_manager import BlockManager
from moeserve.engine.prefix_cache import ROOT, block_hash
from moeserve.request import Request, SamplingParams, Sequence

from tests.engine.test_scheduler import make_scheduler, step

BS = 4


def seq_of(tokens: list[int], seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, Request(f"r{seq_id}", tokens, SamplingParams()), 0)


def computed(manager: BlockManager, tokens: list[int], seq_id: int = 0) -> Sequence:
    """A sequence that computed `tokens` (all of them in the KV cache), still holding its blocks."""
    seq = seq_of(tokens, seq_id)
    partition, cached = manager.find_prefix(seq, len(tokens))
    manager.take_prefix(seq, partition, cached)
    manager.allocate_for(seq, len(tokens))
    manager.name_full_blocks(seq, len(tokens))
    return seq


def test_a_block_name_covers_the_whole_prefix():
    a = block_hash(ROOT, [1, 2, 3, 4])
    assert a == block_hash(ROOT, [1, 2, 3, 4])
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(block_hash(ROOT, [0, 2, 3, 4]), [5, 6, 7, 8])
    assert block_hash(ROOT, [1, 2, 3, 4]) != block_hash(ROOT, [1, 2, 3, 5])


def test_a_finished_prefix_is_parked_then_reused_by_reference():
    manager = BlockManager(16, BS, enable_prefix_caching=True)
    first = computed(manager, list(range(1, 11)))              # 10 tokens: 2 full blocks + 2
    full_blocks = first.block_table[:2]
    manager.free(first)
    assert manager.num_free_blocks == 16                       # parked blocks count as free
    second = seq_of(list(range(1, 9)) + [99, 98, 97])          # shares 8 tokens = 2 blocks
    partition, cached = manager.find_prefix(second, 100)
    assert cached == full_blocks
    manager.take_prefix(second, partition, cached)
    third = seq_of(list(range(1, 5)) + [50] * 6, seq_id=2)     # shares the first block only
    manager.take_prefix(third, *manager.find_prefix(third, 100))
    assert third.block_table == full_blocks[:1]
    assert manager.ref_count(full_blocks[0]) == 2 and manager.ref_count(full_blocks[1]) == 1
    manager.check_invariants([second, third])


def test_the_last_token_is_always_left_to_compute():
    manager = BlockManager(16, BS, enable_prefix_caching=True)
    manager.free(computed(manager, list(range(1, 9))))          # exactly 2 full blocks
    again = seq_of(list(range(1, 9)))
    _, cached = manager.find_prefix(again, 100)
    assert len(cached) == 1                                     # block 2 holds the token to sample from


def test_partial_blocks_are_never_named():
    manager = BlockManager(16, BS, enable_prefix_caching=True)
    seq = computed(manager, list(range(1, 7)))                  # 1 full block + 2 tokens
    assert manager.prefix.is_named(seq.block_table[0]) and not manager.prefix.is_named(seq.block_table[1])


def test_eviction_is_least_recently_used_and_tail_first():
    manager = BlockManager(6, BS, enable_prefix_caching=True)
    old = computed(manager, list(range(1, 13)) + [0])          # 3 named blocks + 1 partial
    old_named = old.block_table[:3]
    manager.free(old)                                          # parked: old's 3 named blocks
    new = computed(manager, list(range(100, 109)) + [0], 1)    # 2 named + 1 partial
    assert set(new.block_table).isdisjoint(old_named)          # never-used blocks go first
    new_named = new.block_table[:2]
    manager.free(new)                                          # new's prefix: most recently used
    grab = seq_of([7] * 8, 2)
    manager.allocate_for(grab, 8)                              # 1 unnamed free + 1 evicted
    assert [manager.prefix.is_named(b) for b in old_named] == [True, True, False]   # tail first
    manager.allocate_for(grab, 16)                             # 2 more evicted: old's prefix
    assert not any(manager.prefix.is_named(b) for b in old_named)
    assert all(manager.prefix.is_named(b) for b in new_named)  # new's prefix survived
    manager.check_invariants([grab])


def test_a_held_block_is_never_handed_out():
    manager = BlockManager(4, BS, enable_prefix_caching=True)
    holder = computed(manager, list(range(1, 9)) + [0])        # 3 blocks held
    assert not manager.can_grow(seq_of([5] * 8, 1), 8)         # 2 needed, 1 free
    other = seq_of([5] * 4, 1)
    manager.allocate_for(other, 4)
    assert set(other.block_table).isdisjoint(holder.block_table)
    manager.check_invariants([holder, other])


def test_a_sequence_goes_to_the_partition_holding_its_prefix_when_it_has_room():
    manager = BlockManager(8, BS, num_partitions=2, enable_prefix_caching=True)
    tokens = list(range(1, 10))                                # 2 full blocks + 1
    first = computed(manager, tokens)
    assert manager.partition_of(first) == 0
    manager.free(first)                                        # partition 0: 3 parked, 1 never used
    hog = seq_of([9] * 4, 1)
    manager.allocate_for(hog, 4)                               # takes partition 0's unused block
    assert manager.partition_of(hog) == 0
    short = seq_of(tokens[:8] + [3], 2)                        # needs 1 block beyond the prefix
    partition, cached = manager.find_prefix(short, 100)
    assert partition == 0 and len(cached) == 2
    long = seq_of(tokens[:8] + [3] * 8, 3)                     # needs 2 more: partition 0 has 1
    assert manager.find_prefix(long, 100) == (1, [])           # the least loaded, nothing reused
    assert manager.find_prefix(long, 4)[0] == 0                # a 4-token first chunk fits


def test_scheduler_reuses_a_finished_prompt_and_reports_it():
    scheduler = make_scheduler(enable_prefix_caching=True, max_num_batched_tokens=64)
    first = Request("a", list(range(1, 21)), SamplingParams(max_tokens=2))
    scheduler.add_request(first)
    while scheduler.has_unfinished_requests():
        step(scheduler)
    second = Request("b", list(range(1, 21)) + [40, 41], SamplingParams(max_tokens=2))
    scheduler.add_request(second)
    batch, _ = step(scheduler)
    # 20 prompt tokens + 1 generated token computed in blocks of 4: 5 full blocks = 20 tokens
    assert [(s.start_pos, len(s.token_ids)) for s in batch.seqs] == [(20, 2)]
    assert second.num_cached_tokens == 20
    assert scheduler.prefix_cache_hits == 20
    assert scheduler.prefix_cache_queries == 20 + 22


def test_scheduler_without_caching_recomputes():
    scheduler = make_scheduler(max_num_batched_tokens=64)
    for rid in ("a", "b"):
        scheduler.add_request(Request(rid, list(range(1, 21)), SamplingParams(max_tokens=2)))
        batch, _ = step(scheduler)
        assert batch.seqs[0].start_pos == 0
        while scheduler.has_unfinished_requests():
            step(scheduler)
    assert scheduler.prefix_cache_queries == scheduler.prefix_cache_hits == 0


@pytest.mark.parametrize("caching", [True, False])
def test_preempted_sequence_resumes_from_its_parked_blocks(caching):
    # a and b need 7 blocks each at the end, 12 exist: b (the newest) is preempted, and a's growth
    # evicts only b's tail, so b's prompt blocks are still cached when it resumes.
    scheduler = make_scheduler(num_kv_blocks=12, enable_prefix_caching=caching, max_num_batched_tokens=64)
    a = Request("a", list(range(1, 17)), SamplingParams(max_tokens=12, ignore_eos=True))
    b = Request("b", list(range(50, 66)), SamplingParams(max_tokens=12, ignore_eos=True))
    scheduler.add_request(a)
    scheduler.add_request(b)
    resumed_at = []
    while scheduler.has_unfinished_requests():
        batch, _ = step(scheduler)
        resumed_at += [s.start_pos for s in batch.seqs if s.seq_id == b.seqs[0].seq_id
                       and len(s.token_ids) > 1 and scheduler.num_preemptions]
    assert scheduler.num_preemptions > 0
    assert resumed_at and (resumed_at[-1] > 0) == caching
