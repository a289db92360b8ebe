"""Host bookkeeping of the sampler's paged KV pool (models.decoder.PagedKV): which pages of each batch shard are
free and how many holders each page has.

A row holds every page its table lists; a request holds its prompt's full pages on a shard from its first sample
placed there until its last sample is placed (so samples placed later, when rows free up, list the same pages
instead of a copy). A page returns to its shard's free list when its last holder lets go. Page 0 of every shard is
the scratch page (rows that must not write anywhere write there) and is never handed out.
"""

from __future__ import annotations

import numpy as np


def pages_per_shard(kv_cache_tokens: int, page_size: int, shards: int) -> int:
    """Pages each batch shard's pool holds for a cache of `kv_cache_tokens` tokens: its share, plus the scratch page."""
    return -(-int(kv_cache_tokens) // (int(page_size) * int(shards))) + 1


class PagePool:
    def __init__(self, shards: int, per_shard: int):
        if per_shard < 2:
            raise ValueError(f"kv pages: need at least 2 pages per shard (one is scratch), got {per_shard}")
        self.shards, self.per_shard = int(shards), int(per_shard)
        self.reset()

    def reset(self) -> None:
        """Every page free (the pool's contents are whatever they are: no table lists them)."""
        self._free = [list(range(self.per_shard - 1, 0, -1)) for _ in range(self.shards)]  # pop() gives 1, 2, ...
        self._refs = np.zeros((self.shards, self.per_shard), np.int32)

    @property
    def capacity(self) -> int:
        """Pages a shard can hand out (all but its scratch page)."""
        return self.per_shard - 1

    def free(self, shard: int) -> int:
        return len(self._free[shard])

    def used(self) -> int:
        return self.shards * self.capacity - sum(len(f) for f in self._free)

    def freed_without(self, holders: np.ndarray) -> list[int]:
        """Per shard, how many held pages would be free if the holders counted in `holders` [shards, per_shard]
        let go of them."""
        return [int(n) for n in ((self._refs > 0) & (self._refs <= holders)).sum(axis=1)]

    def take(self, shard: int, n: int) -> list[int]:
        """n fresh pages of `shard`, each with one holder (the caller checked `free`)."""
        if n > len(self._free[shard]):
            raise RuntimeError(f"kv pages: {n} wanted on shard {shard}, {len(self._free[shard])} free")
        pages = [self._free[shard].pop() for _ in range(n)]
        self._refs[shard, pages] = 1
        return pages

    def share(self, shard: int, pages: list[int]) -> None:
        """One more holder of each of `pages` (held already)."""
        for p in pages:
            assert self._refs[shard, p] > 0, f"kv pages: page {p} of shard {shard} shared while free"
            self._refs[shard, p] += 1

    def drop(self, shard: int, pages: list[int]) -> None:
        """One holder fewer of each of `pages`; a page nobody holds is free again."""
        for p in pages:
            assert self._refs[shard, p] > 0, f"kv pages: page {p} of shard {shard} dropped while free"
            self._refs[shard, p] -= 1
            if self._refs[shard, p] == 0:
                self._free[shard].append(p)
