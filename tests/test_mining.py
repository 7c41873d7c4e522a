"""Dynamic hard-negative mining: the paper's rule on scripted scores, global state on 2 ranks, resume,
and the offline pool builder on the shared retrieval data."""
import json
import subprocess
import sys

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from tests.conftest import ROOT, SHARED, deepspeed_launch
from data_prep.mine_negatives import build_pools, normalize_text
from train.mining import HardNegativeMiner, MiningRule

POOL = [f"p{i}" for i in range(30)]
INITIAL = ["i0", "i1"]


def negatives(miner, pool=POOL):
    return miner.negatives("a", INITIAL, pool)


def test_easy_negatives_are_replaced_by_the_next_pool_slice_at_the_check():
    miner = HardNegativeMiner(num_negatives=2, rule=MiningRule(interval=100))
    miner.record(1, {"a": (0.60, len(POOL))})         # S0 = 0.60
    miner.record(50, {"a": (0.55, len(POOL))})        # 0.55 * 1.15 = 0.6325 >= 0.60: still hard
    assert not miner.due(50) and miner.due(100)
    assert miner.check(100).replaced == 0 and negatives(miner) == INITIAL
    miner.record(150, {"a": (0.50, len(POOL))})       # 0.575 < 0.60 and |0.50| < 0.8: easy now...
    assert negatives(miner) == INITIAL                 # ...but only a check replaces them
    stats = miner.check(200)
    assert (stats.checked, stats.replaced) == (1, 1)
    assert negatives(miner) == POOL[10:12]             # 1st replacement: ranks 0*n+10 .. 1*n+10
    miner.record(201, {"a": (0.70, len(POOL))})       # new negatives: a new S0
    assert miner.examples["a"].initial == 0.70
    miner.record(250, {"a": (0.30, len(POOL))})
    miner.check(300)
    assert negatives(miner) == POOL[12:14]             # 2nd replacement: ranks 1*n+10 .. 2*n+10


def test_hard_or_high_scoring_negatives_are_kept():
    miner = HardNegativeMiner(num_negatives=2)
    miner.record(1, {"a": (0.99, 30), "b": (0.5, 30)})
    miner.record(2, {"a": (0.85, 30), "b": (0.49, 30)})   # a: dropped 15% but |0.85| >= 0.8; b: barely moved
    assert miner.check(100).replaced == 0


def test_exhausted_pool_keeps_the_last_negatives_and_is_counted():
    miner = HardNegativeMiner(num_negatives=2)
    short = POOL[:13]                                     # room for one replacement (ranks 10-12), not two
    miner.record(1, {"a": (0.6, len(short))})
    miner.record(2, {"a": (0.3, len(short))})
    miner.check(100)
    assert miner.negatives("a", INITIAL, short) == short[10:12]
    miner.record(101, {"a": (0.6, len(short))})
    miner.record(102, {"a": (0.3, len(short))})
    stats = miner.check(200)
    assert (stats.replaced, stats.exhausted) == (0, 1)
    assert miner.negatives("a", INITIAL, short) == short[10:12]


def test_conan_v2_rule_checks_every_step_and_replaces_easy_starts():
    miner = HardNegativeMiner(num_negatives=2, rule=MiningRule.v2())
    assert miner.due(1) and miner.due(2)
    miner.record(1, {"a": (0.35, 30), "b": (0.6, 30)})   # a: S0 < 0.4 -> easy from the start
    assert miner.check(1).replaced == 1
    assert miner.examples["b"].replaced == 0


def test_state_round_trips():
    miner = HardNegativeMiner(num_negatives=2)
    miner.record(1, {"a": (0.6, 30)})
    miner.record(2, {"a": (0.3, 30)})
    miner.check(100)
    again = HardNegativeMiner.from_state_dict(json.loads(json.dumps(miner.state_dict())))
    assert again.fingerprint() == miner.fingerprint() and again.checks == miner.checks


