"""C-MTEB evaluation with the `mteb` library, at every Matryoshka dimension in one run.

    python eval/cmteb.py --model output/finetune/final                       # MTEB(cmn, v1): 31 tasks
    python eval/cmteb.py --model M --task-types STS,Retrieval --dims 256,512,1792
    python eval/cmteb.py --model M --devices cuda:0,cuda:1,cuda:2,cuda:3      # each task's encoding on 4 GPUs
    python eval/cmteb.py --model M --local sts:../shared/data/stsb-zh/validation.jsonl \
        --local retrieval:../shared/data/cmrc2018-trial --update-card          # offline, local data

mteb loads the tasks, computes every metric and writes nothing by hand here. Each text is encoded
once at full width; every dimension in --dims is scored on the first d coordinates of those
embeddings (what `SentenceTransformer(path, truncate_dim=d)` gives). Prompts are the model's saved
ones (query / passage), or --query-prompt / --passage-prompt.
Output: mteb's own result cache in OUTPUT_DIR (results/<model>-dim<d>/<revision>/<task>.json, read by
`mteb.ResultCache(OUTPUT_DIR).load_results()`), OUTPUT_DIR/results.md (a table by task type with the
C-MTEB-style average), and with --update-card that table in the model's README.md. An interrupted run
started again with the same command resumes: the tasks already scored for this model (the revision is
a fingerprint of its weight files) are read back, not encoded again; --overwrite scores everything anew.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

BENCHMARK = "MTEB(cmn, v1)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a sentence-transformers folder (or hub id)")
    p.add_argument("--benchmark", default=BENCHMARK)
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: the whole benchmark)")
    p.add_argument("--task-types", default=None, help="comma-separated: Retrieval,Reranking,STS,PairClassification,...")
    p.add_argument("--local", action="append", default=[], metavar="[KIND:]PATH",
                   help="a local data set (eval/local_tasks.py); repeatable. With only --local, no benchmark task runs")
    p.add_argument("--dims", default=None, help="comma-separated Matryoshka dims (default: the full width)")
    p.add_argument("--query-prompt", default=None)
    p.add_argument("--passage-prompt", default=None)
    p.add_argument("--symmetric-prompt", default=None,
                   help="prompt for both sides of STS, pair classification, classification and clustering "
                        "(default: the query prompt, as e5 recommends; pass '' for BGE)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--devices", default=None,
                   help="comma-separated devices to encode each task on together, a process each (e.g. "
                        "cuda:0,cuda:1; cpu,cpu on a CPU machine): sentence-transformers' multi-process pool")
    p.add_argument("--output-dir", default=None, help="default: MODEL/eval (or eval_results/ for a hub id)")
    p.add_argument("--update-card", action="store_true", help="write the results table into the model's README.md")
    p.add_argument("--overwrite", action="store_true",
                   help="score every task again (default: resume, keeping the tasks already scored for this model)")
    return p.parse_args(argv)


def select_tasks(args) -> list:
    """Benchmark tasks filtered by --tasks / --task-types, plus the --local ones."""
    import mteb

    from eval.local_tasks import local_task
    tasks = [local_task(spec) for spec in args.local]
    if tasks and not (args.tasks or args.task_types):
        return tasks
    try:
        bench = list(mteb.get_benchmark(args.benchmark).tasks)
    except Exception as e:  # mteb raises KeyError / ValueError with its own message
        raise SystemExit(f"--benchmark {args.benchmark!r}: {e}") from None
    if args.tasks:
        wanted = [t.strip() for t in args.tasks.split(",")]
        known = {t.metadata.name: t for t in bench}
        unknown = [t for t in wanted if t not in known]
        if unknown:
            raise SystemExit(f"--tasks: unknown in {args.benchmark}: {unknown}; known: {sorted(known)}")
        bench = [known[t] for t in wanted]
    if args.task_types:
        types = {t.strip() for t in args.task_types.split(",")}
        known_types = {t.metadata.type for t in mteb.get_benchmark(args.benchmark).tasks}
        if types - known_types:
            raise SystemExit(f"--task-types: unknown {sorted(types - known_types)}; known: {sorted(known_types)}")
        bench = [t for t in bench if t.metadata.type in types]
    return bench + tasks


SYMMETRIC_TYPES = ("STS", "PairClassification", "Classification", "MultilabelClassification", "Clustering",
                   "BitextMining", "Summarization")


def caching_encoder(model, dim: int | None, cache: dict, name: str, symmetric_prompt: str | None = None,
                    revision: str = "local", pool: dict | None = None):
    """An mteb encoder that computes each (texts, prompt) embedding once and serves its first `dim` columns;
    with `pool` (sentence-transformers' multi-process pool), the texts are spread over its devices."""
    from mteb.models.model_meta import ModelMeta
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

    class CachedTruncated(SentenceTransformerEncoderWrapper):
        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            texts = [t for batch in inputs for t in batch["text"]]
            key = (task_metadata.name, str(prompt_type), hashlib.sha1(json.dumps(texts).encode()).hexdigest())
            if key not in cache:  # (texts, full-width embeddings): the texts let tests find what was scored
                if pool is not None:  # mteb's wrapper hands its keyword arguments to model.encode
                    kwargs["pool"] = pool
                cache[key] = (texts, np.asarray(super().encode(inputs, task_metadata=task_metadata, hf_split=hf_split,
                                                               hf_subset=hf_subset, prompt_type=prompt_type, **kwargs)))
            full = cache[key][1]
            return full if dim is None else full[:, :dim]

    # mteb's wrapper replaces model.prompts with the ones it is given: read the model's own, as first seen
    own = model.__dict__.setdefault("own_prompts", dict(model.prompts))
    query = own.get("query", "")
    symmetric = query if symmetric_prompt is None else symmetric_prompt
    typed = task_type_prompts(own)  # kept even when empty: "" is how a document goes bare after an instruction
    prompts = {"query": query, "document": document_prompt(own), **dict.fromkeys(SYMMETRIC_TYPES, symmetric), **typed}
    encoder = CachedTruncated(model, model_prompts={k: v for k, v in prompts.items() if v or k in typed})
    suffix = f"-dim{dim}" if dim else ""
    encoder.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(name=f"local/{name}{suffix}", revision=revision))
    return encoder


