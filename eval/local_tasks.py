"""Local data sets as mteb tasks, so mteb's own evaluators score them offline.

    sts:STS_FILE.jsonl                   {"sentence1", "sentence2", "score"}     (AbsTaskSTS, cosine Spearman)
    retrieval:BEIR_FOLDER                corpus.jsonl, queries.jsonl, qrels.tsv   (AbsTaskRetrieval, nDCG@10)
    pair:PAIR_FILE.jsonl                 {"sentence1", "sentence2", "label" 0/1}  (AbsTaskPairClassification, max AP)

A spec without a kind prefix is guessed: a folder is retrieval, a JSONL file with a "score" field is
STS, one with a "label" field pair classification.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from datasets import Dataset, DatasetDict
from mteb.abstasks.pair_classification import AbsTaskPairClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

SPLIT = "test"


class LocalDataError(ValueError):
    """A local eval set of the wrong shape; the message names the file (and line)."""


def _metadata(name: str, path: Path, task_type: str, main_score: str) -> TaskMetadata:
    return TaskMetadata(
        name=name, description=f"local data set {path}", dataset={"path": str(path), "revision": "local"},
        type=task_type, category="t2t", modalities=["text"], reference=None, eval_splits=[SPLIT],
        eval_langs=["cmn-Hans"], main_score=main_score, date=None, domains=None, task_subtypes=None,
        license=None, annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation=None)


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LocalDataError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise LocalDataError(f"{path}: not valid UTF-8") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LocalDataError(f"{path}:{line_no}: malformed JSON ({e.msg})") from None
        missing = [k for k in required if not isinstance(row, dict) or k not in row]
        if missing:
            raise LocalDataError(f"{path}:{line_no}: missing field(s) {missing}; expected {list(required)}")
        rows.append(row)
    if not rows:
        raise LocalDataError(f"{path}: no rows")
    return rows


def local_sts(path: Path, name: str | None = None) -> AbsTaskSTS:
    rows = _read_jsonl(path, ("sentence1", "sentence2", "score"))
    scores = [float(r["score"]) for r in rows]
    low, high = min(scores), max(scores)

    class LocalSTS(AbsTaskSTS):
        metadata = _metadata(name or f"local-sts-{path.stem}", path, "STS", "cosine_spearman")
        min_score, max_score = low, high

        def load_data(self, **kwargs) -> None:
            self.dataset = DatasetDict({SPLIT: Dataset.from_dict({
                "sentence1": [r["sentence1"] for r in rows], "sentence2": [r["sentence2"] for r in rows],
                "score": scores})})
            self.data_loaded = True

    return LocalSTS()


def local_pair_classification(path: Path, name: str | None = None) -> AbsTaskPairClassification:
    rows = _read_jsonl(path, ("sentence1", "sentence2", "label"))

    class LocalPairs(AbsTaskPairClassification):
        metadata = _metadata(name or f"local-pairs-{path.stem}", path, "PairClassification", "max_ap")

        def load_data(self, **kwargs) -> None:
            self.dataset = DatasetDict({SPLIT: Dataset.from_dict({
                "sentence1": [r["sentence1"] for r in rows], "sentence2": [r["sentence2"] for r in rows],
                "labels": [int(r["label"]) for r in rows]})})
            self.data_loaded = True

    return LocalPairs()


def read_beir(folder: Path) -> tuple[list[dict], list[dict], dict[str, dict[str, int]]]:
    """corpus [{_id, text, title?}], queries [{_id, text}], qrels {query id: {doc id: relevance}}."""
    for f in ("corpus.jsonl", "queries.jsonl", "qrels.tsv"):
        if not (folder / f).is_file():
            raise LocalDataError(f"{folder}: a BEIR retrieval folder needs corpus.jsonl, queries.jsonl and qrels.tsv "
                                 f"({f} is missing)")
    corpus = _read_jsonl(folder / "corpus.jsonl", ("_id", "text"))
    queries = _read_jsonl(folder / "queries.jsonl", ("_id", "text"))
    qrels: dict[str, dict[str, int]] = {}
    with open(folder / "qrels.tsv", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if line_no == 1 and row and row[0] == "query-id":
                continue
            if len(row) != 3:
                raise LocalDataError(f"{folder / 'qrels.tsv'}:{line_no}: expected query-id, corpus-id, score")
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return corpus, queries, qrels


def local_retrieval(folder: Path, name: str | None = None) -> AbsTaskRetrieval:
    corpus, queries, qrels = read_beir(folder)

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = _metadata(name or f"local-retrieval-{folder.name}", folder, "Retrieval", "ndcg_at_10")

        def load_data(self, **kwargs) -> None:
            self.dataset = {"default": {SPLIT: {
                "corpus": Dataset.from_dict({"id": [str(d["_id"]) for d in corpus],
                                             "title": [d.get("title", "") for d in corpus],
                                             "text": [d["text"] for d in corpus]}),
                "queries": Dataset.from_dict({"id": [str(q["_id"]) for q in queries],
                                              "text": [q["text"] for q in queries]}),
                "relevant_docs": qrels, "top_ranked": None}}}
            self.data_loaded = True

    return LocalRetrieval()


def local_task(spec: str):
    """'kind:path' or a bare path -> an mteb task."""
    kind, _, path = spec.partition(":") if spec.split(":", 1)[0] in ("sts", "retrieval", "pair") else ("", "", spec)
    path = Path(path)
    if not path.exists():
        raise LocalDataError(f"{path}: no such file or folder")
    if not kind:
        if path.is_dir():
            kind = "retrieval"
        else:
            first = _read_jsonl(path, ())[0]
            kind = "sts" if "score" in first else "pair" if "label" in first else ""
            if not kind:
                raise LocalDataError(f"{path}:1: cannot tell the task kind: expected a 'score' (STS) or "
                                     f"'label' (pair classification) field; or prefix the path with sts:, pair: or retrieval:")
    return {"sts": local_sts, "retrieval": local_retrieval, "pair": local_pair_classification}[kind](path)
