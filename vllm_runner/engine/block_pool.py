"""KV-cache blocks: ref counts, an LRU queue of free blocks, and the prefix-hash index."""

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set once the block is full and its hash registered


class BlockPool:
    """Owns every block. A free block may still hold cached KV (it keeps its hash) until it is
    reused; free blocks are handed out least-recently-freed first, so cached prefixes survive
    as long as possible."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # NOTE: insertion order is the LRU order; popitem(last=False) takes the oldest.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        # block hash -> the blocks holding that content, by id: two requests that computed the
        # same block each hold a copy, and either one serves a hit while it lasts
        self._cached: dict[bytes, dict[int, KVBlock]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def get_cached_block(self, block_hash: bytes) -> KVBlock | None:
        copies = self._cached.get(block_hash)
        return next(iter(copies.values())) if copies else None

    def allocate(self, count: int) -> list[KVBlock]:
        """Take ``count`` free blocks (evicting their cached content); caller checked room."""
        if count > len(self._free):
            raise ValueError(f"asked for {count} blocks, only {len(self._free)} free")
        out = []
        for _ in range(count):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on cached blocks a new request reuses."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[KVBlock], uncache: bool = False) -> None:
        """Drop a reference; blocks reaching zero join the free queue's tail in the given
        order (callers pass a request's blocks in reverse, so its tail is evicted first).
        ``uncache``: they also lose their hash (content that may never have been written)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if uncache:
                    self._evict(block)
                self._free[block.block_id] = block

    def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, {})[block.block_id] = block

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            copies = self._cached[block.block_hash]
            del copies[block.block_id]
            if not copies:
                del self._cached[block.block_hash]
            block.block_hash = None
