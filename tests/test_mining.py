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
from train.step.mining import HardNegativeMiner, MiningRule

POOL = [f"p{i}" for i in range(30)]
INITIAL = ["i0", "i1"]


def negatives(miner, pool=POOL):
    return miner.negatives("a", INITIAL, pool)


def test_easy_negatives_are_replaced_at_the_visit_and_used_from_the_next():
    miner = HardNegativeMiner(num_negatives=2, rule=MiningRule(interval=100))
    miner.record(1, {"a": (0.60, len(POOL), 0.60)})   # S0 = 0.60 from the mining scores, Si = 0.60
    miner.record(2, {"a": (0.55, len(POOL))})         # 0.55 * 1.15 = 0.6325 >= 0.60: still hard
    assert negatives(miner) == INITIAL
    miner.record(3, {"a": (0.50, len(POOL))})         # 0.575 < 0.60 and |0.50| < 0.8: easy: replaced now
    assert negatives(miner) == POOL[10:12]             # 1st replacement: ranks 0*n+10 .. 1*n+10
    assert miner.examples["a"].replaced_at == [3]
    miner.record(4, {"a": (0.70, len(POOL), 0.72)})   # new negatives: S0 from their pool scores
    assert miner.examples["a"].initial == 0.72
    miner.record(5, {"a": (0.30, len(POOL))})
    assert negatives(miner) == POOL[12:14]             # 2nd replacement: ranks 1*n+10 .. 2*n+10
    stats = miner.check(100)                           # the report counts what happened since the last
    assert (stats.checked, stats.replaced) == (5, 2) and miner.check(200).replaced == 0


def test_hard_or_high_scoring_negatives_are_kept():
    miner = HardNegativeMiner(num_negatives=2)
    miner.record(1, {"a": (0.85, 30, 0.99), "b": (0.49, 30, 0.5)})  # a: dropped 15% but |0.85| >= 0.8; b: barely moved
    assert miner.check(100).replaced == 0


def test_an_unchanged_negative_score_is_never_easy_whatever_its_sign():
    """Si * 1.15 < S0 holds for S0 = Si < 0; the rule reads a drop of 15% of |S0| either way."""
    miner = HardNegativeMiner(num_negatives=2)
    miner.record(1, {"a": (-0.3, 30, -0.3), "b": (0.3, 30, 0.3), "c": (-0.3, 30)})
    miner.record(2, {"d": (-0.5, 30, -0.3)})              # a real drop below a negative S0 is easy
    assert {k: v.replaced for k, v in miner.examples.items()} == {"a": 0, "b": 0, "c": 0, "d": 1}


def test_exhausted_pool_keeps_the_last_negatives_and_is_counted():
    miner = HardNegativeMiner(num_negatives=2)
    short = POOL[:13]                                     # room for one replacement (ranks 10-12), not two
    miner.record(1, {"a": (0.3, len(short), 0.6)})
    assert miner.negatives("a", INITIAL, short) == short[10:12]
    miner.record(2, {"a": (0.3, len(short), 0.6)})
    stats = miner.check(100)
    assert (stats.replaced, stats.exhausted) == (1, 1)
    assert miner.negatives("a", INITIAL, short) == short[10:12]


def test_conan_v2_rule_replaces_easy_starts_at_the_first_visit():
    miner = HardNegativeMiner(num_negatives=2, rule=MiningRule.v2())
    assert miner.due(1) and miner.due(2)
    miner.record(1, {"a": (0.5, 30, 0.35), "b": (0.6, 30, 0.6)})   # a: S0 < 0.4 -> easy from the start
    assert miner.check(1).replaced == 1
    assert miner.examples["b"].replaced == 0


def test_state_round_trips():
    miner = HardNegativeMiner(num_negatives=2)
    miner.record(1, {"a": (0.3, 30, 0.6)})
    miner.check(100)
    miner.record(101, {"a": (0.3, 30)})
    again = HardNegativeMiner.from_state_dict(json.loads(json.dumps(miner.state_dict())))
    assert again.fingerprint() == miner.fingerprint() and again.checks == miner.checks
    assert again.check(200) == miner.check(200)


