"""PagePool (hunyuan_jax/engine/pages.py): allocation, reference counts, the prefix cache's
chained hashes, LRU eviction and its metrics; a randomized run checks the invariants after every
operation (reading the pool's private state on purpose). No JAX."""

import random
from collections import Counter

import pytest

from hunyuan_jax.engine.pages import PagePool, shares_pending_page


def check_invariants(pool: PagePool, held: Counter) -> None:
    """Each usable page is exactly one of free / cached (evictable) / referenced; reference
    counts equal the references `held`; hashes and owners agree."""
    usable = set(range(1, pool.num_pages))
    free, lru = list(pool._free), list(pool._lru)
    referenced = {p for p in usable if pool._refs[p] > 0}
    assert len(free) == len(set(free))
    assert set(free) | set(lru) | referenced == usable
    assert len(free) + len(lru) + len(referenced) == len(usable)
    assert pool._refs[0] == 0 and 0 not in free and 0 not in lru
    assert all(pool._refs[p] == held[p] for p in range(pool.num_pages))
    assert pool.available() == len(free) + len(lru)
    for p in free:
        assert pool._page_hash[p] is None
    for p in lru:
        assert pool._owner[pool._page_hash[p]] == p
    for h, p in pool._owner.items():
        assert pool._page_hash[p] == h and (p in referenced or p in pool._lru)
    s = pool.stats()
    assert (s["free"], s["cached"], s["in_use"]) == (len(free), len(lru), len(referenced))


def test_allocate_release_refcounts():
    pool = PagePool(6, 4)
    assert pool.available() == 5
    a = pool.allocate(2)
    b = pool.allocate(3)
    assert sorted(a + b) == [1, 2, 3, 4, 5] and pool.available() == 0
    assert all(pool._refs[p] == 1 for p in a + b)
    assert pool.allocate(0) == []
    pool.release(a)
    assert pool.available() == 2 and pool.stats()["free"] == 2 and pool.stats()["in_use"] == 3
    # unregistered pages go back to the free list and are handed out again
    assert sorted(pool.allocate(2)) == sorted(a)


def test_allocate_short_returns_none_and_changes_nothing():
    pool = PagePool(5, 2)
    toks = [1, 2, 3, 4]
    pages = pool.allocate(2)
    pool.register(toks, pages, "base", 4)
    pool.release(pages)  # 2 cached, 2 free
    before = (list(pool._free), list(pool._lru), list(pool._refs), dict(pool._owner))
    assert pool.allocate(5) is None
    assert (list(pool._free), list(pool._lru), list(pool._refs), dict(pool._owner)) == before
    assert pool.stats()["evictions"] == 0
    assert len(pool.allocate(4)) == 4 and pool.stats()["evictions"] == 2


def test_page_zero_is_never_handed_out():
    pool = PagePool(2, 1)
    assert pool.allocate(1) == [1] and pool.allocate(1) is None
    pool = PagePool(9, 3)
    for _ in range(5):
        got = pool.allocate(8)
        assert 0 not in got and sorted(got) == list(range(1, 9))
        pool.release(got)
    with pytest.raises(ValueError, match="page 0"):
        pool.release([0])


def test_match_full_pages_only_capped_by_max_tokens():
    pool = PagePool(10, 4)
    toks = list(range(100, 111))  # 11 tokens: pages 0, 1 full, page 2 partial
    pages = pool.allocate(3)
    pool.register(toks, pages, "base", len(toks))
    assert len(pool._owner) == 2  # the partial page is not hashed
    pool.release(pages)
    assert pool.match_prefix(toks, "base", len(toks) - 1) == (pages[:2], 8)
    pool.release(pages[:2])
    assert pool.match_prefix(toks[:8], "base", 7) == (pages[:1], 4)  # cap 7: one full page
    pool.release(pages[:1])
    assert pool.match_prefix(toks, "base", 3) == ([], 0)
    assert pool.match_prefix(toks[:7], "base", 100) == (pages[:1], 4)  # len(tokens) caps too
    pool.release(pages[:1])
    # a different second page: the first still matches
    assert pool.match_prefix(toks[:4] + [0, 0, 0, 0, 9], "base", 8) == (pages[:1], 4)


