"""Dynamic hard-negative mining, inline in the training loop (Conan-embedding §2.2).

Hard negatives that the model has learned to push away stop teaching it anything. For each
retrieval example we track the mean score s(q, neg) of its current negatives, taken from the
similarities the loss already computed (no extra forward pass):

    S0  the score the first time the current negatives were seen
    Si  the latest score

Paper rule (v1, default): every `interval` (100) steps, an example with Si * 1.15 < S0 and
|Si| < 0.8 gets new negatives. Conan-v2 rule: checked every step, replace if S0 < 0.4, or if
1.2 * Si < S0 and Si < 0.7. The i-th replacement takes ranks (i-1)*n + 10 ... i*n + 10 of the
example's ranked candidate pool (`neg_pool`, built offline by data_prep/mine_negatives.py), n the
number of negatives per example. A pool too short for the next slice keeps the last negatives and
is counted as exhausted.

The state is global: every rank applies the same updates in the same order (the scores of a step
are shared with all ranks), so every rank holds the same state, and it is saved in checkpoints.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field


@dataclass
class MiningRule:
    name: str = "v1"                # v1 (the paper) or v2 (Conan-v2)
    interval: int = 100             # steps between checks (v2: 1)
    factor: float = 1.15            # v1: Si * factor < S0;  v2: factor 1.2
    abs_limit: float = 0.8          # v1: |Si| < abs_limit;  v2: Si < 0.7
    easy_start: float = 0.4         # v2 only: S0 below this is easy from the start
    offset: int = 10                # pool ranks start at offset (skip the top: likely false negatives)

    @classmethod
    def v2(cls) -> "MiningRule":
        return cls(name="v2", interval=1, factor=1.2, abs_limit=0.7, easy_start=0.4)

    def is_easy(self, s0: float, si: float) -> bool:
        if self.name == "v2":
            return s0 < self.easy_start or (self.factor * si < s0 and si < self.abs_limit)
        return si * self.factor < s0 and abs(si) < self.abs_limit


@dataclass
class ExampleState:
    initial: float | None = None    # S0 of the current negatives
    current: float | None = None    # Si
    replaced: int = 0               # i: how many times its negatives were replaced
    pool_size: int = 0
    exhausted: bool = False

    def digest(self, example_id: str) -> int:
        """A 64-bit hash of (id, state): the miner's fingerprint is their sum, updated per change."""
        key = f"{example_id}|{self.initial!r}|{self.current!r}|{self.replaced}|{self.pool_size}|{self.exhausted}"
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


@dataclass
class CheckStats:
    step: int
    checked: int                    # examples with a new score since the last check (the only ones that can change)
    replaced: int
    exhausted: int
    mean_score: float               # mean Si over every tracked example, before this check's replacements
    tracked: int = 0


_MASK = (1 << 64) - 1