def test_replaced_negatives_are_trained_on_at_the_very_next_visit(tmp_path):
    """One visit per epoch, the real stream over a mined file: negatives the model has learned to push
    away in epoch 1 are replaced for epoch 2, and epoch 2's batches carry the new slice."""
    from train.input.data import PairStream
    rows = [{"query": f"问题{i}", "pos": [f"答案{i}"], "neg": [f"负例{i}a", f"负例{i}b"], "neg_scores": [0.6, 0.5],
             "neg_pool": [f"候选{i}-{k}" for k in range(30)], "neg_pool_scores": [0.9 - k / 100 for k in range(30)]}
            for i in range(24)]
    data = tmp_path / "mined.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    stream = PairStream([data], global_batch=8, num_negatives=2, sample_negatives=False)
    miner = HardNegativeMiner(num_negatives=2)
    used = {}
    for epoch in range(2):
        for step, batch in enumerate(stream.epoch(epoch), start=epoch * 3 + 1):
            for ex in batch:
                used[(epoch, ex.source)] = miner.negatives(ex.source, ex.neg, ex.pool)
            # the model has learned to push this epoch's negatives away: Si 0.3 below their mined S0
            miner.record(step, {ex.source: (miner.mined_score(ex.source, ex.neg_scores, ex.pool_scores) - 0.3,
                                            len(ex.pool), miner.mined_score(ex.source, ex.neg_scores, ex.pool_scores))
                                for ex in batch})
    sources = {src for _, src in used}
    assert len(sources) == 24
    for src in sources:
        i = int(src.rsplit(":", 1)[1]) - 1
        assert used[(0, src)] == rows[i]["neg"]                  # epoch 1: the data's negatives
        assert used[(1, src)] == rows[i]["neg_pool"][10:12]      # epoch 2: the replacement, at the next visit
    assert all(len(miner.examples[s].replaced_at) == 2 for s in sources)  # and again after epoch 2


def test_recording_costs_the_batch_and_the_fingerprint_stays_exact():
    """10,000 tracked examples: each step touches only its batch, and the running fingerprint equals one
    recomputed from scratch (what the ranks compare)."""
    import copy
    import random
    rng = random.Random(0)
    miner = HardNegativeMiner(num_negatives=2, rule=MiningRule(interval=1))
    scores = [rng.uniform(0.3, 0.7) for _ in range(10_000)]
    miner.record(1, {f"e{i}": (x, 30, x) for i, x in enumerate(scores)})  # Si = S0: all kept
    assert miner.check(1).replaced == 0
    for step in range(2, 12):
        batch = {f"e{rng.randrange(10_000)}": (rng.uniform(-0.2, 0.7), 30, 0.6) for _ in range(5)}
        miner.record(step, batch)
        stats = miner.check(step)
        assert stats.checked == len(batch) and stats.tracked > 9_000
        rebuilt = HardNegativeMiner(2, miner.rule, copy.deepcopy(miner.examples))
        assert rebuilt.fingerprint() == miner.fingerprint()
        assert stats.mean_score == pytest.approx(sum(v[0] for v in batch.values()) / len(batch), abs=1e-9)


# --- offline pools ------------------------------------------------------------------------------

def test_percpos_and_near_duplicate_filters_on_hand_made_scores():
    rows = [{"query": "q", "pos": ["北京是中国的首都。"], "neg": []}]
    corpus = ["北京是中国的首都。", "北京 是中国的首都！", "上海是一座城市。", "天津在北京旁边。", "广州很热。"]
    scores = np.array([[0.99, 0.98, 0.90, 0.80, 0.50]], dtype=np.float32)
    ids = np.array([[0, 1, 2, 3, 4]])
    pools, dropped = build_pools(rows, corpus, scores, ids, positive_floor=np.array([0.9]), perc_pos=0.95)
    assert [t for t, _ in pools[0]] == ["天津在北京旁边。", "广州很热。"]   # 0.90 > 0.95 * 0.9: a likely false negative
    assert [x for _, x in pools[0]] == pytest.approx([0.8, 0.5])          # kept with their scores (mining's S0)
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
                           "--perc-pos", "100", "--shard-rows", "300", "--embedding-dtype", "float32"],  # perc-pos off: untrained model
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
        assert np.allclose(scores, r["neg_pool_scores"], atol=1e-5)  # S0 for dynamic mining
        n = model.encode(r["neg"], normalize_embeddings=True)
        assert np.allclose((n @ q.T)[:, 0], r["neg_scores"], atol=1e-5)
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
    """With GradCache (--mini-batch 5): mining reads its scores from the cached embeddings."""
    return deepspeed_launch(ROOT / "train/finetune.py", "--model", str(tiny_model), "--data-config", str(config),
                            "--output-dir", str(out), "--max-steps", "8", "--save-steps", "100", "--lr", "5e-3",
                            "--expand-dim", "0", "--mrl-dims", "none", "--log-steps", "2", "--mini-batch", "5", *extra)


