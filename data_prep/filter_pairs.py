"""Score weakly supervised pairs with an embedding model and keep those at or above a threshold.

    python data_prep/filter_pairs.py --model BAAI/bge-large-zh-v1.5 --input pairs/*.jsonl --output kept.jsonl
    python data_prep/filter_pairs.py --model M --input pairs.jsonl --output kept.jsonl --devices cuda:0,cuda:1

The paper scores its ~750M pairs with bge-large-zh-v1.5 (cosine of the two embeddings) and keeps
~400M. Input lines are {"query", "pos", ...}; a line keeps the positives that score >= --threshold
(0.4) and is dropped when none does; other fields pass through. Input of any size is streamed in
chunks of --chunk-size pairs; each chunk is encoded in large batches (sentence-transformers sorts a
call's texts by length, so a whole chunk pads little), on several devices or CPU processes with
--devices. After each chunk the output is flushed to disk and a progress file records how far it
got, so a killed run continues where it stopped (no duplicate, no hole, never half a line): the
machinery is data_prep/chunked.py's, shared with score_teacher.py.
At the end: a report (counts, a score histogram PNG) so the threshold can be chosen.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


from data_prep.chunked import open_part_job, part_of_run
from train.input.records import json_object, text_field, text_list

BINS = np.linspace(-1.0, 1.0, 41)


def parse_pair(line: str) -> dict:
    record = json_object(line, "query", "pos")
    record["query"] = text_field(record["query"], "query")
    record["pos"] = text_list(record["pos"], "pos", allow_str=True)
    return record


class Scorer:
    """cosine(query, positive) with a sentence-transformers model, on one or several devices."""

    def __init__(self, model_name: str, devices: list[str] | None, batch_size: int,
                 query_prompt: str | None, passage_prompt: str | None):
        from sentence_transformers import SentenceTransformer

        from train.models.model import resolve_model
        source, local_only = resolve_model(model_name)
        # with a pool of worker processes the parent's copy stays on the CPU: sentence-transformers moves it
        # there anyway, and on devices[0] it would keep a CUDA context and cached memory beside that worker
        pooled = bool(devices) and len(devices) > 1
        self.model = SentenceTransformer(source, device="cpu" if pooled else devices[0] if devices else None,
                                         local_files_only=local_only)
        self.query_prompt = self.model.prompts.get("query", "") if query_prompt is None else query_prompt
        self.passage_prompt = self.model.prompts.get("passage", "") if passage_prompt is None else passage_prompt
        self.pool = self.model.start_multi_process_pool(devices) if pooled else None
        self.batch_size = batch_size

    def encode(self, texts: list[str], prompt: str) -> np.ndarray:
        return self.model.encode(texts, prompt=prompt, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, pool=self.pool, show_progress_bar=False)

    def scores(self, queries: list[str], passages: list[str]) -> np.ndarray:
        # each distinct text is encoded once: a query is paired with all its candidates, and ranked pools
        # from one corpus repeat the same passages
        q_texts, q_index = distinct(queries)
        p_texts, p_index = distinct(passages)
        return (self.encode(q_texts, self.query_prompt)[q_index] * self.encode(p_texts, self.passage_prompt)[p_index]).sum(1)

    def close(self) -> None:
        if self.pool is not None:
            self.model.stop_multi_process_pool(self.pool)


def distinct(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """The distinct texts in first-seen order, and each text's index among them."""
    position: dict[str, int] = {}
    index = np.array([position.setdefault(t, len(position)) for t in texts], dtype=np.int64)
    return list(position), index


def all_gpus() -> list[str] | None:
    import torch
    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] if n > 1 else None


