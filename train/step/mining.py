"""Dynamic hard-negative mining, inline in the training loop (Conan-embedding §2.2).

Hard negatives that the model has learned to push away stop teaching it anything. For each
retrieval example we compare two scores of its current negatives (the mean cosine s(q, neg)):

    S0  their score when they were mined: the offline pool scores data_prep/mine_negatives.py
        stores with the pool (`neg_scores`, `neg_pool_scores`); without them, the first visit's Si
    Si  their score now, read from the similarities the loss already computed (no extra forward pass)

The rule is applied at every visit, and a replacement is in the example's very next batch: with
one visit per epoch, negatives found easy in epoch 1 are replaced for epoch 2. (Deciding only at
fixed checks, with S0 taken at the first visit, acts from the third visit on: never, in the one or
two epochs fine-tuning usually runs.)

Paper rule (v1, default): replace when Si * 1.15 < S0 and |Si| < 0.8 (for S0 <= 0, when Si < 1.15 * S0:
a drop of 15% of |S0| either way, so an unchanged negative score is never "easy"). Conan-v2 rule:
replace if S0 < 0.4, or if 1.2 * Si < S0 and Si < 0.7. The i-th replacement takes ranks
(i-1)*n + 10 ... i*n + 10 of the example's ranked pool (`neg_pool`), n the number of negatives per
example. A pool too short for the next slice keeps the last negatives and is counted as exhausted.
Every `interval` steps the counts since the last report are logged.

Calibrated rule (`calibrated`): thresholds from the model's own score spread instead of fixed cosines,
for bases whose hard negatives all score high (multilingual-e5: 0.82-0.92, where v1's |Si| < 0.8 hardly
ever holds). The S0 of the first `calibrate_on` visits are collected (no replacement meanwhile); then
low = their `quantile` and drop = `spread` x their standard deviation are fixed, recorded in the rule
(so in checkpoints, OUTPUT_DIR/mining_<task>.json and the summary), and a visit is easy when
S0 < low (among the easiest from the start, v2's S0 < 0.4 on the model's own scale) or S0 - Si > drop
(its score fell by more than the spread, v1's drop on the model's own scale).

The state is global: every rank applies the same updates in the same order (the scores of a step
are shared with all ranks), so every rank holds the same state; the fingerprint compared across
ranks is a running total, so no operation costs more than the examples it touches. It is saved in
checkpoints.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field


@dataclass
class MiningRule:
    name: str = "v1"                # v1 (the paper), v2 (Conan-v2) or calibrated
    interval: int = 100             # steps between reports (decisions are made at every visit)
    factor: float = 1.15            # v1: Si * factor < S0;  v2: factor 1.2
    abs_limit: float = 0.8          # v1: |Si| < abs_limit;  v2: Si < 0.7
    easy_start: float = 0.4         # v2 only: S0 below this is easy from the start
    offset: int = 10                # pool ranks start at offset (skip the top: likely false negatives)
    calibrate_on: int = 256         # calibrated: visits whose S0 set the thresholds
    quantile: float = 0.25          # calibrated: low = this quantile of those S0
    spread: float = 1.0             # calibrated: drop = this many standard deviations of those S0
    low: float | None = None        # calibrated: the thresholds once set
    drop: float | None = None

    @classmethod
    def v2(cls) -> "MiningRule":
        return cls(name="v2", interval=1, factor=1.2, abs_limit=0.7, easy_start=0.4)

    @classmethod
    def calibrated(cls) -> "MiningRule":
        return cls(name="calibrated")

    def calibrate(self, initial_scores: list[float]) -> None:
        """Fix low and drop from the S0 of the first visits (calibrated rule)."""
        ordered = sorted(initial_scores)
        mean = sum(ordered) / len(ordered)
        self.low = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
        self.drop = self.spread * (sum((x - mean) ** 2 for x in ordered) / len(ordered)) ** 0.5

    def dropped(self, s0: float, si: float) -> bool:
        """Si fell below S0 by the rule's factor (sign-safe: for S0 <= 0 the drop is of |S0|)."""
        return si * self.factor < s0 if s0 > 0 else si < s0 * self.factor

    def is_easy(self, s0: float, si: float) -> bool:
        if self.name == "calibrated":
            return self.low is not None and (s0 < self.low or s0 - si > self.drop)
        if self.name == "v2":
            return s0 < self.easy_start or (self.dropped(s0, si) and si < self.abs_limit)
        return self.dropped(s0, si) and abs(si) < self.abs_limit


@dataclass
class ExampleState:
    initial: float | None = None    # S0 of the current negatives
    current: float | None = None    # Si
    replaced: int = 0               # i: how many times its negatives were replaced
    pool_size: int = 0
    exhausted: bool = False
    replaced_at: list[int] = field(default_factory=list)   # steps of the replacements

    def digest(self, example_id: str) -> int:
        """A 64-bit hash of (id, state): the miner's fingerprint is their sum, updated per change."""
        key = (f"{example_id}|{self.initial!r}|{self.current!r}|{self.replaced}|{self.pool_size}|{self.exhausted}"
               f"|{self.replaced_at}")
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


@dataclass
class CheckStats:
    """One report: what happened since the previous one."""
    step: int
    checked: int                    # visits scored
    replaced: int
    exhausted: int
    mean_score: float               # mean Si of those visits
    tracked: int = 0                # examples with a current score


_MASK = (1 << 64) - 1


