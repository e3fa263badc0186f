"""Expert placement and the per-rank KV partitions of the block manager (plain Python)."""

from __future__ import annotations

import pytest

from moeserve.engine.block_manager import BlockManager
from moeserve.parallel.expert_parallel import ExpertPlacement


@pytest.mark.parametrize("experts, ranks, sizes", [(8, 1, [8]), (8, 2, [4, 4]), (8, 3, [3, 3, 2]),
                                                   (60, 7, [9, 9, 9, 9, 8, 8, 8]), (5, 5, [1] * 5)])
def test_placement_is_contiguous_and_covers_every_expert(experts, ranks, sizes):
    placement = ExpertPlacement(experts, ranks)
    assert placement.sizes == sizes
    seen = [e for r in range(ranks) for e in placement.experts_of(r)]
    assert seen == list(range(experts))
    for rank in range(ranks):
        for local, expert in enumerate(placement.experts_of(rank)):
            assert placement.owner(expert) == (rank, local)


def test_placement_refuses_more_ranks_than_experts():
    with pytest.raises(ValueError, match="every rank needs at least one expert"):
        ExpertPlacement(4, 5)
    with pytest.raises(ValueError, match="outside"):
        ExpertPlacement(4, 2).owner(4)


class Holder:
    def __init__(self):
        self.block_table = []


def test_partitions_keep_each_sequence_in_one_rank_and_balance_new_ones():
    blocks = BlockManager(num_blocks=12, block_size=4, num_partitions=3)
    seqs = [Holder() for _ in range(4)]
    for seq in seqs:
        blocks.allocate_for(seq, 6)            # 2 blocks each
    partitions = [blocks.partition_of(s) for s in seqs]
    assert partitions[:3] == [0, 1, 2] and partitions[3] == 0   # fewest holders, then most free
    blocks.allocate_for(seqs[1], 16)          # grows inside partition 1 only
    assert all(b // 4 == 1 for b in seqs[1].block_table) and len(seqs[1].block_table) == 4
    assert not blocks.can_grow(seqs[1], 17)   # partition 1 is full although others have room
    assert blocks.can_allocate(2)
    blocks.check_invariants(seqs)
    for seq in seqs:
        blocks.free(seq)
    assert blocks.num_free_blocks == 12
    blocks.check_invariants([])


def test_fork_shares_blocks_inside_the_parent_partition():
    blocks = BlockManager(num_blocks=8, block_size=4, num_partitions=2)
    first, parent, child = Holder(), Holder(), Holder()
    blocks.allocate_for(first, 4)
    blocks.allocate_for(parent, 9)
    assert blocks.partition_of(parent) == 1
    assert blocks.fork(parent, child, 8) == 8
    assert blocks.partition_of(child) == 1
    blocks.allocate_for(child, 12)
    assert all(b // 4 == 1 for b in child.block_table)
    blocks.check_invariants([first, parent, child])


def test_uneven_partitions_are_refused():
    with pytest.raises(ValueError, match="equal partitions"):
        BlockManager(num_blocks=7, block_size=4, num_partitions=2)


def test_a_new_sequence_goes_where_it_fits():
    blocks = BlockManager(num_blocks=8, block_size=4, num_partitions=2)
    big, small, new = Holder(), Holder(), Holder()
    blocks.allocate_for(big, 16)        # partition 0 full
    blocks.allocate_for(small, 4)       # partition 1: 3 free, but it holds as many sequences
    blocks.free(big)
    blocks.allocate_for(big, 13)        # back in partition 0 (fewest holders tie, most free): 0 free
    assert blocks.partition_of(big) == 0 and blocks.partition_of(small) == 1
    assert blocks.can_grow(new, 8)      # partition 1 has room for 2 blocks
    blocks.allocate_for(new, 8)
    assert blocks.partition_of(new) == 1
    blocks.check_invariants([big, small, new])
