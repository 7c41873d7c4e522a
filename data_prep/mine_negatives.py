"""Build ranked hard-negative pools for retrieval data, for dynamic mining during fine-tuning, at any
corpus size.

    python data_prep/mine_negatives.py --model output/pretrain/final \
        --input data/demo/finetune/retrieval.jsonl --output mined.jsonl [--corpus extra.jsonl ...] [--top-k 200]
    torchrun --nproc_per_node 8 data_prep/mine_negatives.py ...      # each rank encodes its corpus shards
    python data_prep/mine_negatives.py ... --devices cuda:0,cuda:1   # or one process, several devices

For every query, the corpus (all positives and negatives of the data, plus optional corpus files of
{"text"} lines or plain lines) is searched; the ranked candidates, after false-negative filtering,
become `neg_pool`. Filtering drops a candidate that is
  - a positive of the query, or the query itself,
  - a near-duplicate of a positive (the same text after NFKC, lower-casing and removing spaces and
    punctuation),
  - scored above --perc-pos x the query's lowest positive score (NV-Retriever's TopK-PercPos, 95%).
Output lines: {"query", "pos", "neg", "neg_scores", "neg_pool", "neg_pool_scores"}; `neg` is kept when
the input has one, otherwise the first --num-negatives of the pool. The scores (cosine with the query
under --model) are the S0 that dynamic mining compares the training scores with (train/step/mining.py).

At scale (data_prep/corpus_store.py): nothing is held whole in memory. The corpus is streamed into an
on-disk store of its unique texts (read back by position for the output) and encoded into fp16 shards
(--shard-rows) in OUTPUT.work/; the queries are read, searched and written in chunks (--query-chunk)
with the progress machinery of the filter (data_prep/chunked.py). A killed run started again with the
same command re-encodes at most one shard per rank and continues the output where it stopped; its
output is the uninterrupted run's. The index: exact search streamed over the shards (flat; memory does
not grow with the corpus), or faiss IVF or HNSW held in memory (--index; auto: flat up to 1M texts),
on the GPUs where faiss has them. An approximate index's recall@k against exact search is measured on
--recall-queries queries and printed (and kept in OUTPUT.report.json, with each phase's time).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from data_prep.chunked import ChunkedJob, read_chunks
from data_prep.corpus_store import EmbeddingStore, TextStore, wait_for
from train.input.records import DataError, parse_record

AUTO_FLAT_MAX = 1_000_000  # --index auto: exact search up to this many corpus texts
DROPS = {"positive or the query itself": "dropped_positive", "near-duplicate of a positive": "dropped_near_duplicate",
         "likely false negative": "dropped_above_perc_pos"}


def normalize_text(text: str) -> str:
    """Key for near-duplicate detection: NFKC, lower case, no spaces or punctuation."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not unicodedata.category(ch)[0] in "PZ" and not ch.isspace())


def read_corpus(path: Path) -> Iterator[str]:
    """Texts of a corpus file: JSONL with a "text" field, or one text per line."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}:{line_no}: expected a JSON object with a 'text' field") from None
                yield text
            else:
                yield line


def corpus_sources(input_path: Path, extra: list[Path]) -> list[str]:
    """What the store is made of (paths and sizes): another input or corpus means another store."""
    return [f"{p}:{p.stat().st_size}" for p in [input_path, *extra]]


def corpus_stream(input_path: Path, extra: list[Path]) -> Iterator[str]:
    """The data's positives and negatives, then the extra corpora's texts, as read (duplicates included)."""
    for chunk in read_chunks([input_path], 10_000, 0, parse_row, False, []):
        for item in chunk:
            if item:
                yield from item[1]["pos"] + item[1]["neg"]
    for path in extra:
        yield from read_corpus(path)


def parse_row(line: str) -> dict:
    record = parse_record(line, 0)
    return {"query": record.query, "pos": record.pos, "neg": record.neg}


def encoder(model, prompt: str, batch_size: int, pool=None) -> Callable[[list[str]], np.ndarray]:
    def encode(texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
        return model.encode(texts, prompt=prompt, batch_size=batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, pool=pool, show_progress_bar=False).astype(np.float32)
    return encode


def merge_top_k(best: tuple[np.ndarray, np.ndarray], scores: np.ndarray, ids: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """The running top-k (scores, ids) per query, with a new block's candidates merged in."""
    all_scores, all_ids = np.concatenate([best[0], scores], axis=1), np.concatenate([best[1], ids], axis=1)
    keep = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_scores, keep, axis=1), np.take_along_axis(all_ids, keep, axis=1)


