"""Automatic prefix caching: full KV blocks found again by the tokens they hold.

A full block is named by a hash of its tokens chained with the previous block's hash (sha256,
so a name is the whole prefix up to and including the block: two prompts that share a block's
name share every token before it). Each KV partition (one per expert-parallel rank in alltoall
mode, else one) keeps its own index, name -> block id, because a rank reads only its own cache.

A block nobody holds any more stays indexed, parked in a least-recently-used order, until the
block manager needs a block and no never-used one is left: then the least recently used parked
block is evicted (its name forgotten) and handed out. The block manager owns ref counts and free
lists; this module only names, finds, parks and evicts. Plain Python: no torch.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

ROOT = b""   # the "previous block" of a prompt's first block


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The name of a full block holding `tokens` after the prefix named `parent`."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


def extend_hashes(hashes: list[bytes], token_ids: list[int], num_blocks: int, block_size: int) -> list[bytes]:
    """Grows `hashes` (names of the leading full blocks of token_ids) to num_blocks, in place."""
    for i in range(len(hashes), num_blocks):
        parent = hashes[-1] if hashes else ROOT
        hashes.append(block_hash(parent, token_ids[i * block_size:(i + 1) * block_size]))
    return hashes


class PrefixIndex:
    """name -> block id per partition, plus the parked (ref count 0) blocks in LRU order."""

    def __init__(self, num_partitions: int) -> None:
        self._blocks: list[dict[bytes, int]] = [{} for _ in range(num_partitions)]
        self._name_of: dict[int, bytes] = {}                       # block id -> its name
        self._parked: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_partitions)]

    def num_parked(self, partition: int) -> int:
        return len(self._parked[partition])

    def is_parked(self, block_id: int, partition: int) -> bool:
        return block_id in self._parked[partition]

    def is_named(self, block_id: int) -> bool:
        return block_id in self._name_of

    def lookup(self, partition: int, hashes: list[bytes]) -> list[int]:
        """Block ids of the longest prefix of `hashes` this partition holds."""
        index, found = self._blocks[partition], []
        for name in hashes:
            block_id = index.get(name)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def add(self, partition: int, name: bytes, block_id: int) -> bool:
        """Names a block that was just filled; False (and nothing changes) when the partition
        already holds that prefix in another block (two sequences computed it side by side)."""
        index = self._blocks[partition]
        if name in index or block_id in self._name_of:
            return False
        index[name] = block_id
        self._name_of[block_id] = name
        return True

    def park(self, partition: int, block_id: int) -> None:
        """A named block nobody holds: most recently used from now on."""
        self._parked[partition][block_id] = None

    def unpark(self, partition: int, block_id: int) -> None:
        """A parked block is held again (a new request hit it)."""
        del self._parked[partition][block_id]

    def evict(self, partition: int) -> int:
        """Forgets the least recently used parked block of the partition and returns its id."""
        block_id, _ = self._parked[partition].popitem(last=False)
        del self._blocks[partition][self._name_of.pop(block_id)]
        return block_id

    def parked_ids(self) -> list[int]:
        return [b for parked in self._parked for b in parked]

    def check(self, ref_counts: list[int]) -> None:
        """AssertionError unless the index and the parked order agree with the ref counts."""
        for partition, index in enumerate(self._blocks):
            for name, block_id in index.items():
                if self._name_of.get(block_id) != name:
                    raise AssertionError(f"block {block_id} indexed under a name it does not have")
            for block_id in self._parked[partition]:
                if ref_counts[block_id] != 0 or block_id not in self._name_of:
                    raise AssertionError(f"parked block {block_id}: ref count {ref_counts[block_id]}")
        if sum(len(index) for index in self._blocks) != len(self._name_of):
            raise AssertionError("a named block is missing from its partition's index")