def full_scan_check(miner: HardNegativeMiner, states: dict) -> set[str]:
    """The rule applied to every tracked example (the definition); returns the ids it would replace."""
    out = set()
    for example_id, state in states.items():
        if state.initial is None or state.current is None or state.exhausted:
            continue
        if miner.rule.is_easy(state.initial, state.current) and miner.pool_slice(state.replaced + 1)[1] <= state.pool_size:
            out.add(example_id)
    return out


def test_a_check_costs_what_changed_and_decides_as_a_full_scan():
    """10,000 tracked examples, a few rescored: the check looks at those few, replaces exactly what a
    scan of every example would, and the running fingerprint equals one recomputed from scratch."""
    import copy
    import random
    rng = random.Random(0)
    miner = HardNegativeMiner(num_negatives=2, rule=MiningRule(interval=1))
    miner.record(1, {f"e{i}": (rng.uniform(0.3, 0.7), 30) for i in range(10_000)})
    miner.check(1)
    for step in range(2, 12):
        rescored = {f"e{rng.randrange(10_000)}": (rng.uniform(-0.2, 0.7), 30) for _ in range(5)}
        miner.record(step, rescored)
        expected = full_scan_check(miner, copy.deepcopy(miner.examples))
        scored = [v.current for v in miner.examples.values() if v.current is not None and not v.exhausted]
        before = {k: v.replaced for k, v in miner.examples.items()}
        stats = miner.check(step)
        assert stats.checked <= len(rescored) and stats.tracked > 9_000
        assert {k for k, v in miner.examples.items() if v.replaced != before[k]} == expected
        rebuilt = HardNegativeMiner(2, miner.rule, copy.deepcopy(miner.examples))
        assert rebuilt.fingerprint() == miner.fingerprint()
        assert stats.mean_score == pytest.approx(sum(scored) / len(scored), abs=1e-9)


# --- offline pools ------------------------------------------------------------------------------

def test_percpos_and_near_duplicate_filters_on_hand_made_scores():
    rows = [{"query": "q", "pos": ["北京是中国的首都。"], "neg": []}]
    corpus = ["北京是中国的首都。", "北京 是中国的首都！", "上海是一座城市。", "天津在北京旁边。", "广州很热。"]
    scores = np.array([[0.99, 0.98, 0.90, 0.80, 0.50]], dtype=np.float32)
    ids = np.array([[0, 1, 2, 3, 4]])
    pools, dropped = build_pools(rows, corpus, scores, ids, positive_floor=np.array([0.9]), perc_pos=0.95)
    assert pools == [["天津在北京旁边。", "广州很热。"]]   # 0.90 > 0.95 * 0.9 dropped as a likely false negative
    assert dropped["positive or the query itself"] == 1
    assert dropped["near-duplicate of a positive"] == 1
    assert sum(dropped.values()) == 3
    assert normalize_text("Ｈｅｌｌｏ， 世界!") == normalize_text("hello世界")


@pytest.fixture(scope="module")
def mined(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mine")
    rows = open(SHARED / "retrieval-zh/train.jsonl", encoding="utf-8").read().splitlines()[:150]
    data = tmp / "retrieval.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    first = json.loads(rows[0])
    corpus = tmp / "extra.jsonl"  # a near-duplicate of the first query's positive, and plain extra text
    corpus.write_text(json.dumps({"text": first["pos"][0].replace("。", "！") + " "}, ensure_ascii=False) + "\n"
                      + "一只猫坐在垫子上。\n", encoding="utf-8")
    out = tmp / "mined.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "data_prep/mine_negatives.py"), "--model", str(tiny_model),
                           "--input", str(data), "--corpus", str(corpus), "--output", str(out), "--top-k", "40",
                           "--perc-pos", "100", "--chunk-size", "300"],  # perc-pos off: the tiny model is untrained
                          capture_output=True, text=True, check=True)
    return [json.loads(line) for line in open(out, encoding="utf-8")], proc.stdout, first


