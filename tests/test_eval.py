"""eval/cmteb.py: local tasks scored by mteb equal direct computations; --dims equals truncate_dim."""
import json
import math
import re
import shutil

import numpy as np
import pytest
from scipy.stats import spearmanr
from sentence_transformers import SentenceTransformer

from eval import cmteb
from tests.conftest import SHARED


@pytest.fixture(scope="module")
def sts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sts") / "sts.jsonl"
    path.write_text("".join(open(SHARED / "stsb-zh/validation.jsonl", encoding="utf-8").readlines()[:200]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def beir_folder(tmp_path_factory):
    """A tiny retrieval case: 2 queries, 4 documents, graded relevance."""
    folder = tmp_path_factory.mktemp("beir")
    docs = {"d1": "北京是中国的首都。", "d2": "上海是中国最大的城市。", "d3": "熊猫生活在四川。", "d4": "长城很长。"}
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}, ensure_ascii=False) + "\n"
                                                 for k, v in docs.items()), encoding="utf-8")
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "中国的首都是哪里？"}, ensure_ascii=False) + "\n"
                                          + json.dumps({"_id": "q2", "text": "熊猫住在哪里？"}, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    (folder / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t1\nq2\td3\t1\n")
    return folder, docs


def embeddings_of(cache: dict, texts: list[str]) -> np.ndarray:
    """The embeddings mteb scored for exactly these texts (in this order)."""
    return next(emb for t, emb in cache.values() if t == texts)


def evaluate_keeping_caches(*args, **kwargs) -> tuple[dict, dict]:
    """cmteb.evaluate, plus every task's embedding cache as it was when the task ended."""
    caches: dict = {}
    scores = cmteb.evaluate(*args, on_task_end=lambda task, cache: caches.update(cache), **kwargs)
    return scores, caches


def test_local_sts_equals_scipy_spearman_on_the_same_embeddings(tiny_model, sts_file, tmp_path):
    from eval.local_tasks import local_task
    model = SentenceTransformer(str(tiny_model), device="cpu")
    scores, cache = evaluate_keeping_caches(model, [local_task(f"sts:{sts_file}")], [None], 64, "tiny", tmp_path)
    rows = [json.loads(line) for line in open(sts_file, encoding="utf-8")]
    a = embeddings_of(cache, [r["sentence1"] for r in rows])
    b = embeddings_of(cache, [r["sentence2"] for r in rows])
    gold = [r["score"] for r in rows]
    # mteb takes 1 - sklearn's paired_cosine_distances in float32; done the same way the score is exact.
    # (In float64 the rounding reorders near-ties and Spearman moves by up to ~3e-5 on this tiny model.)
    from sklearn.metrics.pairwise import paired_cosine_distances
    assert scores[None]["local-sts-sts"] == pytest.approx(spearmanr(1 - paired_cosine_distances(a, b), gold).statistic,
                                                          abs=1e-9)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert scores[None]["local-sts-sts"] == pytest.approx(spearmanr(cos, gold).statistic, abs=1e-4)
    # and the embeddings are the model's own
    assert np.allclose(a, model.encode([r["sentence1"] for r in rows]), atol=1e-5)
    assert (tmp_path / "results/local__tiny/local/local-sts-sts.json").is_file()  # mteb's own cache layout


def test_results_are_mteb_results_and_an_interrupted_run_resumes(tiny_model, sts_file, beir_folder, tmp_path):
    """Results land in mteb's ResultCache layout (readable by mteb), and a run started again scores
    only the (task, dim) pairs it has no result for: the others are read back, not encoded."""
    import mteb

    from eval.local_tasks import local_task
    model = SentenceTransformer(str(tiny_model), device="cpu")
    tasks = [local_task(f"sts:{sts_file}"), local_task(f"retrieval:{beir_folder[0]}")]
    first, caches = evaluate_keeping_caches(model, tasks, [None, 16], 64, "tiny", tmp_path, revision="r1", resume=True)
    assert len(caches) >= 3  # sts (one prompt type) and retrieval (queries, documents) were encoded
    loaded = mteb.ResultCache(tmp_path).load_results(include_remote=False)
    by_model = {m.model_name: {t.task_name: t.get_score() for t in m.task_results} for m in loaded.model_results}
    assert by_model.keys() == {"local/tiny", "local/tiny-dim16"}  # mteb stores scores to 6 digits
    for name, dim in (("local/tiny", None), ("local/tiny-dim16", 16)):
        assert by_model[name] == pytest.approx(first[dim], abs=1e-6)

    # interrupted after the first task: the retrieval results were never written
    for path in tmp_path.glob("results/*/r1/local-retrieval-*.json"):
        path.unlink()
    again, caches = evaluate_keeping_caches(model, tasks, [None, 16], 64, "tiny", tmp_path, revision="r1", resume=True)
    assert all(again[dim] == pytest.approx(first[dim], abs=1e-6) for dim in first)
    assert {key[0] for key in caches} == {tasks[1].metadata.name}  # only the missing task was encoded
    # another revision of the model (trained again into the same folder) is scored afresh
    _, caches = evaluate_keeping_caches(model, tasks[:1], [None], 64, "tiny", tmp_path, revision="r2", resume=True)
    assert {key[0] for key in caches} == {tasks[0].metadata.name}


def test_cli_writes_results_table(tiny_model, sts_file, tmp_path):
    cmteb.main(["--model", str(tiny_model), "--local", f"sts:{sts_file}", "--output-dir", str(tmp_path)])
    table = (tmp_path / "results.md").read_text()
    assert "| local-sts-sts | STS |" in table and "**STS average** (1)" in table and "**average** (1 tasks)" in table


def ndcg_at_10(ranked: list[str], relevance: dict[str, int]) -> float:
    dcg = sum((2 ** relevance.get(d, 0) - 1) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(relevance.values(), reverse=True)
    return dcg / sum((2 ** r - 1) / math.log2(i + 2) for i, r in enumerate(ideal[:10]))


def test_local_retrieval_equals_ndcg_by_hand(tiny_model, beir_folder, tmp_path):
    folder, docs = beir_folder
    scores = cmteb.main(["--model", str(tiny_model), "--local", f"retrieval:{folder}", "--output-dir", str(tmp_path)])
    model = SentenceTransformer(str(tiny_model), device="cpu")
    ids = list(docs)
    d = model.encode([docs[i] for i in ids], normalize_embeddings=True)
    qrels = {"q1": {"d1": 2, "d2": 1}, "q2": {"d3": 1}}
    queries = {"q1": "中国的首都是哪里？", "q2": "熊猫住在哪里？"}
    by_hand = []
    for qid, text in queries.items():
        s = d @ model.encode([text], normalize_embeddings=True)[0]
        by_hand.append(ndcg_at_10([ids[i] for i in np.argsort(-s, kind="stable")], qrels[qid]))
    assert scores[None][f"local-retrieval-{folder.name}"] == pytest.approx(np.mean(by_hand), abs=1e-4)


def test_dims_equal_a_model_loaded_with_truncate_dim(tiny_model, sts_file, beir_folder, tmp_path):
    folder, _ = beir_folder
    local = ["--local", f"sts:{sts_file}", "--local", f"retrieval:{folder}"]
    together = cmteb.main(["--model", str(tiny_model), *local, "--dims", "8,32", "--output-dir", str(tmp_path / "a")])
    import mteb
    from eval.local_tasks import local_task
    cut = SentenceTransformer(str(tiny_model), device="cpu", truncate_dim=8)
    result = mteb.evaluate(mteb.models.sentence_transformer_wrapper.SentenceTransformerEncoderWrapper(cut),
                           [local_task(f"sts:{sts_file}"), local_task(f"retrieval:{folder}")], cache=None)
    alone = {r.task_name: r.get_score() for r in result.task_results}
    assert together[8] == pytest.approx(alone, abs=1e-6)
    assert together[8] != together[32]


def test_tasks_are_encoded_once_and_freed_one_by_one(tiny_model, sts_file, beir_folder, tmp_path):
    """Every dim is scored from one encoding per task, and a task's embeddings are gone before the next starts."""
    from eval.local_tasks import local_task
    folder, _ = beir_folder
    model = SentenceTransformer(str(tiny_model), device="cpu")
    forwards = []
    model[0].register_forward_hook(lambda *_: forwards.append(1))
    tasks = [local_task(f"sts:{sts_file}"), local_task(f"retrieval:{folder}")]

    def run(dims):
        held, start = [], len(forwards)
        cmteb.evaluate(model, tasks, dims, 64, "tiny", tmp_path,
                       on_task_end=lambda task, cache: held.append((task, {key[0] for key in cache})))
        return held, len(forwards) - start

    held, three_dims = run([8, 16, 32])
    _, one_dim = run([None])
    assert three_dims == one_dim > 0  # encoded once, whatever the number of dims
    names = [t.metadata.name for t in tasks]
    assert held == [(names[0], {names[0]}), (names[1], {names[1]})]  # each cache holds its own task only


def test_card_update_is_idempotent(tiny_model, sts_file, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    args = ["--model", str(model), "--local", f"sts:{sts_file}", "--update-card"]
    cmteb.main(args)
    once = (model / "README.md").read_text()
    cmteb.main(args)
    assert (model / "README.md").read_text() == once
    assert once.count("eval-table:start") == 1 and "local-sts-sts" in once
    # the scores are the card's model-index metadata too, as MTEB results are on the Hub
    from huggingface_hub import ModelCard
    results = ModelCard.load(model / "README.md").data.eval_results
    scored = json.loads(next((model / "eval/results").rglob("local-sts-sts.json")).read_text())
    main = next(iter(scored["scores"].values()))[0]["main_score"]
    assert [(r.task_type, r.dataset_name, r.metric_type) for r in results] == [("STS", "MTEB local-sts-sts", "cosine_spearman")]
    assert results[0].metric_value == pytest.approx(100 * main, abs=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/model", "--local", "x"], "not a local folder"),
    (["--tasks", "NoSuchTask"], "unknown in MTEB(cmn, v1)"),
    (["--task-types", "Poetry"], "unknown ['Poetry']"),
    (["--local", "retrieval:{tmp}"], "needs corpus.jsonl, queries.jsonl and qrels.tsv"),
    (["--dims", "999", "--local", "sts:{sts}"], "between 1 and the model's width 32"),
])
def test_clear_messages(tiny_model, sts_file, tmp_path, argv, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{sts}", str(sts_file)) for a in argv]
    if "--model" not in argv:
        argv = ["--model", str(tiny_model), *argv]
    with pytest.raises(SystemExit, match=re.escape(message)):
        cmteb.main(argv)


def test_symmetric_tasks_get_the_query_prompt_on_both_sides(tiny_model, sts_file, tmp_path):
    """e5-style: STS is encoded with the query prompt (or --symmetric-prompt), never left bare by accident."""
    from eval.local_tasks import local_task
    model = SentenceTransformer(str(tiny_model), device="cpu", prompts={"query": "query: ", "passage": "passage: ",
                                                                        "document": "passage: "})
    rows = [json.loads(line) for line in open(sts_file, encoding="utf-8")]
    first = [r["sentence1"] for r in rows]
    _, cache = evaluate_keeping_caches(model, [local_task(f"sts:{sts_file}")], [None], 64, "tiny", tmp_path / "a")
    assert np.allclose(embeddings_of(cache, first), model.encode(first, prompt="query: "), atol=1e-5)
    _, cache = evaluate_keeping_caches(model, [local_task(f"sts:{sts_file}")], [None], 64, "tiny", tmp_path / "b",
                              symmetric_prompt="")
    assert np.allclose(embeddings_of(cache, first), model.encode(first), atol=1e-5)


def test_documents_get_the_passage_prompt_when_the_model_names_no_document_one(beir_folder, tmp_path):
    """An e5-style model (prompts "query" and "passage"): sentence-transformers fills "document" with ""
    on load, and retrieval must still encode the corpus with "passage: ", not bare."""
    from eval.local_tasks import local_retrieval
    from bench.tiny_model import make_tiny_model
    folder, docs = beir_folder
    path = make_tiny_model(tmp_path / "e5-style", prompts={"query": "query: ", "passage": "passage: "})
    model = SentenceTransformer(str(path), device="cpu")
    assert model.prompts.get("document") == ""  # what sentence-transformers does: the case this guards
    _, cache = evaluate_keeping_caches(model, [local_retrieval(folder)], [None], 64, "tiny", tmp_path / "eval")
    texts, embeddings = next((t, e) for t, e in cache.values() if set(t) == set(docs.values()))
    assert np.allclose(embeddings, model.encode(texts, prompt="passage: "), atol=1e-5)
    assert not np.allclose(embeddings, model.encode(texts), atol=1e-3)


def test_two_device_processes_score_exactly_as_one(tiny_model, sts_file, beir_folder, tmp_path, monkeypatch):
    """--devices spreads each task's encoding over a process per device (sentence-transformers' pool; two CPU
    processes here): the same embeddings, so the same scores, and every text went through the pool."""
    from sentence_transformers.base.model import BaseModel
    folder, _ = beir_folder
    local = ["--local", f"sts:{sts_file}", "--local", f"retrieval:{folder}", "--dims", "8,32"]
    alone = cmteb.main(["--model", str(tiny_model), *local, "--output-dir", str(tmp_path / "one")])
    pooled, real = [], BaseModel._multi_process

    def counting(self, inputs, *args, **kwargs):
        pooled.append(len(inputs))
        return real(self, inputs, *args, **kwargs)
    monkeypatch.setattr(BaseModel, "_multi_process", counting)
    together = cmteb.main(["--model", str(tiny_model), *local, "--devices", "cpu,cpu", "--output-dir", str(tmp_path / "two")])
    assert together.keys() == alone.keys() == {8, 32}
    for dim in alone:
        assert together[dim] == pytest.approx(alone[dim], abs=1e-6)
    assert sorted(pooled) == [2, 4, 200, 200]  # both sides of the 200 STS pairs, the queries, the documents