def test_namespace_separates_entries():
    pool = PagePool(8, 2)
    toks = [5, 6, 7, 8, 9]
    pages = pool.allocate(3)
    pool.register(toks, pages, "base", 5)
    assert pool.match_prefix(toks, "adapter-1", 4) == ([], 0)
    assert pool.match_prefix(toks, "base", 4) == (pages[:2], 4)
    # the same tokens under another namespace register separately
    other = pool.allocate(2)
    pool.register(toks[:4], other, "adapter-1", 4)
    assert pool.match_prefix(toks, "adapter-1", 4) == (other, 4)


def test_hash_is_chained_over_the_prefix():
    pool = PagePool(8, 2)
    a = pool.allocate(2)
    pool.register([1, 2, 3, 4], a, "base", 4)
    pool.release(a)
    # page [3, 4] after a different first page does not match a[1]
    assert pool.match_prefix([9, 9, 3, 4, 0], "base", 4) == ([], 0)
    # nor does [3, 4] as the first page
    assert pool.match_prefix([3, 4, 0], "base", 2) == ([], 0)
    assert pool.match_prefix([1, 2, 3, 4, 0], "base", 4) == (a, 4)


def test_lru_evicts_least_recently_used_and_drops_its_hash():
    pool = PagePool(4, 2)  # usable: 1, 2, 3
    seqs = {}
    for name, toks in (("a", [1, 1, 0]), ("b", [2, 2, 0]), ("c", [3, 3, 0])):
        seqs[name] = (toks, pool.allocate(1))
        pool.register(toks, seqs[name][1], "base", 3)
    pool.release(seqs["b"][1])
    pool.release(seqs["a"][1])
    pool.release(seqs["c"][1])  # cached, least recent first: b, a, c
    # a is used again (match + release): now b, c, a
    got, _ = pool.match_prefix(seqs["a"][0], "base", 2)
    pool.release(got)
    assert pool.stats()["cached"] == 3 and pool.stats()["free"] == 0
    assert pool.allocate(1) == seqs["b"][1]
    assert pool.stats()["evictions"] == 1
    assert pool.match_prefix(seqs["b"][0], "base", 2) == ([], 0)  # its hash is gone
    assert pool.allocate(1) == seqs["c"][1]
    assert pool.match_prefix(seqs["a"][0], "base", 2) == (seqs["a"][1], 2)
    assert pool.allocate(1) is None  # a is referenced again: not evictable
    assert pool.stats()["evictions"] == 2


def test_release_takes_a_page_table_tail_first():
    # the head of a released page table is evicted last (the tail's hash needs its prefix anyway)
    pool = PagePool(4, 1)
    pages = pool.allocate(3)
    pool.register([7, 8, 9], pages, "base", 3)
    pool.release(pages)
    assert [pool.allocate(1)[0] for _ in range(3)] == pages[::-1]


def test_shared_page_is_not_evicted_until_both_release():
    pool = PagePool(4, 2)
    prompt = [1, 2, 3, 4, 5]
    mine = pool.allocate(3)
    pool.register(prompt, mine, "base", 5)
    theirs, n = pool.match_prefix(prompt, "base", 4)
    assert theirs == mine[:2] and n == 4 and pool._refs[mine[0]] == 2
    pool.release(mine)  # the tail page is free, the shared pages still referenced
    assert pool.available() == 1 and pool.allocate(2) is None
    assert pool.allocate(1) == [mine[2]]
    pool.release(theirs)  # now cached
    assert pool.available() == 2 and pool.stats()["cached"] == 2
    assert len(pool.allocate(2)) == 2 and pool.stats()["evictions"] == 2


