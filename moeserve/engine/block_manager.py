"""Paged KV cache bookkeeping: which block ids each sequence holds, and how many holders a block has.

The cache is num_blocks blocks of block_size token slots. A sequence's block_table lists its block
ids in position order: position p lives in block block_table[p // block_size], slot p % block_size.
Only blocks that are full and never written again are shared, so a shared block never needs
copying: by forking (n > 1), and with prefix caching (engine/prefix_cache.py) by every sequence
whose tokens start with the same full blocks. With prefix caching a full block nobody holds stays
named and parked until a block is needed and no never-used one is left (LRU). Plain Python: no torch.

With expert parallelism in alltoall mode each rank holds its own KV cache, so the block ids are
split into num_partitions equal ranges, one per rank: a sequence takes all its blocks from one
partition (the rank that runs its attention), chosen when it gets its first block as the one
holding the fewest sequences, then the most free blocks.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Iterable, Protocol

from moeserve.engine.prefix_cache import PrefixIndex, extend_hashes


class HoldsBlocks(Protocol):
    """What the block manager needs from a sequence (moeserve.request.Sequence has it)."""

    block_table: list[int]


class CachesPrefix(HoldsBlocks, Protocol):
    """What prefix caching needs besides (moeserve.request.Sequence has it)."""

    token_ids: list[int]
    block_hashes: list[bytes]     # names of the leading full blocks of token_ids, grown lazily
    num_named_blocks: int         # leading blocks of block_table already offered to the index


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, num_partitions: int = 1,
                 enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_partitions < 1 or num_blocks % num_partitions:
            raise ValueError(f"{num_blocks} blocks do not split into {num_partitions} equal partitions")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks_per_partition = num_blocks // num_partitions
        per = self.blocks_per_partition
        self._free_lists = [deque(range(p * per, (p + 1) * per)) for p in range(num_partitions)]
        self._holders = [0] * num_partitions        # sequences holding blocks, per partition
        self._ref_counts = [0] * num_blocks
        self.prefix = PrefixIndex(num_partitions) if enable_prefix_caching else None

    @property
    def num_partitions(self) -> int:
        return len(self._free_lists)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds: never used, or parked by the prefix cache."""
        return sum(self._num_free(p) for p in range(self.num_partitions))

    def _num_free(self, partition: int) -> int:
        parked = self.prefix.num_parked(partition) if self.prefix is not None else 0
        return len(self._free_lists[partition]) + parked

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one sequence, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def partition_of(self, seq: HoldsBlocks, num_blocks: int = 0) -> int:
        """The partition seq's blocks come from: its own, or for a sequence holding none the least
        loaded of those with num_blocks free (of all, if none has)."""
        if seq.block_table:
            return seq.block_table[0] // self.blocks_per_partition
        if len(self._free_lists) == 1:
            return 0
        parts = range(len(self._free_lists))
        roomy = [p for p in parts if self._num_free(p) >= num_blocks] or parts
        return min(roomy, key=lambda p: (self._holders[p], -self._num_free(p)))

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: HoldsBlocks, num_tokens: int) -> int:
        """New blocks seq needs so that its table covers positions [0, num_tokens)."""
        return max(0, self.blocks_for_tokens(num_tokens) - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        """Whether a new sequence could get num_blocks blocks (from its would-be partition)."""
        return num_blocks <= max(self._num_free(p) for p in range(self.num_partitions))

    def can_grow(self, seq: HoldsBlocks, num_tokens: int) -> bool:
        needed = self.blocks_needed(seq, num_tokens)
        return needed <= self._num_free(self.partition_of(seq, needed))

    def allocate_for(self, seq: HoldsBlocks, num_tokens: int) -> None:
        """Grow seq.block_table to cover num_tokens tokens; no-op if it already does."""
        needed = self.blocks_needed(seq, num_tokens)
        partition = self.partition_of(seq, needed)
        if needed > self._num_free(partition):
            raise RuntimeError(f"need {needed} KV blocks but only {self._num_free(partition)} are "
                               "free; check can_grow() first")
        table = seq.block_table
        if needed and not table:
            self._holders[partition] += 1
        for _ in range(needed):
            block_id = self._take_free(partition)
            self._ref_counts[block_id] = 1
            table.append(block_id)

    def _take_free(self, partition: int) -> int:
        """A never-used block, else the least recently used parked one (its name is forgotten)."""
        free = self._free_lists[partition]
        return free.popleft() if free else self.prefix.evict(partition)

    def free(self, seq: HoldsBlocks) -> None:
        """Drop seq's hold on its blocks; blocks nobody holds return to the free list."""
        table = seq.block_table
        # A new list rather than clear(): a batch already handed to the runner may still read the
        # old one, and it must not change under it.
        seq.block_table = []
        if self.prefix is not None:
            seq.num_named_blocks = 0
        if not table:
            return
        partition = table[0] // self.blocks_per_partition
        self._holders[partition] -= 1
        free, prefix = self._free_lists[partition], self.prefix
        # Tail first: a parked sequence's last blocks are the first evicted, its prefix the last.
        for block_id in reversed(table):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if prefix is not None and prefix.is_named(block_id):
                    prefix.park(partition, block_id)
                else:
                    free.append(block_id)

    # ---- prefix caching (enable_prefix_caching=True) ----
    def find_prefix(self, seq: CachesPrefix, max_new_tokens: int) -> tuple[int, list[int]]:
        """(partition, block ids) of the longest cached prefix of seq's tokens, for a sequence that
        holds no blocks. At least its last token is left to compute, so that it can sample. With
        several partitions: the one holding the longest prefix among those with room for the
        next max_new_tokens besides it, else the least loaded with nothing reused."""
        if seq.block_table:
            raise ValueError("find_prefix() is for a sequence that holds no blocks")
        num_tokens, bs = len(seq.token_ids), self.block_size
        max_blocks = (num_tokens - 1) // bs
        hashes = extend_hashes(seq.block_hashes, seq.token_ids, max_blocks, bs)[:max_blocks]
        best: tuple[int, list[int]] = (0, [])
        for partition in range(self.num_partitions):
            found = self.prefix.lookup(partition, hashes)
            if len(found) <= len(best[1]):
                continue
            needed = self.blocks_for_tokens(min(num_tokens, len(found) * bs + max_new_tokens)) - len(found)
            if self.can_admit(partition, found, needed):
                best = (partition, found)
        if best[1]:
            return best
        return self.partition_of(seq, self.blocks_for_tokens(min(num_tokens, max_new_tokens))), []

    def can_admit(self, partition: int, cached: list[int], num_new_blocks: int) -> bool:
        """Whether a sequence reusing `cached` in `partition` could get num_new_blocks more."""
        reusable = sum(1 for b in cached if self.prefix is not None and self.prefix.is_parked(b, partition))
        return num_new_blocks <= self._num_free(partition) - reusable

    def take_prefix(self, seq: CachesPrefix, partition: int, cached: list[int]) -> None:
        """seq (holding no blocks) starts with the cached blocks; it holds them from now on."""
        if seq.block_table:
            raise ValueError("take_prefix() is for a sequence that holds no blocks")
        if not cached:
            return
        for block_id in cached:
            if self._ref_counts[block_id] == 0:
                self.prefix.unpark(partition, block_id)
            self._ref_counts[block_id] += 1
        self._holders[partition] += 1
        seq.block_table = list(cached)
        seq.num_named_blocks = len(cached)

    def name_full_blocks(self, seq: CachesPrefix, num_computed_tokens: int) -> None:
        """Offers seq's blocks that its computed tokens now fill to the prefix index."""
        num_full = min(num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_named_blocks:
            return
        partition = self.partition_of(seq)
        hashes = extend_hashes(seq.block_hashes, seq.token_ids, num_full, self.block_size)
        for i in range(seq.num_named_blocks, num_full):
            self.prefix.add(partition, hashes[i], seq.block_table[i])
        seq.num_named_blocks = num_full

    def fork(self, parent: HoldsBlocks, child: HoldsBlocks, num_tokens: int) -> int:
        """Share with child the parent's blocks that lie wholly inside positions [0, num_tokens).

        Only whole blocks are shared, so the child writes its own tokens past them into blocks of
        its own and no shared block is ever written. Returns the number of tokens the shared blocks
        cover: the child's num_computed_tokens.
        """
        if child.block_table:
            raise ValueError("fork() needs a child that holds no blocks yet")
        num_shared = min(num_tokens // self.block_size, len(parent.block_table))
        child.block_table = parent.block_table[:num_shared]
        if num_shared:
            self._holders[self.partition_of(parent)] += 1
        for block_id in child.block_table:
            self._ref_counts[block_id] += 1
        return num_shared * self.block_size

    def check_invariants(self, live_seqs: Iterable[HoldsBlocks]) -> None:
        """Raise AssertionError unless ref counts match the live block tables exactly.

        For tests and debugging: O(total blocks). live_seqs must be every sequence holding blocks.
        """
        holders: Counter[int] = Counter()
        seqs_per_partition = [0] * self.num_partitions
        for seq in live_seqs:
            if len(set(seq.block_table)) != len(seq.block_table):
                raise AssertionError(f"a block table lists a block twice: {seq.block_table}")
            if seq.block_table:
                partition = self.partition_of(seq)
                seqs_per_partition[partition] += 1
                if any(b // self.blocks_per_partition != partition for b in seq.block_table):
                    raise AssertionError(f"a block table spans partitions: {seq.block_table}")
            holders.update(seq.block_table)
        for block_id, count in enumerate(self._ref_counts):
            if count != holders.get(block_id, 0):
                raise AssertionError(f"block {block_id}: ref count {count}, "
                                     f"held by {holders.get(block_id, 0)} live sequences")
        free_ids = [b for free_list in self._free_lists for b in free_list]
        if self.prefix is not None:
            self.prefix.check(self._ref_counts)
            free_ids += self.prefix.parked_ids()
        free = set(free_ids)
        if len(free) != len(free_ids):
            raise AssertionError("the free list holds a block twice")
        if free & holders.keys():
            raise AssertionError(f"blocks both free and held: {sorted(free & holders.keys())}")
        if len(free) + len(holders) != self.num_blocks:
            raise AssertionError(f"{len(free)} free + {len(holders)} held != {self.num_blocks} blocks")
        if seqs_per_partition != self._holders:
            raise AssertionError(f"holders per partition {self._holders}, expected {seqs_per_partition}")
