"""Host-side bookkeeping of the paged KV cache: which device page holds what (pure Python + numpy).

The device holds `num_pages` pages of `page_size` token slots each. `PagePool` owns, per page,
a reference count (how many live sequences' page tables hold it) and, for a full page whose
tokens are written, its prefix hash. Page 0 is the scratch page (the padding tokens of a step
write there): it is never handed out, so usable pages are 1..num_pages-1. Each usable page is
exactly one of:

- free: no references, no hash (on the free list);
- cached: no references but registered in the prefix cache (evictable, in LRU order);
- in use: referenced by at least one sequence (registered or not).

Hashing: a page is identified by a chain over the full pages before it, so that it is reused
only when its whole prefix and the namespace (the adapter / weight form: "base", an adapter
digest) are equal: h_-1 = H(b"ns\\0" + namespace), h_i = H(h_{i-1} + tokens[i*ps:(i+1)*ps]),
H = blake2b with digest_size 16, tokens as int32 little-endian bytes. Only full pages are
hashed; a partly written tail page is always private.

Eviction: `allocate` takes free pages first, then evicts the least recently used cached page
(dropping its hash, so it no longer matches). A page becomes cached, as most recently used,
when its last reference is released; within one `release` call the pages are taken last to
first, so that the head of a page table (the pages other prompts share) outlives its tail.
Every operation costs O(pages it touches), never O(pool).

Example (page_size 4)::

    pool = PagePool(num_pages=8, page_size=4)
    prompt = list(range(10))
    pages, n = pool.match_prefix(prompt, "base", len(prompt) - 1)   # ([], 0): nothing cached
    pages += pool.allocate(3)                                      # [1, 2, 3]
    pool.register(prompt, pages, "base", upto=10)   # pages 1, 2 full: hashed; page 3 private
    pool.release(pages)                              # 1, 2 cached (evictable); 3 free
    pool.match_prefix(prompt, "base", 9)             # ([1, 2], 8): 2 tokens left to compute
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence

import numpy as np


def _hash(parent: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(parent + data, digest_size=16).digest()


def _root(namespace: str) -> bytes:
    """The chain's start for a namespace (h_-1)."""
    if not isinstance(namespace, str):
        raise ValueError(f"namespace must be a str, got {namespace!r}")
    return _hash(b"ns\0", namespace.encode("utf-8"))


def shares_pending_page(tokens: Sequence[int], computing, page_size: int) -> bool:
    """Whether `tokens` (a sequence to admit) shares a full page with one of `computing`
    ((tokens, computed) of running sequences) that the other has not computed yet: admitted
    now, it would compute that page a second time; waiting until the other's step registers it
    lets it take the page from the prefix cache (a shared system prompt is computed once, not
    once per request that arrived with the first). Its last token is always computed."""
    mine = np.asarray(tokens[: len(tokens) - 1], np.int64)
    for other, computed in computing:
        n = min(len(mine), len(other))
        diff = np.flatnonzero(mine[:n] != np.asarray(other[:n], np.int64))
        common = int(diff[0]) if diff.size else n
        if common // page_size * page_size > computed:
            return True
    return False


