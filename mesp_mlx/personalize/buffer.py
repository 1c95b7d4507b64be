"""A selection buffer bounded in bytes, and the replacement policies that decide what it keeps.

Every policy admits a candidate while it fits; when it does not, the policy names the entries to evict for it (or
refuses it, evicting nothing). The buffer never holds more than its capacity, and every decision is a function of the
stream and the seed only.

- `quality` (ours, after Qin et al.): the candidate's IDD is taken against the buffer, each entry's against the other
  entries. A candidate within cosine `repeat_cos` (0.98) of an entry of its domain is a repeat of it: the entry's `seen`
  count goes up and nothing is stored twice. Otherwise a candidate *beats* an entry when it is better on at least two of
  EOE, DSS and IDD; entries the user repeated (seen > 1) are not replaced by a dialogue seen once. Beaten entries are
  evicted weakest first (lowest sum of their three within-buffer ranks; older first on ties) until the candidate fits;
  if all beaten entries together do not free enough bytes, the candidate is refused. (Without the repeat rule the
  buffer drops exactly what a user keeps coming back to: tools/personalize_demo.py measured it.)
- `random`: evicts uniformly drawn entries (seeded) until the candidate fits.
- `fifo`: evicts the oldest entries until the candidate fits.
- `kcenter`: greedy k-center on the embeddings: from the entries plus the candidate, removes the most redundant point
  (smallest cosine distance to its nearest neighbour; of a near pair, the newer one: the incumbent stays) until the
  rest fits; refuses the candidate if it is the one removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .scores import idd


@dataclass
class Candidate:
    """One dialogue of the stream with what the selector needs (the embedding is unit-length)."""
    index: int  # position in the stream
    prompt: str
    response: str | None
    domain: str
    embedding: np.ndarray
    eoe: float
    dss: float
    source: str = ""  # file:line it came from
    idd: float = field(default=1.0, compare=False)  # against the buffer, set when offered
    seen: int = field(default=1, compare=False)  # how often the stream brought this dialogue (repeats absorbed)

    @property
    def nbytes(self) -> int:
        """Its size in the buffer: text, embedding and domain tag."""
        text = self.prompt.encode() + (self.response or "").encode()
        return len(text) + self.embedding.nbytes + len(self.domain.encode())

    def record(self) -> dict:
        return {"index": self.index, "source": self.source, "domain": self.domain, "eoe": round(self.eoe, 6),
                "dss": round(self.dss, 6), "idd": round(self.idd, 6), "seen": self.seen, "bytes": self.nbytes, "prompt": self.prompt,
                "response": self.response}


class Policy:
    name = "policy"

    def evictions(self, items: list[Candidate], candidate: Candidate, need: int) -> list[int] | None:
        """Positions in `items` to evict so that `need` more bytes are free, or None to refuse the candidate."""
        raise NotImplementedError

    def score_candidate(self, items: list[Candidate], candidate: Candidate) -> None:
        """Called before `evictions` (a policy may score the candidate against the entries)."""

    def absorb(self, items: list[Candidate], candidate: Candidate) -> bool:
        """True when the candidate is a repeat of an entry and was counted there instead of stored."""
        return False

    def admitted(self, items: list[Candidate]) -> None:
        """Called after the buffer changed (a policy may refresh what it derives from the entries)."""


def _free_in_order(items: list[Candidate], order: list[int], need: int) -> list[int] | None:
    chosen, freed = [], 0
    for i in order:
        if freed >= need:
            break
        chosen.append(i)
        freed += items[i].nbytes
    return chosen if freed >= need else None


def _ranks(values: list[float]) -> np.ndarray:
    """0 for the smallest value; equal values share the lower rank."""
    v = np.asarray(values)
    return np.searchsorted(np.sort(v), v, side="left").astype(np.float64)


class QualityPolicy(Policy):
    name = "quality"

    def __init__(self, repeat_cos: float = 0.98):
        self.repeat_cos = repeat_cos

    def refresh_idd(self, items: list[Candidate]) -> None:
        """Each entry's IDD against the other entries of its domain."""
        if not items:
            return
        emb = np.stack([c.embedding for c in items]).astype(np.float32)
        sims = emb @ emb.T
        np.fill_diagonal(sims, -np.inf)
        domains = np.array([c.domain for c in items])
        for i, c in enumerate(items):
            same = sims[i][domains == c.domain]
            best = same.max() if len(same) else -np.inf
            c.idd = 1.0 if not np.isfinite(best) else float(1.0 - best)

    def score_candidate(self, items: list[Candidate], candidate: Candidate) -> None:
        same = [c.embedding for c in items if c.domain == candidate.domain]
        candidate.idd = idd(candidate.embedding, np.stack(same) if same else np.zeros((0, 1)))

    def absorb(self, items, candidate):
        if 1.0 - candidate.idd < self.repeat_cos:
            return False
        same = [c for c in items if c.domain == candidate.domain]
        sims = np.stack([c.embedding for c in same]).astype(np.float32) @ candidate.embedding.astype(np.float32)
        same[int(np.argmax(sims))].seen += 1
        return True

    def evictions(self, items, candidate, need):
        beaten = [i for i, c in enumerate(items) if c.seen <= candidate.seen
                  and (candidate.eoe > c.eoe) + (candidate.dss > c.dss) + (candidate.idd > c.idd) >= 2]
        if not beaten:
            return None
        strength = _ranks([c.eoe for c in items]) + _ranks([c.dss for c in items]) + _ranks([c.idd for c in items])
        order = sorted(beaten, key=lambda i: (strength[i], items[i].index))
        return _free_in_order(items, order, need)

    def admitted(self, items):
        self.refresh_idd(items)


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def evictions(self, items, candidate, need):
        return _free_in_order(items, [int(i) for i in self.rng.permutation(len(items))], need)


