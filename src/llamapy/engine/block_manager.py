"""KV-cache blocks: ref-counted, a free list, and automatic prefix caching. No torch.

Prefix caching (as vLLM's): a block whose `block_size` tokens are all computed gets a hash
chained with its predecessor's, so equal hashes mean equal prefixes. A later sequence
with the same prefix takes those blocks (ref count + 1) instead of computing them. A freed
block keeps its hash and contents until it is handed out again: free blocks are reused in
least-recently-freed order, so cached prefixes are evicted LRU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq

from llamapy.engine.sequence import Sequence

NO_HASH = None


def chain_hash(prev: int | None, tokens: Seq[int]) -> int:
    """Hash of a full block given its predecessor's hash (Python's int-tuple hash is
    deterministic: no PYTHONHASHSEED dependence for ints)."""
    return hash((prev, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"need positive num_blocks and block_size, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [NO_HASH] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Free blocks in the order they should be reused (oldest freed first).
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Per sequence: hashes of its full, computed blocks (index = block position).
        self._seq_hashes: dict[int, list[int]] = {}
        self.num_prefix_queries = 0  # tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of which found

    # -- accounting ----------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so its table covers `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # -- allocation ----------------------------------------------------------------------

    def _take_free_block(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        old = self.block_hashes[block_id]
        if old is not NO_HASH and self.hash_to_block.get(old) == block_id:
            del self.hash_to_block[old]  # evict the cached contents
        self.block_hashes[block_id] = NO_HASH
        self.ref_counts[block_id] = 1
        return block_id

    def _acquire(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self.free_blocks[block_id]
        self.ref_counts[block_id] += 1

    def admit(self, seq: Sequence) -> None:
        """Give a new (or preempted) sequence the cached blocks of its longest cached prefix.

        Sets `num_computed_tokens`; at least the last prompt token is always left to compute,
        since its logits are needed."""
        assert not seq.block_table, "admit() on a sequence that holds blocks"
        hashes: list[int] = []
        if self.enable_prefix_caching:
            prev = None
            max_blocks = (len(seq) - 1) // self.block_size
            for i in range(max_blocks):
                h = chain_hash(
                    prev, seq.tokens_between(i * self.block_size, (i + 1) * self.block_size)
                )
                block_id = self.hash_to_block.get(h)
                if block_id is None:
                    break
                self._acquire(block_id)
                seq.block_table.append(block_id)
                hashes.append(h)
                prev = h
            self.num_prefix_queries += len(seq)
            self.num_prefix_hits += len(hashes) * self.block_size
        self._seq_hashes[seq.seq_id] = hashes
        seq.num_computed_tokens = seq.num_cached_tokens = len(hashes) * self.block_size

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table to cover `num_tokens` tokens."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {needed}, have {self.num_free_blocks}")
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the hashes of `seq`'s blocks that became full and computed."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        num_full = seq.num_computed_tokens // self.block_size
        bs = self.block_size
        while len(hashes) < num_full:
            i = len(hashes)
            h = chain_hash(hashes[-1] if hashes else None, seq.tokens_between(i * bs, (i + 1) * bs))
            hashes.append(h)
            block_id = seq.block_table[i]
            if h not in self.hash_to_block:
                self.hash_to_block[h] = block_id
                self.block_hashes[block_id] = h

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks; blocks no one holds go back to the free list (last in
        reuse order, so their cached contents live longest). Later blocks are freed first so
        that a prefix's tail is evicted before its head."""
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_blocks[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._seq_hashes.pop(seq.seq_id, None)

    def slot(self, seq: Sequence, position: int) -> int:
        """The flat cache slot of token `position` of `seq`."""
        return (
            seq.block_table[position // self.block_size] * self.block_size
            + position % self.block_size
        )
