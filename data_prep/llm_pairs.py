"""LLM instruction data -> weakly supervised pairs (Conan-embedding §2.1: prompt -> response).

    python data_prep/llm_pairs.py INPUT [INPUT ...] --output pairs.jsonl [--max-chars 2048 --long truncate]

Formats, detected per record, JSON list or JSONL:
  alpaca      {"instruction", "input", "output"}            -> (instruction + input, output)
  sharegpt    {"conversations": [{"from", "value"}, ...]}    -> every user turn -> the assistant reply after it
  messages    {"messages": [{"role", "content"}, ...]}       -> the same, OpenAI style
  dpo         {"conversations", "chosen", "rejected"}        -> (last user turn, chosen), rejected as a hard negative
Cleaning: empty or whitespace texts are dropped; texts over --max-chars are truncated or dropped
(--long); exact duplicate (query, positive) pairs are dropped. A summary says what was kept,
dropped and why. Output lines: {"query", "pos": [..], "neg": [..]?}, written to a temporary file
and renamed at the end, so the output is never half a line.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Iterator


from train.input.data import DataError

USER, ASSISTANT = {"human", "user"}, {"gpt", "assistant", "bot", "model"}


def records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for a JSON list (where = 'file:item N') or a JSONL file (where = 'file:line')."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16).lstrip()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    if head.startswith(b"["):
        try:
            items = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{path}: not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        for i, item in enumerate(items):
            yield f"{path}:item {i}", item
        return
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield where, DataError(f"{where}: not valid UTF-8")
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})")


def _str(record: dict, key: str) -> str:
    value = record.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _turns(turns, who: str, text: str) -> list[tuple[str, str]]:
    if not isinstance(turns, list):
        raise ValueError("conversation turns must be a list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or who not in turn or text not in turn:
            raise ValueError(f"turn {i} must be an object with '{who}' and '{text}'")
        if not isinstance(turn[text], str):
            raise ValueError(f"turn {i}: '{text}' must be a string")
        out.append((str(turn[who]).lower(), turn[text]))
    return out


def pairs_of(record) -> tuple[str, list[tuple[str, str, str | None]]]:
    """(format, [(query, positive, negative or None)]) of one record; ValueError if it fits no format."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "chosen" in record and "rejected" in record:
        turns = _turns(record.get("conversations", []), "from", "value")
        users = [t for who, t in turns if who in USER]
        if not users:
            raise ValueError("dpo record without a user turn")
        chosen, rejected = record["chosen"], record["rejected"]
        chosen = chosen.get("value") if isinstance(chosen, dict) else chosen
        rejected = rejected.get("value") if isinstance(rejected, dict) else rejected
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ValueError("'chosen' and 'rejected' must be strings or {from, value} objects")
        return "dpo", [(users[-1], chosen, rejected)]
    if "instruction" in record or "output" in record:
        for key in ("instruction", "output"):
            if key not in record:
                raise ValueError(f"alpaca record without '{key}'")
        prompt = "\n".join(x for x in (_str(record, "instruction"), _str(record, "input")) if x.strip())
        return "alpaca", [(prompt, _str(record, "output"), None)]
    for key, who, text, fmt in (("conversations", "from", "value", "sharegpt"), ("messages", "role", "content", "messages")):
        if key in record:
            turns = _turns(record[key], who, text)
            return fmt, [(t, nxt, None) for (w, t), (w2, nxt) in zip(turns, turns[1:]) if w in USER and w2 in ASSISTANT]
    raise ValueError(f"no known format (fields: {', '.join(record) or 'none'}); expected alpaca, sharegpt, messages or dpo")


class Cleaner:
    """Drops empty texts and exact duplicates; truncates or drops long texts; counts every decision."""

    def __init__(self, max_chars: int, long: str):
        self.max_chars, self.long = max_chars, long
        self.seen: set[int] = set()
        self.counts: Counter = Counter()

    def clean(self, query: str, pos: str, neg: str | None) -> dict | None:
        texts = [query, pos] + ([neg] if neg is not None else [])
        if any(not t.strip() for t in texts):
            self.counts["dropped: empty or whitespace text"] += 1
            return None
        if any(len(t) > self.max_chars for t in texts):
            if self.long == "drop":
                self.counts[f"dropped: text over {self.max_chars} characters"] += 1
                return None
            self.counts[f"truncated: text over {self.max_chars} characters"] += 1
            query, pos, neg = (t[:self.max_chars] if t is not None else None for t in (query, pos, neg))
        key = hash((query, pos))
        if key in self.seen:
            self.counts["dropped: exact duplicate pair"] += 1
            return None
        self.seen.add(key)
        self.counts["kept"] += 1
        return {"query": query, "pos": [pos], **({"neg": [neg]} if neg is not None else {})}


def convert(inputs: list[Path], output: Path, max_chars: int = 2048, long: str = "truncate",
            skip_bad: bool = False) -> tuple[Counter, list[str]]:
    """Write the pairs of all inputs to `output`; returns the counts (formats, kept, dropped by reason)
    and the first few bad records skipped."""
    cleaner, counts, bad = Cleaner(max_chars, long), Counter(), []
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as out:
        for path in inputs:
            for where, record in records(path):
                try:
                    if isinstance(record, DataError):
                        raise record
                    fmt, pairs = pairs_of(record)
                except (ValueError, DataError) as e:
                    err = e if isinstance(e, DataError) else DataError(f"{where}: {e}")
                    if not skip_bad:
                        raise err from None
                    counts["skipped: bad record"] += 1
                    if len(bad) < 5:
                        bad.append(str(err))
                    continue
                counts[f"format: {fmt}"] += 1
                for query, pos, neg in pairs:
                    row = cleaner.clean(query, pos, neg)
                    if row is not None:
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(output)
    return counts + cleaner.counts, bad


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--output", required=True)
    ap.add_argument("--max-chars", type=int, default=2048)
    ap.add_argument("--long", choices=["truncate", "drop"], default="truncate")
    ap.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    args = ap.parse_args(argv)
    try:
        counts, bad = convert([Path(p) for p in args.inputs], Path(args.output), args.max_chars, args.long, args.skip_bad)
    except DataError as e:
        raise SystemExit(f"data error: {e}\n(pass --skip-bad to skip and count such records)") from None
    print(f"wrote {args.output}")
    for key, n in sorted(counts.items()):
        print(f"  {key}: {n}")
    for line in bad:
        print(f"  skipped: {line}")


if __name__ == "__main__":
    main()
