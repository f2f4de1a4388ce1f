"""Which source, and which of its blocks, every global sample position reads: weighted data
mixtures as a pure function of the position, so any rank can seek to any step.

Why windows: positions are grouped in windows of ``W`` (``WINDOW``) positions. Every window
holds exactly ``q_i`` positions of source ``i``, the largest-remainder apportionment of ``W``
by the weights, in a stratified random order drawn per window from ``(seed, window)``. So
after any number of whole windows each source has had exactly its quota (its share differs
from its weight's by less than ``1/W``), any prefix of a window holds each source within
about one position of its share, and position ``p``'s place among its source's positions is
``window * q_i + rank in window``: an O(1) seek with no state to carry. A source's ``k``-th
position reads block ``perm_e[k % n_i]`` of its ``n_i`` blocks with ``e = k // n_i`` and
``perm_e`` shuffled from ``(seed, source, e)``: every block once per epoch, a source smaller
than its share repeats (epochs counted by :meth:`Mixture.epochs`).

Without weights (the natural mixture) all blocks form one pool, shuffled per epoch from
``(seed, epoch)``: the order of earlier releases, so their runs resume unchanged.

Nothing here reads data: the sizes come from the tokenize stage's manifest, and block ids
are turned into rows by the caller (``cpt_training.data``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cpt_training.shares import WINDOW, MixtureError, quotas

__all__ = ["WINDOW", "Mixture", "MixtureError", "quotas"]

_WINDOW_STREAM = 1
_SOURCE_STREAM = 2
_CACHE = 8


class Mixture:
    """Global sample position -> (source, block of that source), for sources of ``sizes``
    blocks sampled by ``weights`` (None: one pool of all blocks, the natural mixture)."""

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float] | None,
        seed: int,
        names: Sequence[str] | None = None,
        window: int = WINDOW,
    ) -> None:
        self.sizes = [int(n) for n in sizes]
        self.names = (
            list(names) if names is not None else [f"source-{i}" for i in range(len(sizes))]
        )
        self.seed = int(seed)
        self.window = window
        self.weighted = weights is not None
        if weights is not None:
            if len(weights) != len(self.sizes):
                raise MixtureError(
                    f"{len(weights)} weights for {len(self.sizes)} tokenized sources: the "
                    "mixture must list the tokenize stage's sources in order"
                )
            self.quota = quotas(weights, window)
            for i, (w, q, n) in enumerate(zip(weights, self.quota, self.sizes, strict=True)):
                if w > 0 and q == 0:
                    raise MixtureError(
                        f"{self.names[i]}: weight {w} is below 1/{window} of the total, "
                        "too small to sample; raise it or set 0 (evaluation only)"
                    )
                if q > 0 and n == 0:
                    raise MixtureError(
                        f"{self.names[i]} has weight {w} but no training blocks (is it "
                        "smaller than a block, or all held out?)"
                    )
        else:
            self.quota = [n for n in self.sizes]
            if sum(self.sizes) == 0:
                raise MixtureError("no training blocks in any source")
        self._pool = self.sizes if self.weighted else [sum(self.sizes)]
        """Blocks of each permuted stream: every source, or one pool of all."""
        self._windows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    # -- pure maps -----------------------------------------------------------------------------

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, its rank among that source's slots) of window ``w``.

        Stratified, not a plain shuffle: the ``k``-th slot of source ``i`` gets the key
        ``(k + u) / q_i`` with ``u`` uniform in [0, 1) (from ``(seed, window)``) and slots are
        ordered by key, so every prefix of the window holds each source within about one slot
        of its share (a short run sees its weights too) while the order stays random."""
        hit = self._windows.get(w)
        if hit is None:
            rng = np.random.default_rng([self.seed, _WINDOW_STREAM, w])
            quota = [q for q in self.quota]
            keys = np.concatenate([(np.arange(q) + rng.random(q)) / q for q in quota if q])
            labels = np.concatenate([np.full(q, i) for i, q in enumerate(quota) if q])
            ranks = np.concatenate([np.arange(q) for q in quota if q])
            order = np.argsort(keys, kind="stable")
            hit = (labels[order].astype(np.int64), ranks[order].astype(np.int64))
            if len(self._windows) >= _CACHE:
                self._windows.pop(min(self._windows))
            self._windows[w] = hit
        return hit

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        perm = self._perms.get(key)
        if perm is None:
            seed = (
                [self.seed, epoch]
                if not self.weighted
                else [self.seed, _SOURCE_STREAM, source, epoch]
            )
            perm = np.random.default_rng(seed).permutation(self._pool[source])
            if len(self._perms) >= _CACHE:
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = perm
        return perm

    def assign(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, position within that source's stream) of each global position."""
        positions = np.asarray(positions, dtype=np.int64)
        if not self.weighted:
            return np.zeros_like(positions), positions
        src = np.empty_like(positions)
        local = np.empty_like(positions)
        quota = np.asarray(self.quota, dtype=np.int64)
        wins = positions // self.window
        for w in np.unique(wins):
            sel = wins == w
            labels, rank = self._window(int(w))
            slot = positions[sel] % self.window
            src[sel] = labels[slot]
            local[sel] = int(w) * quota[labels[slot]] + rank[slot]
        return src, local

    def blocks(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, block index within the source) of each global position; in the natural
        mixture the source is 0 and the index is over all blocks."""
        src, local = self.assign(positions)
        sizes = np.asarray(self._pool, dtype=np.int64)
        out = np.empty_like(local)
        n = sizes[src]
        epochs = local // n
        for s, e in {(int(a), int(b)) for a, b in zip(src, epochs, strict=True)}:
            sel = (src == s) & (epochs == e)
            out[sel] = self._perm(s, e)[local[sel] % n[sel]]
        return src, out

    # -- accounting ----------------------------------------------------------------------------

    def seen(self, positions: int) -> list[int]:
        """Positions of each source among global positions ``[0, positions)``: exact when
        weighted; in the natural mixture each source's expected share (its size's)."""
        if not self.weighted:
            total = sum(self.sizes)
            return [round(positions * n / total) for n in self.sizes]
        whole, part = divmod(int(positions), self.window)
        counts = [whole * q for q in self.quota]
        if part:
            labels, _ = self._window(whole)
            for s, c in zip(*np.unique(labels[:part], return_counts=True), strict=True):
                counts[int(s)] += int(c)
        return counts

    def epochs(self, positions: int) -> list[float]:
        """Passes over each source's blocks after ``positions`` global positions."""
        if not self.weighted:
            total = sum(self.sizes)
            return [positions / total for _ in self.sizes]
        return [c / n if n else 0.0 for c, n in zip(self.seen(positions), self.sizes, strict=True)]
