"""Maps requests to KV blocks: prefix-cache lookups, slot allocation and freeing."""

import hashlib
from array import array

from vllm_runner.engine.block_pool import BlockPool, KVBlock
from vllm_runner.engine.request import Request


def hash_block(parent_hash: bytes | None, tokens: list[int]) -> bytes:
    """A full block's identity: SHA-256 of its parent's digest (so of every token before it)
    and its tokens. NOTE: not Python's hash(): that is fixed for ints and cheap to invert, so
    a prompt could be crafted to collide with another's cached block (a common system prompt,
    say) and have later requests read its KV instead of their own. ~1.4 us a block."""
    return hashlib.sha256((parent_hash or b"") + array("q", tokens).tobytes()).digest()


class KVCacheManager:
    """Never touches tensors: it hands out block ids that the model runner writes into."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # how many of a request's blocks are hashed

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def _extend_hashes(self, request: Request, num_tokens: int) -> None:
        bs = self.block_size
        while (len(request.block_hashes) + 1) * bs <= num_tokens:
            i = len(request.block_hashes)
            parent = request.block_hashes[-1] if i else None
            if not i and request.lora_request is not None:  # (its adapter's KV is its own)
                parent = request.lora_request.hash_root()
            request.block_hashes.append(
                hash_block(parent, request.token_slice(i * bs, i * bs + bs))
            )

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of full blocks. The last prompt token is always recomputed
        so the request has logits to sample from (or its hidden state to pool)."""
        if not self.enable_caching or not request.reads_prefix_cache:
            return [], 0
        self._extend_hashes(request, request.num_tokens)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[KVBlock] = ()
    ) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens after the computed ones. Returns the
        ids of the blocks added (cache hits first), or None (changing nothing) when the pool
        is short."""
        blocks = self.req_blocks.get(request.request_id)
        if blocks and not new_computed_blocks:  # fast path: a decode step in its last block
            total = request.num_computed_tokens + num_new_tokens
            if total <= len(blocks) * self.block_size:
                # (a block can be newly full only once ``total`` reaches past the hashed ones)
                hashed = self.num_cached_blocks.get(request.request_id, 0)
                if self.enable_caching and total >= (hashed + 1) * self.block_size:
                    self._cache_full_blocks(request, blocks, total)
                return []
        if blocks is None:
            blocks = self.req_blocks[request.request_id] = []
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        need = -(-total // self.block_size) - len(blocks) - len(new_computed_blocks)
        # Cached blocks with no owner sit in the free queue; touching them uses up free room.
        evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - evictable_hits:
            if not blocks:
                del self.req_blocks[request.request_id]
            return None
        added = list(new_computed_blocks)
        self.pool.touch(added)
        if need > 0:
            added.extend(self.pool.allocate(need))
        blocks.extend(added)
        self._cache_full_blocks(request, blocks, total)
        return [b.block_id for b in added]

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        """Register blocks that are full once this step's tokens are computed."""
        if not self.enable_caching:
            return
        # Only tokens already known can be hashed (a decode step's slot is for a token
        # whose value is known: the last sampled one).
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return  # nothing newly full: the common decode step
        self._extend_hashes(request, num_full * self.block_size)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self.num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request, uncache: bool = False) -> None:
        """``uncache``: the request failed; blocks are hashed when scheduled, before their
        KV is computed, so its blocks no one else holds leave the prefix cache."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.pool.free(list(reversed(blocks)), uncache)