class FIFOPolicy(Policy):
    name = "fifo"

    def evictions(self, items, candidate, need):
        return _free_in_order(items, sorted(range(len(items)), key=lambda i: items[i].index), need)


class KCenterPolicy(Policy):
    name = "kcenter"

    def evictions(self, items, candidate, need):
        pool = items + [candidate]
        emb = np.stack([c.embedding for c in pool]).astype(np.float32)
        dist = 1.0 - emb @ emb.T
        np.fill_diagonal(dist, np.inf)
        alive = list(range(len(pool)))
        removed, freed = [], 0
        while freed < need:
            sub = dist[np.ix_(alive, alive)]
            nearest = sub.min(axis=1)
            pos = min(range(len(alive)), key=lambda j: (nearest[j], -pool[alive[j]].index))
            victim = alive.pop(pos)
            if victim == len(items):
                return None  # the candidate itself is the most redundant point
            removed.append(victim)
            freed += items[victim].nbytes
        return removed


POLICIES = {"quality": QualityPolicy, "random": RandomPolicy, "fifo": FIFOPolicy, "kcenter": KCenterPolicy}


def make_policy(name: str, seed: int = 0) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown selection policy {name!r} (known: {', '.join(POLICIES)})")
    return RandomPolicy(seed) if name == "random" else POLICIES[name]()


class SelectionBuffer:
    """Holds at most `capacity_bytes` of candidates (Candidate.nbytes); `offer` applies the policy."""

    def __init__(self, capacity_bytes: int, policy: Policy):
        if capacity_bytes <= 0:
            raise ValueError(f"the buffer size must be positive, not {capacity_bytes} bytes")
        self.capacity = int(capacity_bytes)
        self.policy = policy
        self.items: list[Candidate] = []
        self.used = 0
        self.offered = self.admitted = self.evicted = self.repeats = 0

    def offer(self, candidate: Candidate) -> bool:
        """True when the candidate was stored (a repeat absorbed by an entry is counted there, not stored)."""
        self.offered += 1
        if candidate.nbytes > self.capacity:
            return False
        self.policy.score_candidate(self.items, candidate)
        if self.policy.absorb(self.items, candidate):
            self.repeats += 1
            return False
        need = self.used + candidate.nbytes - self.capacity
        if need > 0:
            drop = self.policy.evictions(self.items, candidate, need)
            if drop is None:
                return False
            for i in sorted(drop, reverse=True):
                self.used -= self.items.pop(i).nbytes
            self.evicted += len(drop)
        self.items.append(candidate)
        self.used += candidate.nbytes
        self.admitted += 1
        assert self.used <= self.capacity
        self.policy.admitted(self.items)
        return True

    def summary(self) -> dict:
        domains: dict = {}
        for c in self.items:
            domains[c.domain] = domains.get(c.domain, 0) + 1
        return {"policy": self.policy.name, "capacity_bytes": self.capacity, "used_bytes": self.used,
                "items": len(self.items), "distinct_prompts": len({c.prompt for c in self.items}),
                "offered": self.offered, "admitted": self.admitted, "evicted": self.evicted, "repeats": self.repeats,
                "domains": domains}