def task_type_prompts(prompts: dict[str, str]) -> dict[str, str]:
    """The model's prompts named by a C-MTEB task type ("Retrieval-query", "STS", ...): what a model
    fine-tuned with task instructions saved (train/kinds/base.py's release_prompts). mteb looks a
    task's prompt up by its type before the plain query/document ones, so each task type is encoded
    with the instruction training used for it."""
    from typing import get_args

    from mteb.abstasks.task_metadata import TaskType
    types = set(get_args(TaskType))
    return {name: prompt for name, prompt in prompts.items() if name.rsplit("-", 1)[0] in types or name in types}


def document_prompt(prompts: dict[str, str]) -> str:
    """The prompt documents are encoded with: the model's "document" prompt, else its "passage" one.
    sentence-transformers gives every model a "document" prompt, "" where the model's config names
    none, so an e5-style model (prompts "query" and "passage") would otherwise encode its documents
    bare, without the prompt it was trained with."""
    return prompts.get("document") or prompts.get("passage", "")


def model_revision(path: Path, settings: object = None) -> str:
    """A fingerprint of a model folder's files (names, sizes, modification times) and of the eval
    settings that change scores (prompts): the revision results are cached under, so a model trained
    again into the same folder, or scored with other prompts, is scored again."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and "eval" not in f.relative_to(path).parts) \
        if path.is_dir() else []
    stamp = "|".join(f"{f.relative_to(path)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return hashlib.sha1(f"{stamp}|{json.dumps(settings, sort_keys=True)}".encode()).hexdigest()[:12]


def evaluate(model, tasks: list, dims: list[int | None], batch_size: int, name: str, out: Path,
             symmetric_prompt: str | None = None,
             on_task_end: Callable[[str, dict], None] | None = None,
             revision: str = "local", resume: bool = False, pool: dict | None = None) -> dict[int | None, dict[str, float]]:
    """mteb scores {dim: {task: main score}}, task by task, kept in mteb's result cache at `out`.

    Each task's texts are encoded once at full width and every dimension is scored from those
    embeddings; the cache is dropped before the next task, so memory holds one task's embeddings
    (not all of C-MTEB's retrieval corpora at 1792 dims). `on_task_end(task, cache)` sees each
    task's cache {(task, prompt type, hash): (texts, embeddings)} before it is freed. With `resume`,
    a (task, dim) already in the result cache under this name and revision is read back, not
    encoded (mteb's "only-missing"); without it every task is scored and its result replaced.
    """
    import mteb
    results = mteb.ResultCache(out)
    scores: dict[int | None, dict[str, float]] = {dim: {} for dim in dims}
    for task in tasks:
        cache: dict = {}
        for dim in dims:
            encoder = caching_encoder(model, dim, cache, name, symmetric_prompt, revision, pool)
            result = mteb.evaluate(encoder, [task], cache=results, overwrite_strategy="only-missing" if resume else "always",
                                   encode_kwargs={"batch_size": batch_size}, show_progress_bar=False)
            for task_result in result.task_results:
                scores[dim][task_result.task_name] = task_result.get_score()
        if on_task_end:
            on_task_end(task.metadata.name, cache)
        del cache, encoder, result
        gc.collect()
    return scores


def eval_split(task) -> str:
    """The split a task is scored on (mteb's first eval split; C-MTEB: test, dev or validation)."""
    return task.metadata.eval_splits[0]


def results_table(scores: dict[int | None, dict[str, float]], types: dict[str, str]) -> str:
    """Markdown: one row per task (grouped by type), one column per dimension; type and overall averages."""
    dims = list(scores)
    header = "| task | type | " + " | ".join(f"dim {d}" if d else "full" for d in dims) + " |"
    lines = [header, "|" + "---|" * (len(dims) + 2)]
    by_type = defaultdict(list)
    for task, t in sorted(types.items(), key=lambda kv: (kv[1], kv[0])):
        by_type[t].append(task)
        lines.append(f"| {task} | {t} | " + " | ".join(f"{100 * scores[d][task]:.2f}" for d in dims) + " |")
    for t, tasks in sorted(by_type.items()):
        lines.append(f"| **{t} average** ({len(tasks)}) | | "
                     + " | ".join(f"{100 * np.mean([scores[d][x] for x in tasks]):.2f}" for d in dims) + " |")
    lines.append(f"| **average** ({len(types)} tasks) | | "
                 + " | ".join(f"{100 * np.mean(list(scores[d].values())):.2f}" for d in dims) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import mteb
    from sentence_transformers import SentenceTransformer

    from eval.local_tasks import LocalDataError
    from train.run.release import add_model_index, replace_eval_table

    from train.models.model import resolve_model
    model_path = Path(args.model)
    source, local_only = resolve_model(args.model)  # a clear message for a missing folder, quick when offline
    try:
        tasks = select_tasks(args)
    except LocalDataError as e:
        raise SystemExit(f"data error: {e}") from None
    devices = [d for d in (args.devices or "").split(",") if d]
    # with a pool of device processes the parent's copy stays on the CPU (sentence-transformers moves it there)
    model = SentenceTransformer(source, device="cpu" if len(devices) > 1 else devices[0] if devices else None,
                                local_files_only=local_only)
    if args.query_prompt is not None:
        model.prompts["query"] = args.query_prompt
    if args.passage_prompt is not None:
        model.prompts["passage"] = model.prompts["document"] = args.passage_prompt
    width = model.get_embedding_dimension()
    dims = [int(d) for d in args.dims.split(",")] if args.dims else [None]
    if any(d is not None and not 0 < d <= width for d in dims):
        raise SystemExit(f"--dims {args.dims}: each must be between 1 and the model's width {width}")

    out = Path(args.output_dir) if args.output_dir else (model_path / "eval" if model_path.exists() else Path("eval_results"))
    pool = model.start_multi_process_pool(devices) if len(devices) > 1 else None
    try:
        scores = evaluate(model, tasks, dims, args.batch_size, model_path.name, out, args.symmetric_prompt,
                          revision=model_revision(model_path, [model.prompts, args.symmetric_prompt, args.model]),
                          resume=not args.overwrite, pool=pool)
    finally:
        if pool is not None:
            model.stop_multi_process_pool(pool)
    table = results_table(scores, {t.metadata.name: t.metadata.type for t in tasks})
    (out / "results.md").write_text(table + "\n")
    print(table)
    if args.update_card:
        card = model_path / "README.md"
        if not card.is_file():
            raise SystemExit(f"--update-card: {card} does not exist")
        replace_eval_table(card, f"Evaluated with `eval/cmteb.py` (mteb {mteb.__version__}); scores x 100.\n\n{table}")
        full = dims[0] if None in dims or len(dims) == 1 else max(dims)  # model-index: the model as released
        entries = add_model_index(card, model_path.name, [(t, scores[full][t.metadata.name], eval_split(t))
                                                          for t in tasks if t.metadata.name in scores[full]])
        print(f"updated {card} (table and {entries} model-index entries)")
    return scores


if __name__ == "__main__":
    main()
