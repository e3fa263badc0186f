"""BlockManager: allocation, freeing, fork sharing, ref counts, the invariant checker."""

import subprocess
import sys

import pytest

from moeserve.engine.block_manager import BlockManager


class Holder:
    """The one attribute the block manager reads from a sequence."""

    def __init__(self) -> None:
        self.block_table: list[int] = []


def test_allocate_covers_tokens_and_is_idempotent():
    blocks = BlockManager(num_blocks=8, block_size=4)
    seq = Holder()
    blocks.allocate_for(seq, 1)
    assert len(seq.block_table) == 1
    blocks.allocate_for(seq, 4)                      # still inside the first block
    assert len(seq.block_table) == 1
    blocks.allocate_for(seq, 9)                      # ceil(9 / 4) = 3
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert blocks.num_free_blocks == 5
    assert blocks.usage == pytest.approx(3 / 8)
    assert blocks.blocks_needed(seq, 12) == 0 and blocks.blocks_needed(seq, 13) == 1
    blocks.check_invariants([seq])


def test_allocation_beyond_free_raises_and_changes_nothing():
    blocks = BlockManager(num_blocks=2, block_size=4)
    seq = Holder()
    assert blocks.can_allocate(2) and not blocks.can_allocate(3)
    assert not blocks.can_grow(seq, 9)
    with pytest.raises(RuntimeError, match="KV blocks"):
        blocks.allocate_for(seq, 9)
    assert seq.block_table == [] and blocks.num_free_blocks == 2


def test_free_returns_blocks_and_gives_a_new_table():
    blocks = BlockManager(num_blocks=4, block_size=2)
    seq = Holder()
    blocks.allocate_for(seq, 7)
    old_table = seq.block_table
    blocks.free(seq)
    assert blocks.num_free_blocks == 4 and blocks.usage == 0.0
    assert seq.block_table == [] and len(old_table) == 4   # a batch holding old_table keeps it
    blocks.check_invariants([seq])


def test_fork_shares_only_full_blocks():
    blocks = BlockManager(num_blocks=10, block_size=4)
    parent, child = Holder(), Holder()
    blocks.allocate_for(parent, 10)                  # 3 blocks, the last one half full
    covered = blocks.fork(parent, child, num_tokens=10)
    assert covered == 8 and child.block_table == parent.block_table[:2]
    assert [blocks.ref_count(b) for b in parent.block_table] == [2, 2, 1]
    blocks.allocate_for(child, 11)                   # the child's tail goes in a block of its own
    assert child.block_table[2] not in parent.block_table
    blocks.check_invariants([parent, child])
    blocks.free(parent)
    assert [blocks.ref_count(b) for b in child.block_table] == [1, 1, 1]
    assert blocks.num_free_blocks == 7
    blocks.free(child)
    assert blocks.num_free_blocks == 10
    blocks.check_invariants([])


def test_fork_into_a_child_with_blocks_is_refused():
    blocks = BlockManager(num_blocks=4, block_size=2)
    parent, child = Holder(), Holder()
    blocks.allocate_for(parent, 4)
    blocks.allocate_for(child, 1)
    with pytest.raises(ValueError):
        blocks.fork(parent, child, 4)


def test_check_invariants_catches_corruption():
    blocks = BlockManager(num_blocks=4, block_size=2)
    seq = Holder()
    blocks.allocate_for(seq, 4)
    with pytest.raises(AssertionError, match="ref count"):
        blocks.check_invariants([])                  # a holder the caller forgot
    seq.block_table.append(seq.block_table[0])
    with pytest.raises(AssertionError, match="twice"):
        blocks.check_invariants([seq])


@pytest.mark.parametrize("num_blocks, block_size", [(0, 16), (4, 0)])
def test_bad_sizes_are_rejected(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_engine_bookkeeping_imports_no_torch():
    code = ("import sys, moeserve.engine.scheduler, moeserve.engine.block_manager, moeserve.request;"
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
