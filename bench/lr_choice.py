"""Each trainer's learning rate and temperature, chosen on the tune split; then, once, the dev scores of the choice.

    python bench/ablation.py                                # every row at lr 2e-5 (the table in docs/ablation.md)
    python bench/ablation.py --lr 1e-5 --rows a,e,f         # the peer and the full recipe at lr 1e-5
    python bench/ablation.py --temperature 0.01 --rows a,e,f  # both at InfoNCE temperature 0.01
    python bench/lr_choice.py --temperatures default,0.01   # the choice, and the dev table of every run
    python bench/lr_choice.py --seed 7                      # the same between `bench/ablation.py --seed 7 [..]` runs
    python bench/lr_choice.py --scale 4 --temperatures default,0.01   # ... between `bench/ablation.py --scale 4 [..]` runs

A setting fixed in advance favours whichever trainer it happens to suit, so each trainer gets the
same chance: the sentence-transformers row (a) and the full recipe (f: CBB + mining, merged with
the base at the weight its own sweep picked on the tune split) are scored on the tune split at every
(lr, temperature) that bench/ablation.py has run (the main table's settings in bench/results/ablation,
others in ablation-lr<LR>, ablation-t<T>, ablation-lr<LR>-t<T>), and each trainer's setting is the one
eval/merge_sweep.py's rule picks there: the best tune average with no task more than 1.0 below the
base. "default" is each trainer's own temperature (ours 0.02, the peer's MNRL scale 20, i.e. 0.05).
A setting of the grid that has no run is named in the report, not chosen. The dev sets play no part in
the choice; every run's dev row is printed beside it, the chosen ones marked, and the comparison
against issue #12's targets is made on the chosen pair.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from bench.ablation_data import QUICK, Budget, dev_tasks
from eval.merge_sweep import average, choose_weight, worst_drop

ROOT = Path(__file__).resolve().parent.parent

TRAINERS = {"a": "sentence-transformers trainer", "f": "ours, CBB + mining, merged (LM-Cocktail)"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--lrs", default="1e-05,2e-05", help="the learning rates to choose between")
    p.add_argument("--temperatures", default="default",
                   help="the temperatures to choose between; 'default': each trainer's own (ours 0.02, the peer's 0.05)")
    p.add_argument("--quick", action="store_true", help="choose between `bench/ablation.py --quick` runs")
    p.add_argument("--seed", type=int, default=None, help="choose between `bench/ablation.py --seed N` runs")
    p.add_argument("--scale", type=int, default=1, help="choose between `bench/ablation.py --scale K` runs")
    p.add_argument("--no-matryoshka", action="store_true",
                   help="ours from `bench/ablation.py --no-matryoshka` runs (the peer from the same settings' runs)")
    p.add_argument("--results", default=str(ROOT / "bench/results"), help="where bench/ablation.py wrote its runs")
    p.add_argument("--max-drop", type=float, default=Budget().max_drop, help="points a tune task may lose against the base")
    return p.parse_args(argv)


Setting = tuple[float, "float | None"]  # (lr, temperature); None: each trainer's own default


@dataclass
class Runs:
    """Which bench/ablation.py runs to choose between: their folder for each setting and trainer."""
    results: Path
    quick: bool = False
    seed: int | None = None
    scale: int = 1
    matryoshka: bool = True   # False: ours from the --no-matryoshka runs (the peer from the same folder if it ran there)

    def folder(self, setting: Setting, row: str) -> Path:
        """bench/ablation.py's output folder for this setting and row (its default lr writes the main table's)."""
        from bench.ablation import variant_suffix
        lr, temperature = setting
        name, default = ("ablation-quick", QUICK.lr) if self.quick else ("ablation", Budget().lr)
        lr = None if lr == default else lr

        def at(matryoshka: bool) -> Path:
            return self.results / (name + variant_suffix(self.seed, lr, temperature, scale=self.scale,
                                                         matryoshka=matryoshka))
        if self.matryoshka or (row == "a" and not (at(False) / "results/a.json").is_file()):
            return at(True)
        return at(False)


def temperature_of(row: str, temperature: float | None) -> float:
    """The temperature the row's trainer used: the one given to both, or its own default."""
    from bench.ablation import own_temperature
    return own_temperature(row) if temperature is None else temperature


