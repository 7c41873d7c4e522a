"""Write a teacher's scores into training data, for distillation (the task config's `distill`).

    python data_prep/score_teacher.py --model BAAI/bge-reranker-v2-m3 --kind cross-encoder \
        --input retrieval.jsonl --output retrieval.scored.jsonl
    python data_prep/score_teacher.py --model intfloat/multilingual-e5-small --kind embedder \
        --input mined.jsonl --output mined.scored.jsonl          # the base as its own teacher

Each line {"query", "pos", "neg"?, "neg_pool"?, ...} is written back with the teacher's score of every
text added: "pos_scores", "neg_scores", and "neg_pool_scores" when the line has a ranked pool from
data_prep/mine_negatives.py (so a negative mining swaps in brings its teacher score along). Other fields
pass through. An embedder scores by cosine (with its query / passage prompts); a cross-encoder
(sentence-transformers' CrossEncoder) by its logit of each (query, text) pair. Streamed in chunks,
on several devices with --devices (embedders), and resumable after a kill with no line lost or
repeated: the machinery is data_prep/chunked.py's, shared with filter_pairs.py.

The scores replace what the line carried: mine_negatives.py's "neg_scores" are the mining model's
cosines, which mining's v1 / v2 rules read as S0 with cosine thresholds. A cross-encoder's scores are
on another scale; use an embedder teacher (the base itself) where mining and distillation run together.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from data_prep.chunked import open_part_job, part_of_run
from data_prep.filter_pairs import Scorer, part_devices
from train.input.records import json_object, text_field, text_list

FIELDS = (("pos", "pos_scores"), ("neg", "neg_scores"), ("neg_pool", "neg_pool_scores"))


def parse_line(line: str) -> dict:
    record = json_object(line, "query", "pos")
    record["query"] = text_field(record["query"], "query")
    record["pos"] = text_list(record["pos"], "pos", allow_str=True)
    for key in ("neg", "neg_pool"):
        if key in record:
            record[key] = text_list(record[key], key, allow_str=False)
    return record


class CrossEncoderScorer:
    """A sentence-transformers CrossEncoder's score of each (query, text) pair."""

    def __init__(self, model_name: str, device: str | None, batch_size: int):
        from sentence_transformers import CrossEncoder

        from train.models.model import resolve_model
        source, local_only = resolve_model(model_name)
        self.model = CrossEncoder(source, device=device, local_files_only=local_only)
        self.batch_size = batch_size

    def scores(self, queries: list[str], texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.predict(list(zip(queries, texts)), batch_size=self.batch_size,
                                             show_progress_bar=False), dtype=np.float64).reshape(-1)

    def close(self) -> None:
        pass


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="the teacher: local folder or hub id")
    ap.add_argument("--kind", default="embedder", choices=["embedder", "cross-encoder"])
    ap.add_argument("--input", nargs="+", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--chunk-size", type=int, default=5_000, help="lines read, scored and written at a time")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--devices", default="auto",
                    help="embedders: comma-separated, e.g. cuda:0,cuda:1 (one process each); auto: every GPU. "
                         "A cross-encoder runs on the first")
    ap.add_argument("--query-prompt", default=None, help="embedders: default the model's 'query' prompt")
    ap.add_argument("--passage-prompt", default=None, help="embedders: default the model's 'passage' prompt")
    ap.add_argument("--skip-bad", action="store_true", help="skip and count bad lines instead of stopping")
    ap.add_argument("--part", default=None, metavar="I/N",
                    help="do part I of N of the input (contiguous chunks) into OUTPUT/part-I-of-N.jsonl; under "
                         "torchrun / deepspeed each rank does its own part (data_prep/join_parts.py joins them)")
    args = ap.parse_args(argv)

    inputs = [str(Path(p).resolve()) for p in args.input]
    part = part_of_run(args.part)
    job = open_part_job(Path(args.output), inputs, {"teacher": args.model, "kind": args.kind},
                        {"records": 0, "scores": 0, "skipped": 0}, args.chunk_size, part)
    if job.resumed:
        print(f"resuming after {job.state['lines_done']} input lines ({job.state['chunks']} chunks)")
    devices = part_devices(args.devices, part, args.part)
    scorer = CrossEncoderScorer(args.model, devices[0] if devices else None, args.batch_size) \
        if args.kind == "cross-encoder" else Scorer(args.model, devices, args.batch_size, args.query_prompt,
                                                    args.passage_prompt)
    skipped: list[str] = []
    t0, done = time.time(), 0
    try:
        with job.files() as (out,):
            for chunk in job.chunks(args.chunk_size, parse_line, args.skip_bad, skipped):
                records = [r for _, r in (c for c in chunk if c is not None)]
                flat = [(i, field, text) for i, r in enumerate(records) for field, _ in FIELDS for text in r.get(field, [])]
                scores = scorer.scores([records[i]["query"] for i, _, _ in flat], [t for _, _, t in flat]) \
                    if flat else np.zeros(0)
                for r in records:
                    for field, key in FIELDS:
                        if field in r:
                            r[key] = []
                for (i, field, _), s in zip(flat, scores):
                    records[i][dict(FIELDS)[field]].append(round(float(s), 6))
                for r in records:
                    out.write(json.dumps(r, ensure_ascii=False) + "\n")
                job.commit(len(chunk), records=len(records), scores=len(flat), skipped=len(chunk) - len(records))
                done += len(flat)
                print(f"chunk {job.state['chunks']}: {job.state['lines_done']} lines, "
                      f"{done / (time.time() - t0):,.0f} texts/s", flush=True)
    finally:
        scorer.close()
    print(f"scored {job.state['scores']} texts on {job.state['records']} lines with {args.model} ({args.kind}) "
          f"into {job.output}")
    if skipped:
        print(f"skipped {len(skipped)} bad lines this run; first: {skipped[:3]}")
    return job.state


if __name__ == "__main__":
    main()
