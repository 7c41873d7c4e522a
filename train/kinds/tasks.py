"""Fine-tuning task config: which data, which loss, how much of each step, and which ranks run it.

A data config (YAML or JSON) lists the tasks; paths are relative to the config file:

    tasks:
      retrieval:   {type: retrieval, files: [retrieval.jsonl], batch_size: 8, num_negatives: 8, ranks: 4}
      sts:         {type: sts, files: [sts.jsonl], batch_size: 32, ranks: 1, weight: 0.8}
      intent:      {type: classification, files: [intent.jsonl], batch_size: 8, num_negatives: 4}
    query_prompt: "query: "        # optional; default: the model's own prompts
    passage_prompt: "passage: "

A task may carry an `instruction` (LLM embedders: Qwen3-Embedding, gte-Qwen2): its queries are then
encoded after "Instruct: {instruction}\nQuery: " and its documents bare, and the release saves the
prompt under the task's name and its C-MTEB task types ("Retrieval-query", "STS", ...), which
`encode(..., prompt_name=...)` and eval/cmteb.py use:
      retrieval:   {type: retrieval, ..., instruction: "Given a question, retrieve passages that answer it"}

Sizes are per optimizer step for the whole task, whatever the number of ranks, so one config gives
the same objective on 1 rank or 64:
  retrieval       batch_size queries, each with num_negatives hard negatives in all. The task's ranks
                  all hold the same queries and positives and split the negatives (CBB, paper §2.3).
  sts / pairs / classification
                  batch_size examples, split evenly over the task's ranks.
`ranks` is the task's share of the ranks (paper: 4 retrieval : 1 STS). With at least as many ranks as
tasks every rank runs one task; with fewer, a rank runs several as sub-batches of the same step.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from train.kinds import KINDS

TASK_TYPES = tuple(KINDS)  # each kind's format, loss and default weight: train/kinds/


class ConfigError(ValueError):
    """A data config that cannot be trained; the message names the file and the task."""


@dataclass
class Task:
    name: str
    type: str
    files: list[Path]
    batch_size: int
    num_negatives: int = 0
    ranks: int = 1                   # share of the ranks
    weight: float = 1.0
    query_prompt: str | None = None
    passage_prompt: str | None = None
    mining: dict | None = None       # dynamic hard-negative mining (retrieval): MiningRule fields
    instruction: str | None = None   # LLM embedders: the query-side task instruction
    distill: dict | None = None      # retrieval: distillation from the data's teacher scores (losses/distill.py)
    assigned: list[int] = field(default_factory=list)   # ranks that run it, filled by assign_ranks
    split_queries: bool = False      # retrieval: each rank its own queries (random schedule), not CBB's shared ones

    @property
    def shares_queries(self) -> bool:
        """CBB retrieval: every rank of the task holds all the queries and a slice of the negatives."""
        return KINDS[self.type].shares_queries and not self.split_queries

    @property
    def negatives_per_rank(self) -> int:
        return self.num_negatives // len(self.assigned) if self.shares_queries else self.num_negatives

    def examples_per_rank(self) -> int:
        """Rows of this task one rank holds in a step (CBB retrieval ranks hold all the queries)."""
        return self.batch_size if self.shares_queries else self.batch_size // len(self.assigned)


@dataclass
class DataConfig:
    tasks: list[Task]
    query_prompt: str | None = None
    passage_prompt: str | None = None
    source: Path | None = None


def _load_mapping(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such data config") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml and json raise different types; both carry the position
        raise ConfigError(f"{path}: cannot parse ({e})".replace("\n", " ")) from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict) or not data["tasks"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty 'tasks' mapping")
    return data


def _positive_int(where: str, spec: dict, key: str, default: int | None = None, minimum: int = 1) -> int:
    value = spec.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where}: '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def load_data_config(path: str | Path) -> DataConfig:
    path = Path(path)
    data = _load_mapping(path)
    tasks = []
    for name, spec in data["tasks"].items():
        where = f"{path}: task '{name}'"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping")
        unknown = set(spec) - {"type", "files", "batch_size", "num_negatives", "ranks", "weight",
                               "query_prompt", "passage_prompt", "mining", "instruction", "distill"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        if spec.get("type") not in TASK_TYPES:
            raise ConfigError(f"{where}: 'type' must be one of {', '.join(TASK_TYPES)}, got {spec.get('type')!r}")
        files = spec.get("files")
        files = [files] if isinstance(files, str) else files
        if not files or not all(isinstance(f, str) for f in files):
            raise ConfigError(f"{where}: 'files' must list at least one file")
        resolved = []
        for f in files:  # a folder stands for its *.jsonl files, in name order (a split data_prep job's parts)
            f = (path.parent / f).resolve()
            found = sorted(f.glob("*.jsonl")) if f.is_dir() else [f]
            if not found:
                raise ConfigError(f"{where}: {f}: a folder without .jsonl files")
            resolved += found
        for f in resolved:
            if not f.is_file():
                raise ConfigError(f"{where}: {f}: no such file")
        kind = KINDS[spec["type"]]
        task = Task(name=name, type=spec["type"], files=resolved,
                    batch_size=_positive_int(where, spec, "batch_size"),
                    num_negatives=_positive_int(where, spec, "num_negatives", 0, minimum=1 if kind.needs_negatives else 0),
                    ranks=_positive_int(where, spec, "ranks", 1),
                    weight=float(spec.get("weight", kind.default_weight)),
                    query_prompt=spec.get("query_prompt"), passage_prompt=spec.get("passage_prompt"),
                    instruction=spec.get("instruction"))
        if task.instruction is not None and not isinstance(task.instruction, str):
            raise ConfigError(f"{where}: 'instruction' must be a string, got {task.instruction!r}")
        task.mining = _mining(where, spec.get("mining"), task.type)
        task.distill = _distill(where, spec.get("distill"), task.type)
        if task.batch_size < kind.min_batch:
            raise ConfigError(f"{where}: a {task.type} task's loss compares examples with each other; "
                              f"batch_size must be >= {kind.min_batch}")
        tasks.append(task)
    return DataConfig(tasks, data.get("query_prompt"), data.get("passage_prompt"), path)


def _mining(where: str, value, task_type: str) -> dict | None:
    """`mining: v1` / `v2` / `calibrated` / `off`, or a mapping of MiningRule fields (rule, interval, factor,
    abs_limit, offset; calibrated: calibrate_on, quantile, spread)."""
    from train.step.mining import MiningRule
    if value in (None, "off", False):
        return None
    if not KINDS[task_type].minable:
        raise ConfigError(f"{where}: 'mining' applies to retrieval tasks only")
    if isinstance(value, str):
        value = {"rule": value}
    if not isinstance(value, dict) or value.get("rule", "v1") not in ("v1", "v2", "calibrated"):
        raise ConfigError(f"{where}: 'mining' must be v1, v2, calibrated, off, or a mapping with rule: v1|v2|calibrated")
    fields = {"interval", "factor", "abs_limit", "easy_start", "offset", "calibrate_on", "quantile", "spread"}
    unknown = set(value) - fields - {"rule"}
    if unknown:
        raise ConfigError(f"{where}: unknown mining keys {sorted(unknown)}")
    base = {"v2": MiningRule.v2, "calibrated": MiningRule.calibrated}.get(value.get("rule"), MiningRule)()
    rule = {**{k: getattr(base, k) for k in fields}, **{k: value[k] for k in fields & set(value)}, "name": base.name}
    if not isinstance(rule["interval"], int) or rule["interval"] < 1:
        raise ConfigError(f"{where}: mining interval must be an integer >= 1")
    return rule


def _distill(where: str, value, task_type: str) -> dict | None:
    """`distill: kl` / `m3`, or a mapping: {loss: kl|m3, weight: 1.0, temperature: (the run's),
    teacher_temperature: 1.0}; the task's lines must then carry pos_scores and neg_scores."""
    from train.losses.distill import DISTILL_LOSSES
    if value in (None, "off", False):
        return None
    if task_type != "retrieval":
        raise ConfigError(f"{where}: 'distill' applies to retrieval tasks (their lines carry the teacher's scores)")
    if isinstance(value, str):
        value = {"loss": value}
    if not isinstance(value, dict) or value.get("loss", "kl") not in DISTILL_LOSSES:
        raise ConfigError(f"{where}: 'distill' must be {' or '.join(DISTILL_LOSSES)}, or a mapping with loss: "
                          f"{'|'.join(DISTILL_LOSSES)}")
    unknown = set(value) - {"loss", "weight", "temperature", "teacher_temperature"}
    if unknown:
        raise ConfigError(f"{where}: unknown distill keys {sorted(unknown)}")
    rule = {"loss": value.get("loss", "kl"), "weight": value.get("weight", 1.0),
            "temperature": value.get("temperature"), "teacher_temperature": value.get("teacher_temperature", 1.0)}
    for key in ("weight", "temperature", "teacher_temperature"):
        if rule[key] is not None and (not isinstance(rule[key], (int, float)) or isinstance(rule[key], bool)
                                      or rule[key] <= 0):
            raise ConfigError(f"{where}: distill {key} must be a number > 0, got {rule[key]!r}")
    return rule


PLACEMENTS = ("by-task", "every-rank")


def assign_ranks(tasks: list[Task], world: int, schedule: str = "cbb", placement: str = "by-task") -> None:
    """Fill task.assigned. cbb: every task in every step, ranks shared out by the tasks' `ranks`.

    schedule 'random' (the FlagEmbedding / Piccolo baseline) puts every rank on every task; the loop
    then picks one task per step, and each rank takes its own share of the step's examples (retrieval
    too: its own queries with all their negatives, candidates gathered from every rank), as those
    tools do.

    placement 'every-rank' keeps CBB's step (every task, one combined loss) but places it the same
    way: each rank holds 1/world of every task's batch. The objective is the same (the losses gather
    across the task's ranks); what changes is the load: under 'by-task' a rank's step time is that of
    its task, so the ranks of a cheap task (short STS pairs) wait for those of a costly one (queries
    with long passages and negatives), while 'every-rank' gives every rank the same mix.
    """
    if placement not in PLACEMENTS:
        raise ConfigError(f"task placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if schedule == "random" or world == 1 or placement == "every-rank":
        for task in tasks:
            task.assigned = list(range(world))
            task.split_queries = KINDS[task.type].shares_queries and (schedule == "random" or placement == "every-rank")
    elif world < len(tasks):
        for i, task in enumerate(tasks):  # a rank runs several tasks as sub-batches
            task.assigned = [i % world]
    else:
        counts = _largest_remainder([t.ranks for t in tasks], world)
        start = 0
        for task, n in zip(tasks, counts):
            task.assigned = list(range(start, start + n))
            start += n
    for task in tasks:
        check_divisible(task)


def _largest_remainder(shares: list[int], world: int) -> list[int]:
    """Integer rank counts closest to shares * world / sum(shares), each at least 1, summing to world."""
    ideal = [s * world / sum(shares) for s in shares]
    counts = [max(1, int(x)) for x in ideal]
    while sum(counts) < world:
        counts[max(range(len(counts)), key=lambda i: ideal[i] - counts[i])] += 1
    while sum(counts) > world:
        counts[min((i for i in range(len(counts)) if counts[i] > 1), key=lambda i: ideal[i] - counts[i])] -= 1
    return counts


def check_divisible(task: Task) -> None:
    n = len(task.assigned)
    if task.shares_queries and task.num_negatives % n:
        raise ConfigError(f"task '{task.name}': num_negatives {task.num_negatives} does not split over its "
                          f"{n} ranks {task.assigned}; use a multiple of {n}")
    if not task.shares_queries and task.batch_size % n:
        raise ConfigError(f"task '{task.name}': batch_size {task.batch_size} does not split over its "
                          f"{n} ranks {task.assigned}; use a multiple of {n}")