def exact_search(embeddings: EmbeddingStore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) by inner product, streamed over the shards: one shard in memory at a time."""
    import faiss
    best = (np.full((len(queries), 0), -np.inf, dtype=np.float32), np.zeros((len(queries), 0), dtype=np.int64))
    for start, block in embeddings.blocks():
        if not len(block):
            continue
        index = faiss.IndexFlatIP(block.shape[1])
        index.add(block)
        scores, ids = index.search(queries, min(k, len(block)))
        best = merge_top_k(best, scores, ids + start, k)
    return best


def choose_index(kind: str, rows: int) -> str:
    return ("flat" if rows <= AUTO_FLAT_MAX else "ivf") if kind == "auto" else kind


def ivf_lists(rows: int) -> int:
    """faiss's guideline: about 4 sqrt(N) lists, each trained from at least 39 points."""
    return max(1, min(int(4 * math.sqrt(rows)), rows // 39))


def build_index(kind: str, embeddings: EmbeddingStore, dim: int, nprobe: int | None, work: Path):
    """An approximate faiss index over every shard (None for flat), saved in the work folder and read back
    on a restart (the same index, so the same output). On the GPUs where this faiss build has them."""
    import faiss
    if kind == "flat":
        return None
    path = work / f"index_{kind}.faiss"
    if path.is_file():
        index = faiss.read_index(str(path))
    else:
        if kind == "ivf":
            lists = ivf_lists(len(embeddings.store))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
            index.train(embeddings.sample(64 * lists))
        else:
            index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
        for _, block in embeddings.blocks():
            index.add(block)
        faiss.write_index(index, str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").replace(path)
    if kind == "ivf":
        index.nprobe = nprobe or max(16, index.nlist // 8)
    else:
        index.hnsw.efSearch = max(128, nprobe or 0)
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def search(index, embeddings: EmbeddingStore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if index is None:
        return exact_search(embeddings, queries, k)
    scores, ids = index.search(queries, k)
    return scores, ids


def recall_at_k(index, embeddings: EmbeddingStore, queries: np.ndarray, k: int) -> float:
    """|approximate top-k and exact top-k| / k, averaged over the queries."""
    _, approximate = search(index, embeddings, queries, k)
    _, exact = exact_search(embeddings, queries, k)
    return float(np.mean([len(set(a[a >= 0]) & set(e)) / max(1, len(e)) for a, e in zip(approximate, exact)]))


def first_queries(input_path: Path, n: int) -> list[str]:
    out = []
    for chunk in read_chunks([input_path], n, 0, parse_row, False, []):
        out += [item[1]["query"] for item in chunk if item]
        break
    return out[:n]


def build_pools(rows, corpus, scores, ids, positive_floor,
                perc_pos: float) -> tuple[list[list[tuple[str, float]]], Counter]:
    """Filtered ranked pools of (text, score), and how many candidates each filter dropped."""
    dropped = Counter()
    pools = []
    for row, row_scores, row_ids, floor in zip(rows, scores, ids, positive_floor):
        positives = set(row["pos"])
        near = {normalize_text(t) for t in row["pos"]}
        pool = []
        for score, i in zip(row_scores, row_ids):
            if i < 0:  # an approximate index found fewer than k
                continue
            text = corpus[int(i)]
            if text in positives or text == row["query"]:
                dropped["positive or the query itself"] += 1
            elif normalize_text(text) in near:
                dropped["near-duplicate of a positive"] += 1
            elif score > perc_pos * floor:
                dropped[f"scored above {perc_pos:.0%} of the positive (likely false negative)"] += 1
            else:
                pool.append((text, float(score)))
        pools.append(pool)
    return pools, dropped


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = ap.add_argument_group("data")
    data.add_argument("--model", required=True, help="local folder or hub id of a sentence-transformers model")
    data.add_argument("--input", required=True, help="retrieval JSONL: {query, pos, neg?}")
    data.add_argument("--output", required=True)
    data.add_argument("--corpus", nargs="*", default=[], help="extra candidate texts: JSONL {text} or plain lines")
    pools = ap.add_argument_group("pools")
    pools.add_argument("--top-k", type=int, default=200)
    pools.add_argument("--num-negatives", type=int, default=7, help="initial 'neg' when the input has none")
    pools.add_argument("--perc-pos", type=float, default=0.95, help="TopK-PercPos: drop candidates above this x positive score")
    pools.add_argument("--query-prompt", default=None, help="default: the model's 'query' prompt")
    pools.add_argument("--passage-prompt", default=None, help="default: the model's 'passage' prompt")
    scale = ap.add_argument_group("scale")
    scale.add_argument("--batch-size", type=int, default=64)
    scale.add_argument("--devices", default=None, help="comma-separated devices to encode on (a process each), e.g. "
                                                       "cuda:0,cuda:1; under torchrun each rank uses its own")
    scale.add_argument("--shard-rows", type=int, default=100_000, help="corpus texts per embedding shard (a kill "
                                                                       "re-encodes at most one)")
    scale.add_argument("--embedding-dtype", default="float16", choices=["float16", "float32"],
                       help="the stored corpus embeddings: float16 halves the disk; pool scores (S0) then differ from "
                            "fp32 by about 1e-3")
    scale.add_argument("--query-chunk", type=int, default=10_000, help="queries searched and written at a time")
    scale.add_argument("--index", default="auto", choices=["auto", "flat", "ivf", "hnsw"],
                       help=f"flat: exact, streamed over the shards; ivf / hnsw: faiss, in memory (auto: flat up to "
                            f"{AUTO_FLAT_MAX:,} texts, else ivf)")
    scale.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default nlist/8, at least 16); "
                                                                "HNSW: efSearch")
    scale.add_argument("--recall-queries", type=int, default=500, help="queries on which an approximate index's "
                                                                        "recall@k against exact search is measured")
    scale.add_argument("--work-dir", default=None, help="the text store, shards and index (default OUTPUT.work)")
    return ap.parse_args(argv)


def open_encoder(args, rank: int, world: int):
    """(model, its pool of device processes or None)."""
    import torch
    from sentence_transformers import SentenceTransformer

    from train.models.model import resolve_model
    source, local_only = resolve_model(args.model)
    devices = [d for d in (args.devices or "").split(",") if d]
    if world > 1 and torch.cuda.is_available():
        devices = [f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"]
    pooled = len(devices) > 1
    model = SentenceTransformer(source, device="cpu" if pooled else devices[0] if devices else None,
                                local_files_only=local_only)
    return model, model.start_multi_process_pool(devices) if pooled else None


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    output, input_path = Path(args.output), Path(args.input)
    extra = [Path(c) for c in args.corpus]
    work = Path(args.work_dir or output.with_name(output.name + ".work"))
    times, started = {}, time.time()
    for path in [input_path, *extra]:
        if not path.is_file():
            raise SystemExit(f"data error: {path}: no such file")
    model, pool = open_encoder(args, rank, world)
    qp = args.query_prompt if args.query_prompt is not None else model.prompts.get("query", "")
    pp = args.passage_prompt if args.passage_prompt is not None else model.prompts.get("passage", "")

    # --- the corpus: unique texts on disk (rank 0), then each rank's embedding shards
    sources = corpus_sources(input_path, extra)
    if rank == 0:
        try:
            store = TextStore.build(work / "texts", sources, corpus_stream(input_path, extra))
        except DataError as e:
            raise SystemExit(f"data error: {e}") from None
    else:
        wait_for(f"rank 0's text store in {work / 'texts'}", lambda: TextStore.is_built(work / "texts", sources), 24 * 3600)
        store = TextStore(work / "texts")
    times["store_s"] = time.time() - started
    embeddings = EmbeddingStore(work / "embeddings", store, args.shard_rows,
                                {"model": str(args.model), "prompt": pp, "sources": sources}, args.embedding_dtype)
    encoded = embeddings.encode(encoder(model, pp, args.batch_size, pool), rank, world,
                                progress=lambda m: print(m, flush=True) if rank == 0 or world > 1 else None)
    times["encode_s"] = time.time() - started - times["store_s"]
    if rank != 0:
        return  # rank 0 searches and writes
    embeddings.wait_complete()
    print(f"corpus of {len(store):,} unique texts in {embeddings.shards} shards ({encoded} encoded now)", flush=True)

    # --- the index, and what its approximation costs
    encode_query = encoder(model, qp, args.batch_size, pool)
    encode_passage = encoder(model, pp, args.batch_size, pool)
    dim = model.get_embedding_dimension()
    kind = choose_index(args.index, len(store))
    mark = time.time()
    index = build_index(kind, embeddings, dim, args.nprobe, work)
    times["index_s"] = time.time() - mark
    k = args.top_k + 10  # a few extra candidates so that dropped ones do not shorten the pool below top-k
    recall = None
    if index is not None:
        mark = time.time()
        recall = recall_at_k(index, embeddings, encode_query(first_queries(input_path, args.recall_queries)),
                             args.top_k)
        times["recall_s"] = time.time() - mark
        print(f"index {kind}: recall@{args.top_k} {recall:.3f} against exact search on {args.recall_queries} queries")

    # --- the queries, chunk by chunk, resumable
    mark = time.time()
    job = ChunkedJob(output, [str(input_path)], settings={
        "model": str(args.model), "corpus": sources, "top_k": args.top_k, "perc_pos": args.perc_pos,
        "num_negatives": args.num_negatives, "query_prompt": qp, "passage_prompt": pp, "index": kind,
        "nprobe": args.nprobe, "embedding_dtype": args.embedding_dtype}, counters={"queries": 0, "pool_total": 0, "pool_min": None, "pool_max": 0,
                                          **{key: 0 for key in DROPS.values()}})
    with job.files() as (out,):
        for chunk in job.chunks(args.query_chunk, parse_row, False, []):
            rows = [item[1] for item in chunk if item]
            lines, counts = mine_chunk(rows, store, embeddings, index, k, encode_query, encode_passage, args)
            out.write("".join(lines))
            if counts["queries"]:  # recorded with the chunk's progress, as the counts are
                job.state["pool_min"] = min(x for x in (job.state["pool_min"], counts["pool_min"]) if x is not None)
                job.state["pool_max"] = max(job.state["pool_max"], counts["pool_max"])
            job.commit(len(chunk), **{key: counts[key] for key in ("queries", "pool_total", *DROPS.values())})
    times["search_write_s"] = time.time() - mark
    state = job.state
    report = {"queries": state["queries"], "corpus": len(store), "index": kind, f"recall_at_{args.top_k}": recall,
              "seconds": {**{k_: round(v, 2) for k_, v in times.items()}, "total_s": round(time.time() - started, 2)},
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "dropped": {reason: state[key] for reason, key in DROPS.items()}}
    output.with_name(output.name + ".report.json").write_text(json.dumps(report, indent=1) + "\n")
    mean = state["pool_total"] / max(1, state["queries"])
    print(f"wrote {output}: {state['queries']} queries, pools of {state['pool_min']}-{state['pool_max']} candidates "
          f"(mean {mean:.1f})")
    for reason, key in DROPS.items():
        if state[key]:
            print(f"  dropped {state[key]}: {reason}")
    if pool is not None:
        model.stop_multi_process_pool(pool)


def mine_chunk(rows: list[dict], store, embeddings, index, k: int, encode_query, encode_passage,
               args) -> tuple[list[str], dict]:
    """The output lines of a chunk of queries, and its counts."""
    queries = encode_query([r["query"] for r in rows])
    # the lowest positive score of each query: the TopK-PercPos threshold
    owner = np.repeat(np.arange(len(rows)), [len(r["pos"]) for r in rows])
    pos_scores = (queries[owner] * encode_passage([t for r in rows for t in r["pos"]])).sum(1)
    floor = np.full(len(rows), np.inf, dtype=np.float32)
    np.minimum.at(floor, owner, pos_scores)
    scores, ids = search(index, embeddings, queries, k) if rows else (np.zeros((0, 0)), np.zeros((0, 0), np.int64))
    pools, dropped = build_pools(rows, store, scores, ids, floor, args.perc_pos)
    given = [t for r in rows for t in r["neg"]]  # the data's own negatives: scored too, for S0
    given_scores = (queries[np.repeat(np.arange(len(rows)), [len(r["neg"]) for r in rows])]
                    * encode_passage(given)).sum(1) if given else np.zeros(0)
    lines, at = [], 0
    for row, pool in zip(rows, pools):
        pool = pool[:args.top_k]
        if row["neg"]:
            neg, neg_scores = row["neg"], [float(x) for x in given_scores[at:at + len(row["neg"])]]
            at += len(row["neg"])
        else:
            neg, neg_scores = [t for t, _ in pool[:args.num_negatives]], [x for _, x in pool[:args.num_negatives]]
        lines.append(json.dumps({"query": row["query"], "pos": row["pos"], "neg": neg, "neg_scores": neg_scores,
                                 "neg_pool": [t for t, _ in pool], "neg_pool_scores": [x for _, x in pool]},
                                ensure_ascii=False) + "\n")
    sizes = [min(len(p), args.top_k) for p in pools]
    counts = {"queries": len(rows), "pool_total": sum(sizes), "pool_min": min(sizes) if sizes else None,
              "pool_max": max(sizes, default=0)}
    for reason, key in DROPS.items():
        counts[key] = sum(n for r, n in dropped.items() if reason in r)
    return lines, counts


if __name__ == "__main__":
    main()