def tune_scores(out: Path, row: str) -> dict[str, float]:
    """The row's tune scores in one ablation run. Row f's come from its merge sweep; the peer's are scored
    here once and kept in OUT/tune/a.json."""
    if row == "f":
        f = json.loads((out / "results/f.json").read_text())
        return f["tune"]["weights"][str(f["merge_weight"])]
    cached = out / "tune" / f"{row}.json"
    if not cached.is_file():
        from sentence_transformers import SentenceTransformer

        from eval.cmteb import evaluate
        info = json.loads((out / "results" / f"{row}.json").read_text())
        model = SentenceTransformer(info["model"], device="cpu", local_files_only=True)
        scores = evaluate(model, dev_tasks(out / "data", "tune"), [None], Budget().eval_batch, f"lr-choice-{row}",
                          out / "tune" / row)[None]
        cached.write_text(json.dumps(scores, indent=1))
    return json.loads(cached.read_text())


def choose_setting(tune: dict[tuple[float, float], dict[str, float]], base: dict[str, float],
                   max_drop: float) -> tuple[float, float]:
    """eval/merge_sweep.py's rule over (lr, temperature) (ties: the larger lr, then the larger temperature)."""
    return choose_weight(tune, base, max_drop)


def describe(setting: Setting) -> str:
    lr, temperature = setting
    return f"lr {lr:g}, " + ("each trainer's own temperature" if temperature is None else f"temperature {temperature:g}")


def read_runs(runs: Runs, grid: list[Setting]) -> tuple[dict, dict[str, list[Setting]]]:
    """{setting: {row: (its folder, its result)}} for each trainer's runs of the grid (the base's under "base"), and
    {trainer row: the settings it was not run at}. A row that has a run folder must have its result: a
    half-finished run is an error, not a setting to skip."""
    found, not_run = {}, {row: [] for row in TRAINERS}
    for setting in grid:
        for row in TRAINERS:
            out = runs.folder(setting, row)
            result = out / "results" / f"{row}.json"
            if not result.is_file():
                if (out / "runs" / row).is_dir():
                    raise SystemExit(f"finish this run with bench/ablation.py first; missing: {result}")
                not_run[row].append(setting)
                continue
            found.setdefault(setting, {})[row] = out, json.loads(result.read_text())
            found[setting].setdefault("base", (out, json.loads((out / "results" / "base.json").read_text())))
    if not found:
        raise SystemExit(f"no bench/ablation.py run in {runs.results} for any of {grid}")
    bases = {by_row["base"][1]["model"] for by_row in found.values()}
    if len(bases) > 1:
        raise SystemExit(f"the runs start from different base models ({sorted(bases)}): rerun with the same --model")
    return found, not_run


def base_tune_scores(runs: dict) -> dict[str, float]:
    """The base's tune scores: every merge sweep of row f scored it on the same tune split (one read)."""
    sweeps = [by_row["f"][1] for by_row in runs.values() if "f" in by_row]
    if not sweeps:
        raise SystemExit("no run of row f: its merge sweep is what scores the base on the tune split")
    return sweeps[0]["tune"]["base"]