class PagePool:
    """Page allocation with reference counts and an LRU prefix cache (see the module docstring)."""

    def __init__(self, num_pages: int, page_size: int):
        if int(num_pages) != num_pages or num_pages < 2:
            raise ValueError(
                f"num_pages must be an integer >= 2 (page 0 is scratch), got {num_pages!r}"
            )
        if int(page_size) != page_size or page_size < 1:
            raise ValueError(f"page_size must be an integer >= 1, got {page_size!r}")
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        self._refs = [0] * self.num_pages
        self._free: deque[int] = deque(range(1, self.num_pages))
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached pages, least recent first
        self._page_hash: list[bytes | None] = [None] * self.num_pages  # chain hash of a full page
        self._owner: dict[bytes, int] = {}  # hash -> the one page registered under it
        self._queried = 0
        self._hits = 0
        self._evictions = 0

    # -- allocation -------------------------------------------------------------------------

    def available(self) -> int:
        """Pages `allocate` can hand out now: free + cached pages nobody references."""
        return len(self._free) + len(self._lru)

    def allocate(self, n: int) -> list[int] | None:
        """`n` fresh pages (refcount 1 each), or None (nothing changed) if fewer are available."""
        if int(n) != n or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        if n > self.available():
            return None
        out = []
        for _ in range(int(n)):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._lru.popitem(last=False)
                del self._owner[self._page_hash[page]]
                self._page_hash[page] = None
                self._evictions += 1
            self._refs[page] = 1
            out.append(page)
        return out

    def release(self, pages: Sequence[int]) -> None:
        """Drops one reference per entry of `pages`. A page left unreferenced becomes cached
        (most recently used) if registered, else free. Raises ValueError, changing nothing,
        if a page would drop below zero references."""
        pages = [self._check_page(page) for page in pages]
        counts: dict[int, int] = {}
        for page in pages:
            counts[page] = counts.get(page, 0) + 1
        for page, c in counts.items():
            if self._refs[page] < c:
                raise ValueError(
                    f"release of page {page} {c} time(s) but it has {self._refs[page]} "
                    "reference(s) (double free?)"
                )
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page]:
                continue
            h = self._page_hash[page]
            if h is not None and self._owner.get(h) == page:
                self._lru[page] = None  # new key: goes to the most recently used end
            else:
                self._page_hash[page] = None  # a duplicate of a registered page, or unhashed
                self._free.append(page)

    # -- prefix cache -----------------------------------------------------------------------

    def match_prefix(
        self, tokens: Sequence[int], namespace: str, max_tokens: int
    ) -> tuple[list[int], int]:
        """The longest cached prefix of `tokens` made of full pages, at most `max_tokens` tokens
        (pass len(prompt) - 1 so that one token is left to compute). Takes a reference on each
        matched page. Returns (pages, len(pages) * page_size)."""
        if int(max_tokens) != max_tokens or max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
        ps = self.page_size
        n_full = min(len(tokens), int(max_tokens)) // ps
        parent = _root(namespace)
        data = np.asarray(tokens[: n_full * ps], "<i4").tobytes()
        matched: list[int] = []
        for i in range(n_full):
            parent = _hash(parent, data[i * ps * 4 : (i + 1) * ps * 4])
            page = self._owner.get(parent)
            if page is None:
                break
            matched.append(page)
        for page in matched:
            if self._refs[page] == 0:
                del self._lru[page]
            self._refs[page] += 1
        self._queried += len(tokens)
        self._hits += len(matched) * ps
        return matched, len(matched) * ps

    def register(
        self, tokens: Sequence[int], pages: Sequence[int], namespace: str, upto: int
    ) -> None:
        """Registers the full pages among the first `upto` tokens of `tokens` (held in `pages`,
        page i = tokens[i*ps:(i+1)*ps]; the caller references them). A page that already
        carries a hash keeps it (so calling again with a larger `upto` hashes the new pages
        only); a hash already registered to another page stays there and this page stays
        private (it still carries the hash, so the chain after it continues)."""
        if int(upto) != upto or not 0 <= upto <= len(tokens):
            raise ValueError(
                f"upto must be an integer in [0, len(tokens)={len(tokens)}], got {upto!r}"
            )
        ps = self.page_size
        n_full = int(upto) // ps
        if len(pages) < n_full:
            raise ValueError(
                f"{len(pages)} pages cannot hold the {n_full} full pages of upto={upto}"
            )
        pages = [self._check_page(page) for page in pages[:n_full]]
        for page in pages:
            if self._refs[page] == 0:
                raise ValueError(f"register of page {page}, which nobody references")
        parent = _root(namespace)
        for i in range(n_full):
            page = pages[i]
            h = self._page_hash[page]
            if h is None:
                h = _hash(parent, np.asarray(tokens[i * ps : (i + 1) * ps], "<i4").tobytes())
                self._page_hash[page] = h
                self._owner.setdefault(h, page)
            parent = h

    # -- metrics ----------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counts of pages by state (free + cached + in_use == pages - 1: page 0 is scratch),
        prompt tokens queried by `match_prefix`, tokens served from the cache, their ratio, and
        the number of cached pages evicted so far."""
        free, cached = len(self._free), len(self._lru)
        return {
            "pages": self.num_pages,
            "page_size": self.page_size,
            "free": free,
            "cached": cached,
            "in_use": self.num_pages - 1 - free - cached,
            "queried_tokens": self._queried,
            "hit_tokens": self._hits,
            "hit_rate": self._hits / self._queried if self._queried else 0.0,
            "evictions": self._evictions,
        }

    def _check_page(self, page: int) -> int:
        if not isinstance(page, int | np.integer) or not 1 <= page < self.num_pages:
            raise ValueError(f"page {page!r} is not a usable page (1..{self.num_pages - 1})")
        return int(page)