def part_devices(devices: str, part: tuple[int, int] | None, explicit: str | None) -> list[str] | None:
    """--devices; a rank of a launch (a part not named by --part) with auto uses its own GPU, cuda:LOCAL_RANK."""
    import os

    import torch
    if devices != "auto":
        return devices.split(",")
    if part is not None and not explicit:
        return [f"cuda:{os.environ.get('LOCAL_RANK', 0)}"] if torch.cuda.is_available() else None
    return all_gpus()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="scoring model (paper: BAAI/bge-large-zh-v1.5); local folder or hub id")
    ap.add_argument("--input", nargs="+", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--threshold", type=float, default=0.4)
    ap.add_argument("--scores-output", default=None, help="also write {where, scores} per line")
    ap.add_argument("--chunk-size", type=int, default=20_000, help="pairs read, scored and written at a time")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--devices", default="auto",
                    help="comma-separated, e.g. cuda:0,cuda:1 or cpu,cpu (one process each); auto: every GPU, else one CPU process")
    ap.add_argument("--query-prompt", default=None)
    ap.add_argument("--passage-prompt", default=None)
    ap.add_argument("--skip-bad", action="store_true", help="skip and count bad lines instead of stopping")
    ap.add_argument("--part", default=None, metavar="I/N",
                    help="do part I of N of the input (contiguous chunks) into OUTPUT/part-I-of-N.jsonl; under "
                         "torchrun / deepspeed each rank does its own part (data_prep/join_parts.py joins them)")
    args = ap.parse_args(argv)

    inputs = [str(Path(p).resolve()) for p in args.input]
    scores_path = Path(args.scores_output) if args.scores_output else None
    part = part_of_run(args.part)
    job = open_part_job(Path(args.output), inputs, {"threshold": args.threshold},
                        {"pairs": 0, "kept_pairs": 0, "kept_lines": 0, "dropped_lines": 0, "skipped": 0,
                         "hist": [0] * (len(BINS) - 1)}, args.chunk_size, part, extra=[scores_path])
    state = job.state
    if job.resumed:
        print(f"resuming after {state['lines_done']} input lines ({state['chunks']} chunks)")

    devices = part_devices(args.devices, part, args.part)
    scorer = Scorer(args.model, devices, args.batch_size, args.query_prompt, args.passage_prompt)
    skipped: list[str] = []
    t0, pairs_this_run = time.time(), 0
    try:
        with job.files() as (out, scores_out):
            for chunk in job.chunks(args.chunk_size, parse_pair, args.skip_bad, skipped):
                items = [c for c in chunk if c is not None]
                flat = [(i, p) for i, (_, r) in enumerate(items) for p in r["pos"]]
                scores = scorer.scores([items[i][1]["query"] for i, _ in flat], [p for _, p in flat]) if flat else np.zeros(0)
                per_line: list[list[float]] = [[] for _ in items]
                for (i, _), s in zip(flat, scores):
                    per_line[i].append(float(s))
                kept_lines = kept_pairs = 0
                for (where, record), line_scores in zip(items, per_line):
                    kept = [p for p, s in zip(record["pos"], line_scores) if s >= args.threshold]
                    if kept:
                        out.write(json.dumps({**record, "pos": kept}, ensure_ascii=False) + "\n")
                        kept_lines += 1
                    if scores_out:
                        scores_out.write(json.dumps({"where": where, "scores": [round(s, 5) for s in line_scores]}) + "\n")
                    kept_pairs += len(kept)
                state["hist"] = (np.asarray(state["hist"]) + np.histogram(np.clip(scores, -1, 1), BINS)[0]).tolist()
                job.commit(len(chunk), pairs=len(flat), kept_pairs=kept_pairs, kept_lines=kept_lines,
                           dropped_lines=len(items) - kept_lines, skipped=len(chunk) - len(items))
                pairs_this_run += len(flat)
                rate = pairs_this_run / (time.time() - t0)
                print(f"chunk {state['chunks']}: {state['lines_done']} lines, {state['kept_lines']} kept, "
                      f"{rate:,.0f} pairs/s", flush=True)
    finally:
        scorer.close()
    report = write_report(job.output, state, args.threshold, skipped)
    print(f"kept {state['kept_lines']} of {state['kept_lines'] + state['dropped_lines']} lines "
          f"({state['kept_pairs']} of {state['pairs']} pairs) at threshold {args.threshold}; report: {report}")
    if skipped:
        print(f"skipped {len(skipped)} bad lines this run; first: {skipped[:3]}")
    return state


def write_report(output: Path, state: dict, threshold: float, skipped: list[str]) -> Path:
    """OUTPUT.report.json and a histogram PNG of the pair scores with the threshold marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = output.with_name(output.name + ".report.json")
    report.write_text(json.dumps({"threshold": threshold, "pairs": state["pairs"], "kept_pairs": state["kept_pairs"],
                                  "kept_lines": state["kept_lines"], "dropped_lines": state["dropped_lines"],
                                  "blank_or_skipped_lines": state["skipped"], "skipped_examples": skipped[:10],
                                  "histogram": {"bins": BINS.tolist(), "counts": state["hist"]}}, indent=2))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(BINS[:-1], state["hist"], width=np.diff(BINS), align="edge")
    ax.axvline(threshold, color="tab:red", label=f"threshold {threshold}")
    ax.set_xlabel("cosine(query, positive)")
    ax.set_ylabel("pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output.with_name(output.name + ".scores.png"), dpi=110)
    plt.close(fig)
    return report


if __name__ == "__main__":
    main()
