"""Block pool and KV cache manager: exact block ids, ref counts and LRU eviction."""

from vllm_runner.engine.block_pool import BlockPool
from vllm_runner.engine.kv_cache_manager import KVCacheManager, hash_block
from vllm_runner.engine.request import Request
from vllm_runner.sampling_params import SamplingParams

BS = 4


def make_request(request_id: str, tokens: list[int], **params) -> Request:
    return Request(request_id, tokens, SamplingParams(**params), max_tokens=16)


def test_pool_allocates_lru_and_frees_to_tail():
    pool = BlockPool(4, enable_caching=True)
    a = pool.allocate(2)
    assert [b.block_id for b in a] == [0, 1]
    assert [b.ref_cnt for b in a] == [1, 1]
    pool.free(list(reversed(a)))  # tail block first: it is evicted first
    assert pool.num_free_blocks == 4
    assert [b.block_id for b in pool.allocate(4)] == [2, 3, 1, 0]


def test_allocate_slots_and_free_counts():
    kv = KVCacheManager(8, BS, enable_caching=True)
    req = make_request("a", list(range(10)))
    assert kv.allocate_slots(req, 10) == [0, 1, 2]
    assert kv.block_ids("a") == [0, 1, 2]
    assert kv.pool.num_used_blocks == 3
    req.num_computed_tokens = 10
    req.output_token_ids.append(99)
    assert kv.allocate_slots(req, 1) == []  # token 11 still fits block 2
    assert kv.block_ids("a") == [0, 1, 2]
    kv.free(req)
    assert kv.pool.num_used_blocks == 0
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_allocate_fails_without_side_effects():
    kv = KVCacheManager(2, BS, enable_caching=False)
    req = make_request("a", list(range(9)))  # needs 3 blocks
    assert kv.allocate_slots(req, 9) is None
    assert kv.pool.num_free_blocks == 2
    assert "a" not in kv.req_blocks


def test_prefix_hit_shares_blocks_with_ref_counts():
    kv = KVCacheManager(10, BS, enable_caching=True)
    a = make_request("a", list(range(12)) + [50, 51])  # 3 full blocks + 2 tokens
    assert kv.allocate_slots(a, a.num_tokens) is not None
    assert kv.block_ids("a") == [0, 1, 2, 3]
    b = make_request("b", list(range(12)) + [60])
    hits, num_hit = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1, 2] and num_hit == 12
    b.num_computed_tokens = 0
    assert kv.allocate_slots(b, b.num_tokens - num_hit, hits) == [0, 1, 2, 4]
    assert kv.block_ids("b") == [0, 1, 2, 4]
    assert [kv.pool.blocks[i].ref_cnt for i in range(5)] == [2, 2, 2, 1, 1]
    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in range(5)] == [1, 1, 1, 0, 1]
    kv.free(b)
    assert kv.pool.num_used_blocks == 0


def test_whole_prompt_hit_keeps_last_token_to_compute():
    kv = KVCacheManager(10, BS, enable_caching=True)
    a = make_request("a", list(range(8)))
    assert kv.allocate_slots(a, 8) is not None
    kv.free(a)
    b = make_request("b", list(range(8)))
    hits, num_hit = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0] and num_hit == 4  # block 1 holds the last token


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    kv = KVCacheManager(4, BS, enable_caching=True)
    a = make_request("a", list(range(9)))  # blocks 0, 1 full; 2 partial
    assert kv.allocate_slots(a, 9) is not None
    kv.free(a)  # free order: 2, 1, 0
    b = make_request("b", list(range(8)) + [7, 7])
    hits, _ = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1]
    # a request with other content takes the LRU free blocks: 3 first, then 2
    c = make_request("c", [100 + i for i in range(8)])
    assert kv.allocate_slots(c, 8) is not None
    assert kv.block_ids("c") == [3, 2]
    # cached blocks 0 and 1 survived; taking one more block evicts block 1 (freed before 0)
    d = make_request("d", [200, 201, 202])
    assert kv.allocate_slots(d, 3) is not None
    assert kv.block_ids("d") == [1]
    assert kv.pool.get_cached_block(b.block_hashes[1]) is None
    assert kv.pool.get_cached_block(b.block_hashes[0]).block_id == 0


def test_a_copy_of_a_cached_block_serves_hits_after_the_first_is_evicted():
    """Two requests that computed the same block (admitted before either cached it) each
    hold a copy; once the first copy is evicted, the second still serves hits."""
    kv = KVCacheManager(6, BS, enable_caching=True)
    a = make_request("a", list(range(4)) + [50])
    b = make_request("b", list(range(4)) + [60])
    assert kv.allocate_slots(a, a.num_tokens) == [0, 1]
    assert kv.allocate_slots(b, b.num_tokens) == [2, 3]  # no hit: a's block was not cached yet
    kv.free(a)  # free order: 1, 0 (then 4, 5 were never used)
    assert kv.pool.get_cached_block(a.block_hashes[0]).block_id in (0, 2)
    c = make_request("c", [100 + i for i in range(12)])
    assert kv.allocate_slots(c, 12) == [4, 5, 1]  # LRU: the never-used blocks, then 1
    d = make_request("d", [200, 201])
    assert kv.allocate_slots(d, 2) == [0]  # evicts a's copy of the shared block
    e = make_request("e", list(range(4)) + [70])
    hits, num_hit = kv.get_computed_blocks(e)
    assert [h.block_id for h in hits] == [2] and num_hit == 4  # b's copy
    assert kv.allocate_slots(e, e.num_tokens - num_hit, hits) is None  # no free block left
    kv.free(b)
    assert kv.allocate_slots(e, e.num_tokens - num_hit, hits) == [2, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in (2, 3)] == [1, 1]
    for r in (c, d, e):
        kv.free(r)
    assert kv.pool.num_used_blocks == 0


