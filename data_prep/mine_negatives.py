"""Build ranked hard-negative pools for retrieval data, for dynamic mining during fine-tuning.

    python data_prep/mine_negatives.py --model output/pretrain/final \
        --input data/demo/finetune/retrieval.jsonl --output mined.jsonl [--corpus extra.jsonl] [--top-k 200]

For every query, the corpus (all positives and negatives of the data, plus an optional corpus file
of {"text"} lines or plain lines) is searched with faiss; the ranked candidates, after false-negative
filtering, become `neg_pool`. Filtering drops a candidate that is
  - a positive of the query, or the query itself,
  - a near-duplicate of a positive (the same text after NFKC, lower-casing and removing spaces and
    punctuation),
  - scored above --perc-pos x the query's lowest positive score (NV-Retriever's TopK-PercPos, 95%).
The corpus is encoded and searched chunk by chunk (--chunk-size texts at a time), keeping a running
top-K per query, so the corpus embeddings never need to fit in memory at once.
Output lines: {"query", "pos", "neg", "neg_scores", "neg_pool", "neg_pool_scores"}; `neg` is kept when
the input has one, otherwise the first --num-negatives of the pool. The scores (cosine with the query
under --model) are the S0 that dynamic mining compares the training scores with (train/step/mining.py).
"""
from __future__ import annotations

import argparse
import json
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np


from train.input.records import DataError, parse_record, read_examples


def normalize_text(text: str) -> str:
    """Key for near-duplicate detection: NFKC, lower case, no spaces or punctuation."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not unicodedata.category(ch)[0] in "PZ" and not ch.isspace())


def read_retrieval(path: Path) -> list[dict]:
    """{query, pos, neg} rows; a bad line raises DataError naming the file and line."""
    def make(line: str, rng, source: str) -> dict:
        record = parse_record(line, 0)
        return {"query": record.query, "pos": record.pos, "neg": record.neg}
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = list(read_examples(path, make, None, None))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def read_corpus(path: Path):
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


def corpus_texts(rows: list[dict], extra: Path | None) -> list[str]:
    """Unique texts, in first-seen order: the data's positives and negatives, then the extra corpus."""
    seen = dict.fromkeys(t for r in rows for t in r["pos"] + r["neg"])
    if extra:
        seen.update(dict.fromkeys(read_corpus(extra)))
    return list(seen)


def encode(model, texts: list[str], prompt: str, batch_size: int, desc: str) -> np.ndarray:
    return model.encode(texts, prompt=prompt, batch_size=batch_size, normalize_embeddings=True,
                        convert_to_numpy=True, show_progress_bar=len(texts) > batch_size).astype(np.float32)


def search_in_chunks(model, queries: np.ndarray, corpus: list[str], prompt: str, top_k: int,
                     chunk_size: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, corpus ids) per query, encoding and searching the corpus one chunk at a time."""
    import faiss
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(corpus), chunk_size):
        chunk = encode(model, corpus[start:start + chunk_size], prompt, batch_size, "corpus")
        index = faiss.IndexFlatIP(chunk.shape[1])
        index.add(chunk)
        scores, ids = index.search(queries, min(top_k, len(chunk)))
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_ids = np.concatenate([best_ids, ids + start], axis=1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :top_k]
        best_scores = np.take_along_axis(best_scores, keep, axis=1)
        best_ids = np.take_along_axis(best_ids, keep, axis=1)
    return best_scores, best_ids


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
            text = corpus[i]
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="local folder or hub id of a sentence-transformers model")
    ap.add_argument("--input", required=True, help="retrieval JSONL: {query, pos, neg?}")
    ap.add_argument("--output", required=True)
    ap.add_argument("--corpus", default=None, help="extra candidate texts: JSONL {text} or plain lines")
    ap.add_argument("--top-k", type=int, default=200)
    ap.add_argument("--num-negatives", type=int, default=7, help="initial 'neg' when the input has none")
    ap.add_argument("--perc-pos", type=float, default=0.95, help="TopK-PercPos: drop candidates above this x positive score")
    ap.add_argument("--query-prompt", default=None, help="default: the model's 'query' prompt")
    ap.add_argument("--passage-prompt", default=None, help="default: the model's 'passage' prompt")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=100_000, help="corpus texts encoded and searched at a time")
    args = ap.parse_args(argv)

    from sentence_transformers import SentenceTransformer

    from train.models.model import resolve_model
    try:
        rows = read_retrieval(Path(args.input))
        corpus = corpus_texts(rows, Path(args.corpus) if args.corpus else None)
    except (DataError, FileNotFoundError) as e:
        raise SystemExit(f"data error: {e}") from None
    source, local_only = resolve_model(args.model)
    model = SentenceTransformer(source, device=None, local_files_only=local_only)
    qp = args.query_prompt if args.query_prompt is not None else model.prompts.get("query", "")
    pp = args.passage_prompt if args.passage_prompt is not None else model.prompts.get("passage", "")
    print(f"{len(rows)} queries, corpus of {len(corpus)} unique texts")

    queries = encode(model, [r["query"] for r in rows], qp, args.batch_size, "queries")
    # the lowest positive score of each query: the TopK-PercPos threshold
    flat_pos = [t for r in rows for t in r["pos"]]
    pos_emb = encode(model, flat_pos, pp, args.batch_size, "positives")
    owner = np.repeat(np.arange(len(rows)), [len(r["pos"]) for r in rows])
    pos_scores = (queries[owner] * pos_emb).sum(1)
    floor = np.full(len(rows), np.inf, dtype=np.float32)
    np.minimum.at(floor, owner, pos_scores)

    # a few extra candidates so that dropped ones do not shorten the pool below top-k
    scores, ids = search_in_chunks(model, queries, corpus, pp, args.top_k + 10, args.chunk_size, args.batch_size)
    pools, dropped = build_pools(rows, corpus, scores, ids, floor, args.perc_pos)

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    given = [t for r in rows for t in r["neg"]]  # the data's own negatives: scored too, for S0
    given_scores = (queries[np.repeat(np.arange(len(rows)), [len(r["neg"]) for r in rows])]
                    * encode(model, given, pp, args.batch_size, "negatives")).sum(1) if given else np.zeros(0)
    at = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row, pool in zip(rows, pools):
            pool = pool[:args.top_k]
            if row["neg"]:
                neg, neg_scores = row["neg"], [float(x) for x in given_scores[at:at + len(row["neg"])]]
                at += len(row["neg"])
            else:
                neg, neg_scores = [t for t, _ in pool[:args.num_negatives]], [x for _, x in pool[:args.num_negatives]]
            f.write(json.dumps({"query": row["query"], "pos": row["pos"], "neg": neg, "neg_scores": neg_scores,
                                "neg_pool": [t for t, _ in pool], "neg_pool_scores": [x for _, x in pool]},
                               ensure_ascii=False) + "\n")
    tmp.replace(out)
    sizes = [min(len(p), args.top_k) for p in pools]
    print(f"wrote {out}: pools of {min(sizes)}-{max(sizes)} candidates (mean {np.mean(sizes):.1f})")
    for reason, count in dropped.most_common():
        print(f"  dropped {count}: {reason}")


if __name__ == "__main__":
    main()
