"""How often each mining rule acts on the ablation's data, per rule and seed, and (--dev) what each scores.

    python -m bench.mining_rules                     # multilingual-e5-small (offline), rules v1, v2, calibrated, seeds 42, 7
    python -m bench.mining_rules --temperature 0.01 --seeds 42 --rules v1,calibrated   # e5's own temperature
    python -m bench.mining_rules --dev               # also score each rule's release on the ablation's dev sets
    python -m bench.mining_rules --quick             # the tiny model, a few steps: the wiring

Row e of bench/ablation.py (CBB + dynamic mining, the same data, budget and base) trained once per
rule and seed; what summary.json says the miner did: visits scored, negatives replaced, examples with a
replacement, when (per quarter of the run), and the calibrated rule's thresholds. The share replaced
is replacements / examples trained on: the share of the hard negatives seen that were swapped out
(a replacement swaps all of an example's negatives). --dev scores each release on bench/ablation.py's dev
sets, as the ablation scores its rows (rule v1 is its row e). A finished run (its summary.json) is not
trained again; each score is kept in OUT/results/<run>.json.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from bench import launch
from bench.ablation_data import QUICK, Budget, mine, split_data, task_config
from bench.base_model import base_model

ROOT = Path(__file__).resolve().parent.parent
RULES = ("v1", "v2", "calibrated")


def run_rule(out: Path, data_dir: Path, base: str, b: Budget, rule: str) -> dict:
    name = f"{rule}-seed{b.seed}" + (f"-t{b.temperature:g}" if b.temperature is not None else "")
    run_dir = out / "runs" / name
    args = ["--model", base, "--data-config", str(task_config(data_dir, b, rule)), "--max-steps", str(b.steps),
            "--lr", str(b.lr), "--max-length", str(b.max_length), "--seed", str(b.seed), "--save-steps", "100000",
            "--merge-weight", "1", "--log-steps", str(max(1, b.steps // 10))]
    if b.temperature is not None:
        args += ["--temperature", str(b.temperature)]
    done = run_dir / "summary.json"
    summary = json.loads(done.read_text()) if done.is_file() else \
        launch.train("train/finetune.py", args, run_dir, out / "logs" / f"{name}.log")
    mining = summary["mining"]["retrieval"]
    return {"run": name, "release": str(run_dir / "final"), "rule": rule, "seed": b.seed, "temperature": b.temperature or 0.02, "steps": summary["steps"], "examples": summary["examples"]["retrieval"],
            "replaced": mining["replaced"], "examples_scored": mining["examples_scored"],
            # each replacement swaps all n of an example's negatives; the run saw n per example trained on
            "share_replaced": round(mining["replaced"] / max(1, summary["examples"]["retrieval"]), 4),
            "per_quarter": mining["per_quarter"],
            "thresholds": {k: mining["rule"].get(k) for k in ("low", "drop")} if rule == "calibrated" else None}


def dev_scores(row: dict, data_dir: Path, out: Path, b: Budget) -> dict:
    """The release's scores on the ablation's dev sets (bench/ablation.py's evaluate_row), kept once computed."""
    from bench.ablation import evaluate_row
    kept = out / "results" / f"{row['run']}.json"
    if not kept.is_file():
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(evaluate_row({"model": row["release"]}, data_dir, out, row["run"], b)["scores"]))
    return json.loads(kept.read_text())


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", default="42,7")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--out", default=None)
    p.add_argument("--temperature", type=float, default=None, help="InfoNCE's (default: train/args.py's 0.02)")
    p.add_argument("--dev", action="store_true", help="score each release on the ablation's dev sets")
    args = p.parse_args(argv)
    budget = replace(QUICK if args.quick else Budget(), temperature=args.temperature)
    out = Path(args.out or ROOT / "bench/results" / ("mining-rules-quick" if args.quick else "mining-rules")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = base_model(None, args.quick, out)
    data_dir = out / "data"
    split_data(data_dir, budget)
    mine(data_dir, base, budget, launch.script_env())
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for rule in args.rules.split(","):
            rows.append(run_rule(out, data_dir, base, replace(budget, seed=seed), rule))
            if args.dev:
                rows[-1]["scores"] = dev_scores(rows[-1], data_dir, out, budget)
            print(json.dumps(rows[-1]), flush=True)
    suffix = f"-t{args.temperature:g}" if args.temperature is not None else ""
    (out / f"rows{suffix}.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