@dataclass
class HardNegativeMiner:
    num_negatives: int
    rule: MiningRule = field(default_factory=MiningRule)
    examples: dict[str, ExampleState] = field(default_factory=dict)
    history: list[tuple[int, float]] = field(default_factory=list)     # (step, mean negative score)
    checks: list[CheckStats] = field(default_factory=list)

    calibration: list[float] = field(default_factory=list)            # calibrated rule: S0 seen so far

    def __post_init__(self):
        self._digest = 0
        self._scored = 0                            # tracked examples: Si set and not exhausted
        self._since = {"checked": 0, "replaced": 0, "exhausted": 0, "score_sum": 0.0}
        for example_id, state in self.examples.items():
            self._add(example_id, state)

    def _add(self, example_id: str, state: ExampleState, sign: int = 1) -> None:
        self._digest = (self._digest + sign * state.digest(example_id)) & _MASK
        if state.current is not None and not state.exhausted:
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

    def _replaced(self, example_id: str) -> int:
        state = self.examples.get(example_id)
        return state.replaced if state else 0

    def negatives(self, example_id: str, initial: list[str], pool: list[str]) -> list[str]:
        """The negatives to train with now: the initial ones, or the slice of the latest replacement."""
        i = self._replaced(example_id)
        if i == 0:
            return initial
        start, end = self.pool_slice(i)
        return pool[start:end]

    def negative_scores(self, example_id: str, initial_scores: list[float], pool_scores: list[float]) -> list[float]:
        """The scores of what `negatives` returns: the initial negatives' or the pool slice's (a swapped-in
        negative brings its score from the pool; empty where the data has none)."""
        i = self._replaced(example_id)
        if i == 0:
            return initial_scores
        start, end = self.pool_slice(i)
        return pool_scores[start:end]

    def mined_score(self, example_id: str, initial_scores: list[float], pool_scores: list[float]) -> float | None:
        """S0 of the example's current negatives from the offline scores (None if the data has none)."""
        i = self._replaced(example_id)
        if i == 0:
            scores = initial_scores[:self.num_negatives]
        else:
            start, end = self.pool_slice(i)
            scores = pool_scores[start:end]
        return sum(scores) / len(scores) if scores else None

    def record(self, step: int, scores: dict[str, tuple]) -> None:
        """Scores of the examples in this step's batch, {id: (Si, pool size[, S0 from the mining scores])};
        the rule is applied now, so a replacement is used from the example's next batch on."""
        for example_id, (score, pool_size, *mined) in sorted(scores.items()):
            state = self.examples.get(example_id)
            if state is None:
                state = self.examples[example_id] = ExampleState()
                self._add(example_id, state)
            if state.exhausted:
                continue
            s0 = state.initial
            if s0 is None:
                s0 = mined[0] if mined and mined[0] is not None else score
            self._update(example_id, state, initial=s0, current=score, pool_size=pool_size)
            self._since["checked"] += 1
            self._since["score_sum"] += score
            if self.rule.name == "calibrated" and self.rule.low is None:
                self.calibration.append(s0)
                if len(self.calibration) >= self.rule.calibrate_on:
                    self.rule.calibrate(self.calibration)
                continue
            if self.rule.is_easy(s0, score):
                self._replace(step, example_id, state)
        if scores:
            self.history.append((step, sum(v[0] for v in scores.values()) / len(scores)))

    def _replace(self, step: int, example_id: str, state: ExampleState) -> None:
        _, end = self.pool_slice(state.replaced + 1)
        if end > state.pool_size:
            self._update(example_id, state, exhausted=True)  # keep the last negatives; never crash
            self._since["exhausted"] += 1
            return
        # the new negatives' S0 is read at their first visit (from the pool scores when there are some)
        self._update(example_id, state, replaced=state.replaced + 1, initial=None, current=None,
                     replaced_at=state.replaced_at + [step])
        self._since["replaced"] += 1

    def due(self, step: int) -> bool:
        return step > 0 and step % self.rule.interval == 0

    def check(self, step: int) -> CheckStats:
        """The report since the last one (decisions were already made at each visit)."""
        since = dict(self._since)
        total = since.pop("score_sum")
        mean = total / since["checked"] if since["checked"] else float("nan")
        stats = CheckStats(step, mean_score=mean, tracked=self._scored, **since)
        self._since = dict.fromkeys(self._since, 0)
        self.checks.append(stats)
        return stats

    def fingerprint(self) -> str:
        """A short hash of the per-example state, to compare ranks (a running total: O(1) to read)."""
        return f"{self._digest:016x}"

    def state_dict(self) -> dict:
        return {"num_negatives": self.num_negatives, "rule": asdict(self.rule),
                "examples": {k: asdict(v) for k, v in self.examples.items()},
                "history": list(self.history), "checks": [asdict(c) for c in self.checks], "since": dict(self._since),
                "calibration": list(self.calibration)}

    def summary(self, steps: int) -> dict:
        """How many negatives were replaced, in how many examples, and when (each quarter of `steps`)."""
        at = sorted(s for e in self.examples.values() for s in e.replaced_at)
        return {"rule": asdict(self.rule), "replaced": len(at), "examples_with_replacement": sum(1 for e in self.examples.values() if e.replaced),
                "examples_scored": len(self.examples), "first_step": at[0] if at else None,
                "last_step": at[-1] if at else None,
                "per_quarter": [sum(1 for s in at if q * steps / 4 < s <= (q + 1) * steps / 4) for q in range(4)]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "HardNegativeMiner":
        miner = cls(state["num_negatives"], MiningRule(**state["rule"]),
                    {k: ExampleState(**v) for k, v in state["examples"].items()},
                    [tuple(h) for h in state["history"]], [CheckStats(**c) for c in state["checks"]],
                    list(state.get("calibration", [])))
        miner._since = dict(state.get("since", miner._since))
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
