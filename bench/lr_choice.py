"""Each trainer's learning rate, chosen on the tune split; then, once, the dev scores of the choice.

    python bench/ablation.py                         # every row at lr 2e-5 (the table in README.md)
    python bench/ablation.py --lr 1e-5 --rows a,e,f  # the peer and the full recipe at lr 1e-5
    python bench/lr_choice.py                        # the choice, and the dev table of every lr run
    python bench/lr_choice.py --seed 7               # the same between `bench/ablation.py --seed 7 [--lr ..]` runs

A learning rate fixed in advance favours whichever trainer it happens to suit, so each trainer gets
the same chance: the sentence-transformers row (a) and the full recipe (f: CBB + mining, merged with
the base at the weight its own sweep picked on the tune split) are scored on the tune split at every
lr that bench/ablation.py has run (2e-5 in bench/results/ablation, others in ablation-lr<LR>), and
each trainer's lr is the one eval/merge_sweep.py's rule picks there: the best tune average with no
task more than 1.0 below the base. The dev sets play no part in the choice; every lr's dev row is
printed beside it, the chosen ones marked, and the comparison against issue #12's targets is made
on the chosen pair.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.ablation_data import QUICK, Budget, dev_tasks  # noqa: E402  (after the path)
from eval.merge_sweep import average, choose_weight, worst_drop  # noqa: E402

TRAINERS = {"a": "sentence-transformers trainer", "f": "ours, CBB + mining, merged (LM-Cocktail)"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--lrs", default="1e-05,2e-05", help="the learning rates to choose between (each must have been run)")
    p.add_argument("--quick", action="store_true", help="choose between `bench/ablation.py --quick` runs")
    p.add_argument("--seed", type=int, default=None, help="choose between `bench/ablation.py --seed N` runs")
    p.add_argument("--results", default=str(ROOT / "bench/results"), help="where bench/ablation.py wrote its runs")
    p.add_argument("--max-drop", type=float, default=Budget().max_drop, help="points a tune task may lose against the base")
    return p.parse_args(argv)


def run_dir(results: Path, lr: float, quick: bool, seed: int | None) -> Path:
    """bench/ablation.py's output folder for this lr (its default lr writes the main table's)."""
    name, default = ("ablation-quick", QUICK.lr) if quick else ("ablation", Budget().lr)
    name += f"-seed{seed}" if seed is not None else ""
    return results / (name if lr == default else f"{name}-lr{lr:g}")


def tune_scores(out: Path, row: str) -> tuple[dict[str, float], dict[str, float]]:
    """(the row's tune scores, the base's) for one ablation run. Row f's come from its merge sweep;
    the peer's are scored here once and kept in OUT/tune/a.json."""
    f = json.loads((out / "results/f.json").read_text())
    base = f["tune"]["base"]
    if row == "f":
        return f["tune"]["weights"][str(f["merge_weight"])], base
    cached = out / "tune" / f"{row}.json"
    if not cached.is_file():
        from sentence_transformers import SentenceTransformer

        from eval.cmteb import evaluate
        info = json.loads((out / "results" / f"{row}.json").read_text())
        model = SentenceTransformer(info["model"], device="cpu", local_files_only=True)
        scores = evaluate(model, dev_tasks(out / "data", "tune"), [None], Budget().eval_batch, f"lr-choice-{row}",
                          out / "tune" / row)[None]
        cached.write_text(json.dumps(scores, indent=1))
    return json.loads(cached.read_text()), base


def choose_lr(tune: dict[float, dict[str, float]], base: dict[str, float], max_drop: float) -> float:
    """eval/merge_sweep.py's rule over learning rates (ties: the larger lr)."""
    return choose_weight(tune, base, max_drop)


def report(results: Path, lrs: list[float], max_drop: float, quick: bool = False,
           seed: int | None = None) -> tuple[str, dict[str, float]]:
    """The markdown table and verdict, and {trainer row: chosen lr}."""
    outs = {lr: run_dir(results, lr, quick, seed) for lr in lrs}
    missing = [str(o / "results" / f"{row}.json") for o in outs.values() for row in ("base", *TRAINERS)
               if not (o / "results" / f"{row}.json").is_file()]
    if missing:
        raise SystemExit("run bench/ablation.py for each lr first; missing: " + ", ".join(missing))
    dev = {lr: {row: json.loads((o / "results" / f"{row}.json").read_text()) for row in ("base", *TRAINERS)}
           for lr, o in outs.items()}
    bases = {dev[lr]["base"]["model"] for lr in lrs}
    if len(bases) > 1:
        raise SystemExit(f"the runs start from different base models ({sorted(bases)}): rerun with the same --model")
    base_dev = dev[lrs[0]]["base"]["scores"]
    tasks = list(base_dev)
    lines = ["| trainer | lr | tune average | tune worst vs base | chosen | " + " | ".join(tasks)
             + " | dev average | dev worst vs base | merge weight |", "|" + "---|" * (len(tasks) + 8),
             "| base | — | | | | " + " | ".join(f"{100 * base_dev[t]:.2f}" for t in tasks)
             + f" | **{average(base_dev):.2f}** | — | |"]
    chosen = {}
    for row, name in TRAINERS.items():
        tune = {}
        for lr, o in outs.items():
            tune[lr], tune_base = tune_scores(o, row)
        chosen[row] = choose_lr(tune, tune_base, max_drop)
        for lr in lrs:
            r = dev[lr][row]
            weight = f"{r['merge_weight']:g}" if "merge_weight" in r else "—"
            lines.append(f"| {row}: {name} | {lr:g} | {average(tune[lr]):.2f} | {worst_drop(tune[lr], tune_base):+.2f} | "
                         + ("**yes**" if lr == chosen[row] else "") + " | "
                         + " | ".join(f"{100 * r['scores'][t]:.2f}" for t in tasks)
                         + f" | **{average(r['scores']):.2f}** | {worst_drop(r['scores'], base_dev):+.2f} | {weight} |")
    a, f = (dev[chosen[row]][row]["scores"] for row in ("a", "f"))
    verdict = (f"Chosen on the tune split: the peer at lr {chosen['a']:g}, ours at lr {chosen['f']:g}. On dev, ours "
               f"minus the peer: {average(f) - average(a):+.2f} points (target +1.5); ours' worst task against the "
               f"base: {worst_drop(f, base_dev):+.2f} (target -1.0).")
    return "\n".join(lines) + "\n\n" + verdict, chosen


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    lrs = sorted(float(x) for x in args.lrs.split(","))
    text, chosen = report(Path(args.results), lrs, args.max_drop, args.quick, args.seed)
    name = "lr_choice" + (f"-seed{args.seed}" if args.seed is not None else "") + ".md"
    (Path(args.results) / name).write_text(text + "\n")
    print(text)
    return chosen


if __name__ == "__main__":
    main()
