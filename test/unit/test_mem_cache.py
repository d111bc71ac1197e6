"""Memory layer: KV pools, token allocators, radix prefix cache, chunk cache.

References are independent of the code under test: hand-computed slot numbers, a brute-force
longest-common-prefix over inserted sequences, and a simulated scheduler that stamps every written KV
slot with the hash of the token prefix it holds, so any slot freed while still in use (or handed to
two owners) shows up as a wrong stamp.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import pytest
import torch

from sglx.srt.mem_cache.allocator import (
    PagedTokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
    make_token_allocator,
)
from sglx.srt.mem_cache.chunk_cache import ChunkCache
from sglx.srt.mem_cache.memory_pool import (
    MHATokenToKVPool,
    NoOpKVPool,
    ReqToTokenPool,
    profile_max_num_tokens,
)
from sglx.srt.mem_cache.radix_cache import RadixCache


# ============================================================================ pools
def test_req_to_token_pool():
    pool = ReqToTokenPool(size=3, max_context_len=8, device="cpu")
    assert pool.req_to_token.shape == (4, 8) and pool.req_to_token.dtype == torch.int32
    got = [pool.alloc() for _ in range(3)]
    assert sorted(got) == [1, 2, 3]  # row 0 is padding, never handed out
    assert pool.alloc() is None and pool.available_size() == 0
    pool.write(got[0], 2, torch.tensor([7, 8, 9], dtype=torch.int64))
    assert pool.req_to_token[got[0]].tolist() == [0, 0, 7, 8, 9, 0, 0, 0]
    pool.free(got[1])
    with pytest.raises(ValueError):
        pool.free(got[1])
    with pytest.raises(ValueError):
        pool.free(0)
    assert pool.alloc() == got[1]
    pool.clear()
    assert pool.available_size() == 3


def test_mha_pool_set_get_and_size():
    pool = MHATokenToKVPool(size=8, page_size=4, dtype=torch.float32, head_num=2, head_dim=3,
                            layer_num=2, device="cpu", v_head_dim=5)
    assert pool.get_key_buffer(1).shape == (12, 2, 3) and pool.get_value_buffer(1).shape == (12, 2, 5)
    assert pool.mem_usage_bytes() == 2 * 12 * 2 * (3 + 5) * 4
    assert MHATokenToKVPool.cell_size_bytes(2, 3, 2, torch.float32, 5) == 2 * 2 * (3 + 5) * 4
    loc = torch.tensor([4, 9, 11])
    k, v = torch.randn(3, 2, 3), torch.randn(3, 2, 5)
    pool.set_kv_buffer(1, loc, k, v)
    kb, vb = pool.get_kv_buffer(1)
    assert torch.equal(kb[loc], k) and torch.equal(vb[loc], v)
    assert pool.get_key_buffer(0).abs().sum() == 0  # other layer untouched
    untouched = [i for i in range(12) if i not in (4, 9, 11)]
    assert kb[untouched].abs().sum() == 0
    # Writes of a different model dtype are cast to the pool dtype.
    pool.set_kv_buffer(0, torch.tensor([5]), k[:1].to(torch.bfloat16), v[:1].to(torch.bfloat16))
    assert torch.equal(pool.get_key_buffer(0)[5], k[0].to(torch.bfloat16).float())


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_mha_pool_fp8_round_trip(fp8):
    pool = MHATokenToKVPool(size=4, page_size=1, dtype=fp8, head_num=1, head_dim=4, layer_num=1, device="cpu")
    assert pool.k_buffer[0].dtype == torch.uint8 and pool.get_key_buffer(0).dtype == fp8
    k = torch.tensor([[[0.5, -1.25, 2.0, 3.3]], [[-0.1, 7.0, 100.0, -0.03]]], dtype=torch.bfloat16)
    v = -k
    loc = torch.tensor([1, 3])
    pool.set_kv_buffer(0, loc, k, v)
    ref_k = k.float().to(fp8).float()  # plain torch cast as the reference
    assert torch.equal(pool.get_key_buffer(0)[loc].float(), ref_k)
    assert torch.equal(pool.get_value_buffer(0)[loc].float(), (-k).float().to(fp8).float())
    assert torch.equal(pool.get_key_buffer(0)[1, 0, :3].float(), torch.tensor([0.5, -1.25, 2.0]))  # exact in fp8
    # With a scale the stored value is x / scale.
    pool.set_kv_buffer(0, torch.tensor([2]), k[:1], v[:1], k_scale=2.0, v_scale=2.0)
    assert torch.equal(pool.get_key_buffer(0)[2].float(), (k[0].float() / 2.0).to(fp8).float())


def test_noop_pool_reserves_nothing():
    pool = NoOpKVPool(size=1000, page_size=1, dtype=torch.float16, device="cpu")
    assert pool.mem_usage_bytes() == 0
    pool.set_kv_buffer(0, torch.tensor([1]), torch.ones(1, 1, 1), torch.ones(1, 1, 1))
    with pytest.raises(RuntimeError):
        pool.get_key_buffer(0)
    with pytest.raises(RuntimeError):
        pool.get_kv_buffer(0)


def test_profile_max_num_tokens():
    assert profile_max_num_tokens(1000, 10_999) == 10
    assert profile_max_num_tokens(1000, -5) == 0


# ============================================================================ allocators
def test_allocator_page1():
    a = TokenToKVPoolAllocator(size=10, device="cpu")
    x = a.alloc(4)
    assert x.dtype == torch.int64 and x.tolist() == [1, 2, 3, 4] and a.available_size() == 6
    assert a.alloc(7) is None and a.available_size() == 6  # exhaustion allocates nothing
    y = a.alloc_extend([0, 3], [2, 5], [-1, 7], 4)
    z = a.alloc_decode([3, 6], [5, 8])
    got = torch.cat([x, y, z]).tolist()
    assert len(y) == 4 and len(z) == 2 and sorted(got) == list(range(1, 11))  # slot 0 never handed out
    assert a.alloc_decode([1], [-1]) is None
    a.free(y)
    assert a.available_size() == 4
    a.free_group_begin()
    a.free(x)
    a.free(z)
    assert a.available_size() == 4  # batched until the group ends
    a.free_group_end()
    assert a.available_size() == 10
    a.clear()
    assert a.available_size() == 10 and isinstance(make_token_allocator(4, 1, "cpu"), TokenToKVPoolAllocator)


def test_paged_allocator_hand_computed():
    a = PagedTokenToKVPoolAllocator(size=16, page_size=4, device="cpu")  # pages 1..4, slots 4..19
    assert a.available_size() == 16
    s = a.alloc_extend([0], [6], [-1], 6)
    assert s.tolist() == [4, 5, 6, 7, 8, 9] and a.available_size() == 8  # pages 1, 2
    s = a.alloc_extend([6], [7], [9], 1)  # continues page 2
    assert s.tolist() == [10] and a.available_size() == 8
    s = a.alloc_decode([8], [10])
    assert s.tolist() == [11] and a.available_size() == 8
    s = a.alloc_decode([9], [11])  # position 8 crosses into a new page
    assert s.tolist() == [12] and a.available_size() == 4
    # Two requests in one call: one continues page 3, one starts fresh; needs 1 page, 1 free.
    s = a.alloc_extend([9, 0], [11, 3], [12, -1], 5)
    assert s.tolist() == [13, 14, 16, 17, 18] and a.available_size() == 0
    assert a.alloc_decode([4], [18]).tolist() == [19]  # fits in the partial page, no new page
    before = a.available_size()
    assert a.alloc_extend([0], [1], [-1], 1) is None and a.available_size() == before
    a.free(torch.tensor([4, 5, 6, 7, 8, 9, 10, 11]))
    assert a.available_size() == 8
    a.free(torch.tensor([16, 17, 18]))  # slots of a partly used page free the whole page
    assert a.available_size() == 12
    assert a.alloc(8).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]  # freed pages come back, oldest first


def test_paged_alloc_whole_pages_and_exhaustion():
    a = PagedTokenToKVPoolAllocator(size=64, page_size=16, device="cpu")
    x = a.alloc(32)
    assert x.tolist() == list(range(16, 48))
    with pytest.raises(ValueError):
        a.alloc(5)
    assert a.alloc(48) is None and a.available_size() == 32
    # A batch whose total need exceeds the free pages gets nothing, even if a prefix of it would fit.
    assert a.alloc_extend([0, 0, 0], [16, 16, 1], [-1, -1, -1], 33) is None and a.available_size() == 32
    y = a.alloc(32)
    assert min(torch.cat([x, y]).tolist()) == 16  # page 0 (slots 0..15) never handed out
    assert sorted(torch.cat([x, y]).tolist()) == list(range(16, 80))
    a.free(x)
    assert a.available_size() == 32
    assert isinstance(make_token_allocator(64, 16, "cpu"), PagedTokenToKVPoolAllocator)


@pytest.mark.parametrize("ps", [1, 4, 16])
def test_allocator_random_against_position_rule(ps):
    """Random extend/decode batches; every slot must sit at page offset pos % ps of the request's page."""
    rng = random.Random(ps)
    num_pages = 40
    a = make_token_allocator(num_pages * ps, ps, "cpu")
    reqs: List[List[int]] = [[] for _ in range(6)]  # slots per request, by position
    owned: set = set()
    for _ in range(60):
        batch = rng.sample(range(len(reqs)), rng.randint(1, 4))
        if rng.random() < 0.5:
            ext = [rng.randint(1, 2 * ps + 1) for _ in batch]
            pre = [len(reqs[i]) for i in batch]
            out = a.alloc_extend(pre, [p + e for p, e in zip(pre, ext)],
                                 [reqs[i][-1] if reqs[i] else -1 for i in batch], sum(ext))
        else:
            ext = [1] * len(batch)
            out = a.alloc_decode([len(reqs[i]) + 1 for i in batch], [reqs[i][-1] if reqs[i] else -1 for i in batch])
        if out is None:  # free a random request to make room
            victim = max(range(len(reqs)), key=lambda i: len(reqs[i]))
            a.free(torch.tensor(reqs[victim], dtype=torch.int64))
            owned -= set(reqs[victim])
            reqs[victim] = []
            continue
        out = out.tolist()
        assert len(out) == sum(ext)
        k = 0
        for i, e in zip(batch, ext):
            for _ in range(e):
                slot, pos = out[k], len(reqs[i])
                assert slot >= ps and slot % ps == pos % ps
                if pos % ps:  # same page as the previous position
                    assert slot == reqs[i][-1] + 1
                assert slot not in owned
                owned.add(slot)
                reqs[i].append(slot)
                k += 1
        used_pages = {s // ps for s in owned}
        assert a.available_size() == (num_pages - len(used_pages)) * ps


# ============================================================================ radix cache: tree
class _NullAllocator:
    """Stands in for the allocator where a test only exercises the tree."""

    device = "cpu"

    def __init__(self) -> None:
        self.freed: List[int] = []

    def free(self, idx: torch.Tensor) -> None:
        self.freed.extend(idx.tolist())

    def free_group_begin(self) -> None: ...

    def free_group_end(self) -> None: ...


def _lcp(a: List[int], b: List[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("ps", [1, 4])
def test_radix_random_against_brute_force(ps):
    rng = random.Random(100 + ps)
    cache = RadixCache(None, _NullAllocator(), ps)
    slot_of_prefix: Dict[tuple, int] = {}  # the slot a prefix's last token lives in, shared by all sequences

    def slots(seq: List[int]) -> List[int]:
        return [slot_of_prefix.setdefault(tuple(seq[: i + 1]), len(slot_of_prefix) + 1) for i in range(len(seq))]

    inserted: List[List[int]] = []
    pages: Dict[tuple, List[int]] = {}
    for _ in range(400):
        seq = [rng.randint(0, 2) for _ in range(rng.randint(0, 14))]
        expect = max([_lcp(seq, s) for s in inserted], default=0) // ps * ps
        if rng.random() < 0.5:
            got = cache.insert(seq, torch.tensor(slots(seq), dtype=torch.int64))
            assert got == expect
            inserted.append(seq[: len(seq) // ps * ps])
            # The tree stores each distinct page-aligned prefix's last page once.
            for i in range(0, len(inserted[-1]), ps):
                pages[tuple(seq[: i + ps])] = slots(seq)[i : i + ps]
        else:
            m = cache.match_prefix(seq)
            assert m.device_indices.dtype == torch.int64
            assert m.device_indices.tolist() == slots(seq)[:expect]
            # last_node ends exactly at the match: its path from the root spells seq[:expect].
            path, node = [], m.last_node
            while node is not cache.root:
                path = node.key + path
                node = node.parent
            assert path == seq[:expect]
        assert cache.evictable_size() == cache.total_size() == ps * len(pages) and cache.protected_size() == 0
        assert sorted(cache.all_values().tolist()) == sorted(x for v in pages.values() for x in v)


def test_radix_split_nodes():
    cache = RadixCache(None, _NullAllocator(), 1)
    cache.insert([1, 2, 3, 4, 5, 6], torch.arange(10, 16))
    assert cache.insert([1, 2, 3, 7], torch.arange(20, 24)) == 3
    (top,) = cache.root.children.values()
    assert top.key == [1, 2, 3] and top.value.tolist() == [10, 11, 12]
    assert sorted(c.key[0] for c in top.children.values()) == [4, 7]
    m = cache.match_prefix([1, 2, 9])  # match inside an edge splits it
    assert m.device_indices.tolist() == [10, 11] and m.last_node.key == [1, 2]
    assert m.last_node.children[3] is top and top.key == [3]
    assert cache.total_size() == 7
    assert cache.match_prefix((1, 2, 3, 7)).device_indices.tolist() == [10, 11, 12, 23]  # tuple keys work too
    assert "len=" in cache.pretty_print()

    paged = RadixCache(None, _NullAllocator(), 2)
    paged.insert([1, 2, 3, 4], torch.arange(4))
    assert paged.insert([1, 2, 3, 5, 6], torch.arange(10, 15)) == 2  # tokens compare in whole pages
    (top,) = paged.root.children.values()
    assert top.key == [1, 2] and set(top.children) == {(3, 4), (3, 5)}
    assert paged.match_prefix([1, 2, 3, 5, 6, 7]).device_indices.tolist() == [0, 1, 12, 13]
    assert paged.match_prefix([1]).device_indices.numel() == 0  # less than a page matches nothing


def test_radix_lock_accounting_and_lru_eviction():
    alloc = _NullAllocator()
    cache = RadixCache(None, alloc, 1)
    cache.insert([1, 1, 1], torch.tensor([1, 2, 3]))         # A
    cache.insert([2, 2], torch.tensor([4, 5]))               # B
    cache.insert([3, 3, 3, 3], torch.tensor([6, 7, 8, 9]))   # C
    cache.insert([1, 1, 1, 5, 5], torch.tensor([1, 2, 3, 10, 11]))  # A' extends A
    assert cache.evictable_size() == 11 and cache.protected_size() == 0
    m = cache.match_prefix([1, 1, 1, 5, 5, 9])
    assert cache.inc_lock_ref(m.last_node) == 5
    assert cache.inc_lock_ref(m.last_node) == 0  # second lock moves nothing
    assert (cache.evictable_size(), cache.protected_size()) == (6, 5)
    cache.match_prefix([2, 2])  # B is now more recent than C
    cache.evict(1)
    assert alloc.freed == [6, 7, 8, 9]  # C: least recently used unlocked leaf, evicted whole
    cache.evict(100)
    assert alloc.freed == [6, 7, 8, 9, 4, 5]  # locked path survives
    assert (cache.evictable_size(), cache.protected_size()) == (0, 5)
    assert cache.dec_lock_ref(m.last_node) == 0
    assert cache.dec_lock_ref(m.last_node) == 5
    with pytest.raises(RuntimeError):
        cache.dec_lock_ref(m.last_node)
    # Lock only the inner node [1,1,1]: its leaf child is evictable, then the node itself once unlocked.
    inner = cache.match_prefix([1, 1, 1]).last_node
    cache.inc_lock_ref(inner)
    assert (cache.evictable_size(), cache.protected_size()) == (2, 3)
    cache.evict(100)
    assert alloc.freed[-2:] == [10, 11] and cache.total_size() == 3
    cache.dec_lock_ref(inner)
    cache.evict(1)
    assert alloc.freed[-3:] == [1, 2, 3] and cache.total_size() == 0 and not cache.root.children
    cache.insert([4], torch.tensor([1]))
    cache.reset()
    assert cache.total_size() == 0 and cache.match_prefix([4]).device_indices.numel() == 0


# ============================================================================ caches with requests
@dataclass
class FakeReq:
    tokens: List[int]  # prompt + output; all get KV written in this simulation
    prompt_len: int
    req_pool_idx: Optional[int] = None
    prefix_indices: Optional[torch.Tensor] = None
    last_node: Any = None
    kv_len: int = 0


class MiniScheduler:
    """Drives a cache the way the scheduler does; stamps each KV slot with the prefix it holds."""

    def __init__(self, cache_cls, ps: int, num_pages: int, rows: int = 8, ctx: int = 64):
        self.ps = ps
        self.req_pool = ReqToTokenPool(rows, ctx, "cpu")
        self.alloc = make_token_allocator(num_pages * ps, ps, "cpu")
        self.cache = cache_cls(self.req_pool, self.alloc, ps)
        self.stamp: Dict[int, tuple] = {}

    def _row(self, req: FakeReq, n: int) -> List[int]:
        return self.req_pool.req_to_token[req.req_pool_idx, :n].tolist()

    def _check_row(self, req: FakeReq) -> None:
        for pos, slot in enumerate(self._row(req, req.kv_len)):
            assert self.stamp.get(slot) == tuple(req.tokens[: pos + 1]), f"slot {slot} holds the wrong KV"

    def start(self, req: FakeReq) -> None:
        # Like the scheduler: keep at least one prompt token to compute, so the match stops before the last.
        m = self.cache.match_prefix(req.tokens[: req.prompt_len - 1])
        req.prefix_indices, req.last_node = m.device_indices, m.last_node
        self.cache.inc_lock_ref(req.last_node)
        req.req_pool_idx = self.req_pool.alloc()
        self.req_pool.write(req.req_pool_idx, 0, req.prefix_indices)
        req.kv_len = len(req.prefix_indices)
        self._check_row(req)

    def _alloc(self, pre: int, seq: int, last: int) -> torch.Tensor:
        out = self.alloc.alloc_extend([pre], [seq], [last], seq - pre)
        if out is None:
            self.cache.evict((seq - pre) + self.ps)
            out = self.alloc.alloc_extend([pre], [seq], [last], seq - pre)
        assert out is not None, "pool too small for the simulation"
        return out

    def step(self, req: FakeReq, chunk: int) -> bool:
        """Prefill a chunk or decode one token; returns True when the request finished."""
        pre = req.kv_len
        seq = min(pre + chunk, req.prompt_len) if pre < req.prompt_len else pre + 1
        last = self._row(req, pre)[-1] if pre else -1
        out = self._alloc(pre, seq, last)
        self.req_pool.write(req.req_pool_idx, pre, out)
        for pos, slot in zip(range(pre, seq), out.tolist()):
            self.stamp[slot] = tuple(req.tokens[: pos + 1])
        req.kv_len = seq
        self._check_row(req)
        if seq == len(req.tokens):
            self.cache.cache_finished_req(req, req.tokens)
            return True
        if seq <= req.prompt_len:  # after each prefill chunk, as the scheduler does
            self.cache.cache_unfinished_req(req, req.tokens[:seq])
            assert req.prefix_indices.dtype == torch.int64
            assert req.prefix_indices.tolist() == self._row(req, seq)
            self._check_row(req)
        return False

    def assert_idle_invariant(self) -> None:
        assert self.alloc.available_size() + self.cache.evictable_size() == self.alloc.size
        assert self.cache.protected_size() == 0
        assert self.req_pool.available_size() == self.req_pool.size
        free_pages = self.alloc.free_units.tolist()
        tree_pages = set()
        if isinstance(self.cache, RadixCache):
            tree_pages = {s // self.ps for s in self.cache.all_values().tolist()}
        assert len(set(free_pages)) == len(free_pages), "a page was freed twice"
        assert not tree_pages & set(free_pages), "a page is both free and in the tree"
        assert set(free_pages) | tree_pages == set(range(1, self.alloc.size // self.ps + 1)), "a page leaked"


def _random_reqs(rng: random.Random, n: int) -> List[FakeReq]:
    stems = [[rng.randint(0, 50) for _ in range(rng.randint(3, 14))] for _ in range(3)]
    reqs = []
    for _ in range(n):
        prompt = rng.choice(stems)[: rng.randint(1, 14)] + [rng.randint(0, 3) for _ in range(rng.randint(0, 5))]
        out = [rng.randint(0, 50) for _ in range(rng.randint(1, 6))]
        reqs.append(FakeReq(prompt + out, len(prompt)))
    return reqs


@pytest.mark.parametrize("cache_cls", [RadixCache, ChunkCache])
@pytest.mark.parametrize("ps", [1, 4])
def test_cache_requests_random_interleaved(cache_cls, ps):
    rng = random.Random(7 * ps + (cache_cls is ChunkCache))
    # 3 running requests of <= 25 tokens need <= 3 * 8 pages; the rest of the pool forces eviction.
    sched = MiniScheduler(cache_cls, ps, num_pages=32 if ps == 4 else 80)
    pending, running = _random_reqs(rng, 60), []
    while pending or running:
        if pending and len(running) < 3 and rng.random() < 0.6:
            req = pending.pop()
            sched.start(req)
            running.append(req)
            continue
        if not running:
            continue
        req = rng.choice(running)
        if sched.step(req, chunk=rng.randint(1, 7)):
            running.remove(req)
    sched.assert_idle_invariant()
    if cache_cls is RadixCache:
        assert sched.cache.total_size() > 0
        sched.cache.evict(10**9)
    assert sched.alloc.available_size() == sched.alloc.size


@pytest.mark.parametrize("ps", [1, 4])
def test_duplicate_inserts_from_two_requests(ps):
    sched = MiniScheduler(RadixCache, ps, num_pages=16)
    tokens = list(range(100, 111))  # 11 tokens: unaligned for ps 4
    a, b = FakeReq(list(tokens), 9), FakeReq(list(tokens), 9)
    sched.start(a)
    sched.start(b)  # both miss: the tree is empty
    assert len(a.prefix_indices) == len(b.prefix_indices) == 0
    sched.step(a, 5)
    sched.step(b, 5)
    sched.step(a, 9)
    sched.step(b, 9)  # b's chunk duplicates a's pages: they are freed, b's row now points at a's
    assert sched._row(b, 8) == sched._row(a, 8)
    for r in (a, b):
        while not sched.step(r, 9):
            pass
    aligned = len(tokens) // ps * ps
    assert sched.cache.total_size() == aligned
    sched.assert_idle_invariant()
    # A third request reuses the cached prefix.
    c = FakeReq(list(tokens), 10)
    sched.start(c)
    hit = 9 // ps * ps
    assert c.prefix_indices.numel() == hit and sched.cache.protected_size() == hit
    while not sched.step(c, 11):
        pass
    sched.assert_idle_invariant()


def test_chunk_cache_basics():
    sched = MiniScheduler(ChunkCache, 4, num_pages=8)
    assert sched.cache.match_prefix([1, 2, 3, 4]).device_indices.numel() == 0
    assert sched.cache.insert([1, 2, 3, 4], torch.arange(4)) == 0
    req = FakeReq(list(range(10)), 7)
    sched.start(req)
    sched.step(req, 5)
    assert req.prefix_indices.tolist() == sched._row(req, 5) and req.prefix_indices.dtype == torch.int64
    assert sched.alloc.available_size() == 24
    while not sched.step(req, 5):
        pass
    sched.assert_idle_invariant()
    assert sched.alloc.available_size() == 32 and sched.cache.total_size() == 0