def report(where: Runs, lrs: list[float], max_drop: float,
           temperatures: list[float | None] = (None,)) -> tuple[str, dict[str, tuple[float, float]]]:
    """The markdown table and verdict, and {trainer row: chosen (lr, temperature)}."""
    runs, not_run = read_runs(where, [(lr, t) for lr in lrs for t in temperatures])
    base_dev = next(iter(runs.values()))["base"][1]["scores"]
    base_tune = base_tune_scores(runs)
    tasks = list(base_dev)
    lines = ["| trainer | lr | temperature | tune average | tune worst vs base | chosen | " + " | ".join(tasks)
             + " | dev average | dev worst vs base | merge weight |", "|" + "---|" * (len(tasks) + 9),
             "| base | — | — | | | | " + " | ".join(f"{100 * base_dev[t]:.2f}" for t in tasks)
             + f" | **{average(base_dev):.2f}** | — | |"]
    chosen, chosen_dev = {}, {}
    for row, name in TRAINERS.items():
        name += ", without Matryoshka and the expansion layer" if row == "f" and not where.matryoshka else ""
        tune, dev = {}, {}
        for (lr, t), by_row in runs.items():
            if row not in by_row:
                continue
            key = (lr, temperature_of(row, t))
            if key in tune:  # e.g. --temperatures default,0.02: the same run twice for ours
                raise SystemExit(f"--temperatures: {describe((lr, t))} repeats another setting of row {row}")
            out, dev[key] = by_row[row]
            tune[key] = tune_scores(out, row)
        if not tune:
            raise SystemExit(f"row {row} was run at none of the grid's settings")
        chosen[row] = choose_setting(tune, base_tune, max_drop)
        for key in sorted(tune):
            r = dev[key]
            weight = f"{r['merge_weight']:g}" if "merge_weight" in r else "—"
            lines.append(f"| {row}: {name} | {key[0]:g} | {key[1]:g} | {average(tune[key]):.2f} | "
                         f"{worst_drop(tune[key], base_tune):+.2f} | " + ("**yes**" if key == chosen[row] else "") + " | "
                         + " | ".join(f"{100 * r['scores'][t]:.2f}" for t in tasks)
                         + f" | **{average(r['scores']):.2f}** | {worst_drop(r['scores'], base_dev):+.2f} | {weight} |")
        chosen_dev[row] = dev[chosen[row]]["scores"]
    (a_setting, a), (f_setting, f) = ((chosen[row], chosen_dev[row]) for row in ("a", "f"))
    verdict = (f"Chosen on the tune split: the peer at lr {a_setting[0]:g}, temperature {a_setting[1]:g}; ours at lr "
               f"{f_setting[0]:g}, temperature {f_setting[1]:g}. On dev, ours minus the peer: "
               f"{average(f) - average(a):+.2f} points (target +1.5); ours' worst task against the base: "
               f"{worst_drop(f, base_dev):+.2f} (target -1.0).")
    neither = [s for s in not_run["a"] if s in not_run["f"]]
    if neither:
        verdict += " Not run, so not chosen from: " + "; ".join(describe(s) for s in neither) + "."
    for row, who in (("a", "the peer"), ("f", "ours")):
        if alone := [s for s in not_run[row] if s not in neither]:
            verdict += f" Not run for {who}, so not chosen from: " + "; ".join(describe(s) for s in alone) + "."
    return "\n".join(lines) + "\n\n" + verdict, chosen


def main(argv=None) -> dict[str, tuple[float, float]]:
    args = parse_args(argv)
    lrs = sorted(float(x) for x in args.lrs.split(","))
    temperatures = [None if x.strip() == "default" else float(x) for x in args.temperatures.split(",")]
    runs = Runs(Path(args.results), args.quick, args.seed, args.scale, matryoshka=not args.no_matryoshka)
    text, chosen = report(runs, lrs, args.max_drop, temperatures)
    name = "lr_choice" + (f"-seed{args.seed}" if args.seed is not None else "") + ("-nomrl" if args.no_matryoshka else "") \
        + (f"-x{args.scale}" if args.scale != 1 else "") + ".md"
    (Path(args.results) / name).write_text(text + "\n")
    print(text)
    return chosen


if __name__ == "__main__":
    main()