def test_two_ranks_share_one_mining_state_and_resume_continues_it(tiny_model, mining_config, tmp_path):
    whole = run_finetune(tiny_model, mining_config, tmp_path / "whole")
    assert "mining retrieval: checked" in whole.stdout + whole.stderr
    state = json.loads((tmp_path / "whole/mining_retrieval.json").read_text())
    assert sum(c["replaced"] for c in state["checks"]) > 0     # the rule fired on real scores
    # S0 comes from the mining scores, so the rule can fire in the first epoch (steps 1-2: 16 examples at 8)
    assert min(s for e in state["examples"].values() for s in e["replaced_at"]) <= 2
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


def test_the_calibrated_rule_sets_its_thresholds_from_the_first_visits_and_keeps_them_on_resume():
    import random as _random
    from train.step.mining import HardNegativeMiner, MiningRule
    rng = _random.Random(0)
    # e5-like: every example's hard negatives start at cosine 0.82-0.92 and fall a little in training
    s0 = {f"f:{i}": rng.uniform(0.82, 0.92) for i in range(400)}
    drop = {k: rng.uniform(0.0, 0.06) for k in s0}
    rules = {"v1": MiningRule(), "v2": MiningRule.v2(),
             "calibrated": MiningRule(name="calibrated", calibrate_on=100, quantile=0.2, spread=1.0)}
    replaced = {}
    for name, rule in rules.items():
        miner = HardNegativeMiner(2, rule)
        ids = sorted(s0)
        for step, start in enumerate(range(0, len(ids), 50)):  # every example visited once, 50 a step
            miner.record(step, {k: (s0[k] - drop[k], 100, s0[k]) for k in ids[start:start + 50]})
        replaced[name] = miner.summary(8)["replaced"]
        if name == "calibrated":
            first = sorted(s0[k] for k in ids[:100])
            assert miner.rule.low == first[20]            # the 0.2 quantile of the first 100 S0
            mean = sum(first) / 100
            assert abs(miner.rule.drop - (sum((x - mean) ** 2 for x in first) / 100) ** 0.5) < 1e-12
            # the first 100 visits only calibrate; of the rest, those under low or fallen by more than drop
            want = sum(1 for k in ids[100:] if s0[k] < miner.rule.low or drop[k] > miner.rule.drop)
            assert replaced[name] == want
            resumed = HardNegativeMiner.from_state_dict(miner.state_dict())
            assert (resumed.rule.low, resumed.rule.drop, resumed.calibration) == \
                (miner.rule.low, miner.rule.drop, miner.calibration)
            assert miner.summary(8)["rule"]["low"] == miner.rule.low   # recorded in the run's summary
    # the fixed-cosine rules hardly act on scores this high; the calibrated one does
    assert replaced["v1"] == 0 and replaced["v2"] == 0
    assert replaced["calibrated"] >= 0.05 * 300


def test_mining_calibrated_in_a_task_config(tmp_path):
    import json as _json
    from train.kinds.tasks import load_data_config
    path = tmp_path / "c.json"
    path.write_text(_json.dumps({"tasks": {"r": {"type": "retrieval", "files": [str(ROOT / "data/demo/finetune/retrieval.jsonl")], "batch_size": 4,
                                                 "num_negatives": 2, "mining": {"rule": "calibrated", "quantile": 0.1}}}}))
    rule = load_data_config(path).tasks[0].mining
    assert rule["name"] == "calibrated" and rule["quantile"] == 0.1 and rule["calibrate_on"] == 256