def test_pools_exclude_positives_and_are_ranked(mined, tiny_model):
    rows, stdout, first = mined
    assert len(rows) == 150 and all(len(r["neg_pool"]) == 40 for r in rows)
    assert all(not set(r["neg_pool"]) & set(r["pos"]) for r in rows)
    assert all(r["query"] not in r["neg_pool"] for r in rows)
    model = SentenceTransformer(str(tiny_model), device="cpu")
    for r in rows[:10]:
        q = model.encode([r["query"]], normalize_embeddings=True)
        c = model.encode(r["neg_pool"], normalize_embeddings=True)
        scores = (c @ q.T)[:, 0]
        assert np.all(np.diff(scores) <= 1e-5)       # best first, across corpus chunks
    assert rows[0]["neg"] == first["neg"]              # the data's own negatives are kept as the initial ones


def test_near_duplicate_of_a_positive_is_dropped_and_reported(mined):
    rows, stdout, first = mined
    near = first["pos"][0].replace("。", "！") + " "
    assert near not in rows[0]["neg_pool"]
    assert "near-duplicate of a positive" in stdout


# --- inline, on 2 ranks, with resume ----------------------------------------------------------------

@pytest.fixture(scope="module")
def mining_config(mined, tmp_path_factory):
    rows, _, _ = mined
    tmp = tmp_path_factory.mktemp("mcfg")
    data = tmp / "mined.jsonl"
    # 16 examples at 8 a step: each comes back every 2 steps, so its score can move between checks
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:16]), encoding="utf-8")
    config = tmp / "tasks.json"
    config.write_text(json.dumps({"tasks": {
        "retrieval": {"type": "retrieval", "files": [str(data)], "batch_size": 8, "num_negatives": 2, "ranks": 1,
                      "mining": {"rule": "v1", "interval": 2, "factor": 1.0, "abs_limit": 1.0}},
        "sts": {"type": "sts", "files": [str(ROOT / "data/demo/finetune/sts.jsonl")], "batch_size": 8, "ranks": 1}}}))
    return config


def run_finetune(tiny_model, config, out, *extra):
    return deepspeed_launch(ROOT / "train/finetune.py", "--model", str(tiny_model), "--data-config", str(config),
                            "--output-dir", str(out), "--max-steps", "8", "--save-steps", "100", "--lr", "5e-3",
                            "--expand-dim", "0", "--mrl-dims", "none", "--log-steps", "2", *extra)


def test_two_ranks_share_one_mining_state_and_resume_continues_it(tiny_model, mining_config, tmp_path):
    whole = run_finetune(tiny_model, mining_config, tmp_path / "whole")
    assert "mining retrieval: checked" in whole.stdout + whole.stderr
    state = json.loads((tmp_path / "whole/mining_retrieval.json").read_text())
    assert sum(c["replaced"] for c in state["checks"]) > 0     # the rule fired on real scores
    assert (tmp_path / "whole/mining_retrieval.png").stat().st_size > 1000

    run_finetune(tiny_model, mining_config, tmp_path / "cut", "--stop-at-step", "3")
    assert not (tmp_path / "cut/final").exists()
    run_finetune(tiny_model, mining_config, tmp_path / "cut", "--resume", "auto")
    resumed = json.loads((tmp_path / "cut/mining_retrieval.json").read_text())
    assert resumed["examples"].keys() == state["examples"].keys()
    for key, ex in state["examples"].items():
        got = resumed["examples"][key]
        assert got["replaced"] == ex["replaced"] and got["exhausted"] == ex["exhausted"]
        for field in ("initial", "current"):
            assert (got[field] is None) == (ex[field] is None)
            if ex[field] is not None:
                assert got[field] == pytest.approx(ex[field], abs=1e-5)
    assert [c["replaced"] for c in resumed["checks"]] == [c["replaced"] for c in state["checks"]]