def test_prompt_logprobs_requests_skip_the_cache():
    kv = KVCacheManager(10, BS, enable_caching=True)
    a = make_request("a", list(range(9)))
    assert kv.allocate_slots(a, 9) is not None
    b = make_request("b", list(range(9)), prompt_logprobs=0)
    assert kv.get_computed_blocks(b) == ([], 0)


def test_block_identity_is_the_content_not_pythons_hash():
    """Python's hash() maps distinct ints together (it is taken mod 2**61 - 1, and
    hash(-1) == hash(-2)), so it cannot name a block's content: prompts crafted to collide
    would read another request's cached KV. The digest changes with every token and parent."""
    twin = 5 + (2**61 - 1)
    assert hash(twin) == hash(5)
    assert hash_block(None, [1, 2, 3, twin]) != hash_block(None, [1, 2, 3, 5])
    assert hash_block(None, [-1] * BS) != hash_block(None, [-2] * BS)
    parent = hash_block(None, [1, 2, 3, 4])
    assert hash_block(parent, [5, 6, 7, 8]) != hash_block(
        hash_block(None, [1, 2, 3, 5]), [5, 6, 7, 8]
    )
    assert hash_block(parent, [5, 6, 7, 8]) == hash_block(
        hash_block(None, [1, 2, 3, 4]), [5, 6, 7, 8]
    )


def test_hits_held_by_a_running_request_take_no_free_room():
    """Only a hit on a free (evictable) block uses up free room; b's hits are held by a, so
    its one new block fits in the last free block."""
    kv = KVCacheManager(4, BS, enable_caching=True)
    a = make_request("a", list(range(9)))
    assert kv.allocate_slots(a, 9) == [0, 1, 2]
    b = make_request("b", list(range(8)) + [50])
    hits, num_hit = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and num_hit == 8
    assert kv.allocate_slots(b, 1, hits) == [0, 1, 3]
    assert [blk.ref_cnt for blk in kv.pool.blocks] == [2, 2, 1, 1]
    assert kv.pool.num_free_blocks == 0


def test_a_preempted_request_caches_the_blocks_it_recomputes():
    """Freed (preempted), its cached blocks evicted by another request, then admitted again:
    the blocks it computes anew are registered again, so a later request hits them."""
    kv = KVCacheManager(4, BS, enable_caching=True)
    a = make_request("a", list(range(9)))
    assert kv.allocate_slots(a, 9) == [0, 1, 2]
    kv.free(a)  # preempted: free order 2, 1, 0
    other = make_request("o", [100 + i for i in range(16)])
    assert kv.allocate_slots(other, 16) == [3, 2, 1, 0]  # evicts a's blocks
    kv.free(other)
    assert kv.get_computed_blocks(a) == ([], 0)
    assert kv.allocate_slots(a, 9) == [0, 1, 2]
    c = make_request("c", list(range(8)) + [42])
    hits, num_hit = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0, 1] and num_hit == 8


def test_a_block_filled_by_decoded_tokens_is_cached():
    """Prompt 6 tokens; the 7th and 8th are decoded into block 1, which is hashed when the
    step that computes its last slot is allocated: a prompt of those 8 tokens (the next
    turn of a chat) hits both blocks."""
    kv = KVCacheManager(4, BS, enable_caching=True)
    a = make_request("a", list(range(6)))
    assert kv.allocate_slots(a, 6) == [0, 1]
    for token in (6, 7):  # sampled, then scheduled as a decode step
        a.num_computed_tokens = a.num_tokens
        a.output_token_ids.append(token)
        assert kv.allocate_slots(a, 1) == []
    assert kv.pool.blocks[1].block_hash == a.block_hashes[1]
    c = make_request("c", list(range(8)) + [42])
    hits, num_hit = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0, 1] and num_hit == 8


def test_uncache_on_error_keeps_blocks_another_request_holds():
    """A failed request's own blocks leave the prefix cache; the shared prefix blocks that a
    running request still holds keep their hashes (and keep serving hits)."""
    kv = KVCacheManager(6, BS, enable_caching=True)
    a = make_request("a", list(range(9)))
    assert kv.allocate_slots(a, 9) == [0, 1, 2]
    b = make_request("b", list(range(8)) + [50, 51, 52, 53, 54])
    hits, _ = kv.get_computed_blocks(b)
    assert kv.allocate_slots(b, 5, hits) == [0, 1, 3, 4]
    kv.free(b, uncache=True)
    assert [blk.ref_cnt for blk in kv.pool.blocks] == [1, 1, 1, 0, 0, 0]
    assert kv.pool.blocks[3].block_hash is None  # b's own full block: gone from the index
    assert kv.pool.get_cached_block(b.block_hashes[2]) is None
    c = make_request("c", list(range(8)) + [42])
    hits, num_hit = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0, 1] and num_hit == 8
