"""One JSONL line of training data -> a validated record or example, with file:line errors.

Formats (FlagEmbedding's): one JSON object per line,
    {"query": str, "pos": str | [str, ...]}                       weakly supervised pairs
    {"query": str, "pos": [str, ...], "neg": [str, ...]}          with hard negatives
    + "neg_pool", "neg_scores", "neg_pool_scores"                 ranked pools for dynamic mining
    + "pos_scores", "neg_scores"                                   a teacher's scores (distillation)

Scores are one finite number per text of the field they score; they travel with their texts through
sampling, shuffling and mining (a mined negative brings its score from the pool).

A bad line raises DataError naming its file and line, or with --skip-bad-lines is counted in a
SkipReport, so nothing is dropped silently. train/input/data.py streams these examples in batches.
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


@dataclass
class Example:
    query: str
    pos: str                      # the positive picked for this epoch
    neg: list[str]                # hard negatives picked for this epoch (may be empty)
    source: str                   # "file:line": the example's id, for errors and mining state
    pool: list[str] = field(default_factory=list)  # ranked candidate negatives (dynamic mining)
    neg_scores: list[float] = field(default_factory=list)   # mining model's scores of `neg` (S0 of mining)
    pool_scores: list[float] = field(default_factory=list)  # ... and of `pool`
    positives: list[str] = field(default_factory=list)  # every positive of the line (none is a negative of it)
    pos_score: float | None = None  # the teacher's score of `pos` (distillation), when the line has pos_scores


@dataclass
class SkipReport:
    """What was skipped (with --skip-bad-lines) and why, so nothing is dropped silently."""
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, err: DataError) -> None:
        self.reasons[str(err).split(": ", 1)[1]] += 1
        if len(self.examples) < 10:
            self.examples.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.reasons.values())


def text_field(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"'{what}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"'{what}' is empty")
    return value


def text_list(value, what: str, allow_str: bool) -> list[str]:
    if allow_str and isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"'{what}' must be a list of strings, got {type(value).__name__}")
    return [text_field(v, f"{what}[{i}]") for i, v in enumerate(value)]


def json_object(line: str, *required: str) -> dict:
    """One JSONL line as a dict holding the required keys; ValueError says what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in required:
        if key not in obj:
            raise ValueError(f"missing field '{key}' (fields: {', '.join(obj) or 'none'})")
    return obj


@dataclass
class Record:
    query: str
    pos: list[str]
    neg: list[str]
    pool: list[str]
    neg_scores: list[float]
    pool_scores: list[float]
    pos_scores: list[float] = field(default_factory=list)


def _scores(obj: dict, key: str, texts: list[str], of: str) -> list[float]:
    value = obj.get(key, [])
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise ValueError(f"'{key}' must be a list of numbers")
    if value and len(value) != len(texts):
        raise ValueError(f"'{key}' has {len(value)} scores for {len(texts)} '{of}' texts")
    if not all(math.isfinite(x) for x in value):
        raise ValueError(f"'{key}' holds a value that is not a finite number")
    return [float(x) for x in value]


def parse_record(line: str, num_negatives: int) -> Record:
    """Query, positives, negatives and the ranked pool (with their mining scores, if any) of one JSONL
    line; ValueError says what is wrong."""
    obj = json_object(line, "query", "pos")
    query = text_field(obj["query"], "query")
    pos = text_list(obj["pos"], "pos", allow_str=True)
    if not pos:
        raise ValueError("'pos' is an empty list")
    neg = text_list(obj.get("neg", []), "neg", allow_str=False)
    if num_negatives > 0 and not neg:
        raise ValueError(f"no 'neg' texts, but {num_negatives} hard negatives per example were asked for")
    pool = text_list(obj.get("neg_pool", []), "neg_pool", allow_str=False)
    return Record(query, pos, neg, pool, _scores(obj, "neg_scores", neg, "neg"),
                  _scores(obj, "neg_pool_scores", pool, "neg_pool"), _scores(obj, "pos_scores", pos, "pos"))


def pair_maker(num_negatives: int, sample: bool = True, need_scores: bool = False) -> Callable[[str, random.Random, str], Example]:
    """Line -> Example with one positive and num_negatives negatives, each with its score if the line has them.

    sample: negatives drawn afresh each epoch (as FlagEmbedding does); otherwise the first ones in
    order (dynamic mining tracks the scores of a fixed set). need_scores: a line without a teacher's
    `pos_scores` and `neg_scores` is bad (distillation). Indices are drawn, not texts, with the same
    random calls as drawing the texts, so each text keeps its score and the data order is unchanged.
    """
    def make(line: str, rng: random.Random, source: str) -> Example:
        r = parse_record(line, num_negatives)
        if need_scores and not (r.pos_scores and (r.neg_scores or not num_negatives)):
            raise ValueError("distillation needs the teacher's 'pos_scores' and 'neg_scores' on every line "
                             "(data_prep/score_teacher.py writes them)")
        neg, order = r.neg, []
        if num_negatives > 0 and sample:
            order = rng.sample(range(len(neg)), num_negatives) if len(neg) >= num_negatives else \
                rng.choices(range(len(neg)), k=num_negatives)
        elif num_negatives > 0:
            order = [i % len(neg) for i in range(num_negatives)]
        picked, scores = [neg[i] for i in order], [r.neg_scores[i] for i in order] if r.neg_scores else []
        p = rng.choice(range(len(r.pos)))
        return Example(r.query, r.pos[p], picked, source, r.pool, scores, r.pool_scores, r.pos,
                       r.pos_scores[p] if r.pos_scores else None)
    return make


def parse_line(raw: bytes, make: Callable, rng: random.Random, source: str, skipped: SkipReport | None):
    """One raw line -> an example, or None for a blank line or one skipped (and counted) as bad;
    a bad line raises DataError naming `source` (file:line) unless skipping."""
    if not raw.strip():
        return None
    try:
        return make(raw.rstrip(b"\r\n").decode("utf-8"), rng, source)
    except (UnicodeDecodeError, ValueError) as e:
        err = DataError(f"{source}: {'not valid UTF-8' if isinstance(e, UnicodeDecodeError) else e}")
        if skipped is None:
            raise err from None
        skipped.add(err)
        return None


def read_examples(path: Path, make: Callable, rng: random.Random, skipped: SkipReport | None) -> Iterator:
    """Examples of one file in order; a bad line raises DataError, or is counted when skipping."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            example = parse_line(raw, make, rng, f"{path}:{line_no}", skipped)
            if example is not None:
                yield example