def test_register_is_idempotent_and_keeps_the_first_page_of_a_hash():
    pool = PagePool(10, 2)
    toks = [1, 2, 3, 4, 5, 6, 7]
    pages = pool.allocate(4)
    pool.register(toks, pages, "base", 3)  # one full page
    assert len(pool._owner) == 1
    pool.register(toks, pages, "base", 3)
    assert len(pool._owner) == 1
    pool.register(toks, pages, "base", 7)  # the next two pages only
    assert len(pool._owner) == 3 and set(pool._owner.values()) == set(pages[:3])
    # a second sequence computed the same tokens in its own pages (no match taken), then more
    dup = pool.allocate(4)
    longer = toks + [8, 9]
    pool.register(longer, dup, "base", 6)
    assert len(pool._owner) == 3 and set(pool._owner.values()) == set(pages[:3])
    # the duplicates carry the chain: the page after them is registered under the right hash
    pool.register(longer, dup, "base", 8)
    assert len(pool._owner) == 4 and pool._owner[pool._page_hash[dup[3]]] == dup[3]
    pool.release(dup)  # duplicates are private: back to the free list, not cached
    assert pool.stats()["cached"] == 1 and pool.stats()["free"] == 9 - 4 - 1
    pool.release(pages)
    assert pool.match_prefix(longer + [10], "base", 9) == (pages[:3] + dup[3:], 8)


def test_release_of_an_unreferenced_page_raises_and_changes_nothing():
    pool = PagePool(5, 2)
    a = pool.allocate(2)
    with pytest.raises(ValueError, match="page 3"):
        pool.release([3])  # never allocated
    with pytest.raises(ValueError, match=f"page {a[1]}"):
        pool.release([a[0], a[1], a[1]])
    assert pool._refs[a[0]] == 1 and pool._refs[a[1]] == 1
    pool.release(a)
    with pytest.raises(ValueError, match="double free"):
        pool.release(a[:1])
    # a cached page (registered, unreferenced) cannot be released either
    b = pool.allocate(1)
    pool.register([1, 2], b, "base", 2)
    pool.release(b)
    with pytest.raises(ValueError):
        pool.release(b)
    with pytest.raises(ValueError, match="nobody references"):
        pool.register([1, 2], a[:1], "base", 2)


def test_stats_hit_rate():
    pool = PagePool(8, 4)
    assert pool.stats() == {
        "pages": 8, "page_size": 4, "free": 7, "cached": 0, "in_use": 0,
        "queried_tokens": 0, "hit_tokens": 0, "hit_rate": 0.0, "evictions": 0,
    }  # fmt: skip
    prompt = list(range(10))
    got, n = pool.match_prefix(prompt, "base", 9)
    assert (got, n) == ([], 0)
    pages = pool.allocate(3)
    pool.register(prompt, pages, "base", 10)
    pool.release(pages)
    got, n = pool.match_prefix(prompt, "base", 9)
    assert n == 8
    s = pool.stats()
    assert (s["queried_tokens"], s["hit_tokens"]) == (20, 8)
    assert s["hit_rate"] == pytest.approx(0.4)
    assert (s["free"], s["cached"], s["in_use"]) == (5, 0, 2)


def test_argument_validation():
    for bad in (dict(num_pages=1, page_size=4), dict(num_pages=8, page_size=0)):
        with pytest.raises(ValueError, match=str(min(bad.values()))):
            PagePool(**bad)
    pool = PagePool(4, 2)
    with pytest.raises(ValueError, match="-1"):
        pool.allocate(-1)
    with pytest.raises(ValueError, match="page 4"):
        pool.release([4])
    with pytest.raises(ValueError, match="max_tokens"):
        pool.match_prefix([1, 2, 3], "base", -1)
    with pytest.raises(ValueError, match="upto"):
        pool.register([1, 2], [1], "base", 3)
    with pytest.raises(ValueError, match="1 pages"):
        pool.register([1, 2, 3, 4], pool.allocate(1), "base", 4)
    with pytest.raises(ValueError, match="namespace"):
        pool.match_prefix([1, 2, 3], None, 2)