@dataclass
class HardNegativeMiner:
    """Per-example mining state. Every operation costs in proportion to the examples it touches: a
    check looks only at the examples scored since the previous check (any other example's S0 and Si
    are unchanged since the rule last said "keep"), and the fingerprint compared across ranks and the
    mean score are running totals."""
    num_negatives: int
    rule: MiningRule = field(default_factory=MiningRule)
    examples: dict[str, ExampleState] = field(default_factory=dict)
    history: list[tuple[int, float]] = field(default_factory=list)     # (step, mean negative score)
    checks: list[CheckStats] = field(default_factory=list)

    def __post_init__(self):
        self._dirty: set[str] = set()
        self._digest = 0
        self._score_sum, self._scored = 0.0, 0      # over tracked examples: Si set and not exhausted
        for example_id, state in self.examples.items():
            self._add(example_id, state)
            if state.initial is not None and state.current is not None and not state.exhausted:
                self._dirty.add(example_id)  # restored mid-interval: let the next check look at it again

    def _add(self, example_id: str, state: ExampleState, sign: int = 1) -> None:
        self._digest = (self._digest + sign * state.digest(example_id)) & _MASK
        if state.current is not None and not state.exhausted:
            self._score_sum += sign * state.current
            self._scored += sign

    def _update(self, example_id: str, state: ExampleState, **changes) -> None:
        self._add(example_id, state, -1)
        for name, value in changes.items():
            setattr(state, name, value)
        self._add(example_id, state)

    def pool_slice(self, i: int) -> tuple[int, int]:
        """Pool ranks of the i-th replacement (i >= 1): (i-1)*n + offset ... i*n + offset."""
        n = self.num_negatives
        return (i - 1) * n + self.rule.offset, i * n + self.rule.offset

    def negatives(self, example_id: str, initial: list[str], pool: list[str]) -> list[str]:
        """The negatives to train with now: the initial ones, or the slice of the latest replacement."""
        state = self.examples.get(example_id)
        if state is None or state.replaced == 0:
            return initial
        start, end = self.pool_slice(state.replaced)
        return pool[start:end]

    def record(self, step: int, scores: dict[str, tuple[float, int]]) -> None:
        """Mean negative score of each example seen this step: {id: (score, pool size)}."""
        for example_id, (score, pool_size) in sorted(scores.items()):
            state = self.examples.get(example_id)
            if state is None:
                state = self.examples[example_id] = ExampleState()
                self._add(example_id, state)
            initial = score if state.initial is None else state.initial
            self._update(example_id, state, initial=initial, current=score, pool_size=pool_size)
            self._dirty.add(example_id)
        if scores:
            self.history.append((step, sum(s for s, _ in scores.values()) / len(scores)))

    def due(self, step: int) -> bool:
        return step > 0 and step % self.rule.interval == 0

    def check(self, step: int) -> CheckStats:
        """Apply the rule to the examples scored since the last check; replaced ones start a new S0 when next seen."""
        checked = replaced = exhausted = 0
        tracked, mean = self._scored, (self._score_sum / self._scored if self._scored else float("nan"))
        for example_id in sorted(self._dirty):
            state = self.examples[example_id]
            if state.initial is None or state.current is None or state.exhausted:
                continue
            checked += 1
            if not self.rule.is_easy(state.initial, state.current):
                continue
            _, end = self.pool_slice(state.replaced + 1)
            if end > state.pool_size:
                self._update(example_id, state, exhausted=True)  # keep the last negatives; never crash
                exhausted += 1
                continue
            self._update(example_id, state, replaced=state.replaced + 1, initial=None, current=None)
            replaced += 1
        self._dirty.clear()
        stats = CheckStats(step, checked, replaced, exhausted, mean, tracked)
        self.checks.append(stats)
        return stats

    def fingerprint(self) -> str:
        """A short hash of the per-example state, to compare ranks (a running total: O(1) to read)."""
        return f"{self._digest:016x}"

    def state_dict(self) -> dict:
        return {"num_negatives": self.num_negatives, "rule": asdict(self.rule),
                "examples": {k: asdict(v) for k, v in self.examples.items()},
                "history": list(self.history), "checks": [asdict(c) for c in self.checks],
                "pending": sorted(self._dirty)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "HardNegativeMiner":
        miner = cls(state["num_negatives"], MiningRule(**state["rule"]),
                    {k: ExampleState(**v) for k, v in state["examples"].items()},
                    [tuple(h) for h in state["history"]], [CheckStats(**c) for c in state["checks"]])
        if "pending" in state:
            miner._dirty = set(state["pending"])
        return miner


def plot_history(miner: HardNegativeMiner, path) -> None:
    """PNG: mean negative score over steps, with a mark at each check that replaced negatives."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    if miner.history:
        steps, scores = zip(*miner.history)
        ax.plot(steps, scores, lw=1, label="mean score of current hard negatives")
    for c in miner.checks:
        if c.replaced:
            ax.axvline(c.step, color="tab:red", alpha=0.4, lw=1)
    ax.plot([], [], color="tab:red", alpha=0.4, label="check that replaced negatives")
    ax.set_xlabel("step")
    ax.set_ylabel("cosine(query, negative)")
    ax.set_title(f"dynamic hard-negative mining ({miner.rule.name})")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