def test_module_example():
    pool = PagePool(num_pages=8, page_size=4)
    prompt = list(range(10))
    pages, n = pool.match_prefix(prompt, "base", len(prompt) - 1)
    assert (pages, n) == ([], 0)
    pages += pool.allocate(3)
    assert pages == [1, 2, 3]
    pool.register(prompt, pages, "base", upto=10)
    pool.release(pages)
    assert pool.match_prefix(prompt, "base", 9) == ([1, 2], 8)


def test_randomized_invariants():
    rng = random.Random(1234)
    ps = 3
    pool = PagePool(20, ps)
    held: Counter = Counter()
    content: dict[int, tuple] = {}  # page -> (namespace, the tokens up to its end) once written
    seqs: list[dict] = []  # live sequences: tokens, pages, namespace, written
    heads = [[rng.randrange(4) for _ in range(rng.randrange(10))] for _ in range(3)]

    def take(pages):
        held.update(pages)

    def drop(pages):
        pool.release(pages)
        held.subtract(pages)

    def write(seq, upto):
        """The device writes tokens up to `upto`; register the full pages."""
        for i in range(seq["written"] // ps, upto // ps):
            if i >= seq["matched"]:
                content[seq["pages"][i]] = (seq["ns"], tuple(seq["tokens"][: (i + 1) * ps]))
        seq["written"] = upto
        pool.register(seq["tokens"], seq["pages"], seq["ns"], upto)

    def need(seq):
        return -(-len(seq["tokens"]) // ps) - len(seq["pages"])

    for _ in range(2000):
        op = rng.random()
        if op < 0.4 or not seqs:  # a new request
            ns = rng.choice(["base", "lora"])
            toks = rng.choice(heads) + [rng.randrange(4) for _ in range(rng.randrange(1, 9))]
            got, n = pool.match_prefix(toks, ns, len(toks) - 1)
            assert n == len(got) * ps and n <= len(toks) - 1
            for i, p in enumerate(got):  # a matched page holds exactly this prefix
                assert content[p] == (ns, tuple(toks[: (i + 1) * ps]))
            take(got)
            seq = dict(tokens=toks, pages=list(got), ns=ns, written=n, matched=len(got))
            new = pool.allocate(need(seq))
            if new is None:
                drop(got)
            else:
                for p in new:
                    content.pop(p, None)
                take(new)
                seq["pages"] += new
                write(seq, rng.randrange(n, len(toks) + 1))
                seqs.append(seq)
        elif op < 0.75:  # a decode step: one more token, maybe a new page
            seq = rng.choice(seqs)
            seq["tokens"].append(rng.randrange(4))
            new = pool.allocate(need(seq))
            if new is None:  # preempted: everything released
                drop(seq["pages"])
                seqs.remove(seq)
            else:
                take(new)
                seq["pages"] += new
                write(seq, len(seq["tokens"]) - rng.randrange(2))
        else:  # finished
            seq = seqs.pop(rng.randrange(len(seqs)))
            drop(seq["pages"])
        check_invariants(pool, held)

    s = pool.stats()
    assert s["hit_tokens"] > 0 and s["evictions"] > 0 and 0 < s["hit_rate"] < 1
    for seq in seqs:
        drop(seq["pages"])
    check_invariants(pool, held)
    assert pool.stats()["in_use"] == 0


def test_shares_pending_page():
    """A sequence waits for a page another sequence is still computing (full pages only, its
    last token excluded), not for a page that is computed or that it does not share."""
    system = list(range(100, 109))  # 2 full pages of 4 and one token
    other = system + [1, 2]
    assert shares_pending_page(system + [5], [(other, 0)], 4)  # pages 0, 1 not computed yet
    assert shares_pending_page(system + [5], [(other, 4)], 4)  # page 1 still pending
    assert not shares_pending_page(system + [5], [(other, 8)], 4)  # both computed: cached
    assert not shares_pending_page([9] + system, [(other, 0)], 4)  # no common first page
    assert not shares_pending_page(system[:4], [(other, 0)], 4)  # its last token is its own
    assert shares_pending_page(system[:5], [(other, 0)], 4)
    assert not shares_pending_page(system + [5], [], 4)
