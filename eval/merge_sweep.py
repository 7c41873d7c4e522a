"""Choose the LM-Cocktail merge weight on your own held-out data, and release that merge.

    python eval/merge_sweep.py --model output/finetune/final_unmerged --base intfloat/multilingual-e5-small \
        --local sts:my_dev/sts.jsonl --local retrieval:my_dev/passages --output output/finetune/merged

Fine-tuning gains in domain and loses elsewhere; merging with the base (train/run/merge.py,
w x fine-tuned + (1 - w) x base) gives back some of both. Which w is right depends on the data, so
this script scores the base and the merge at every weight of --weights on the --local sets
(eval/cmteb.py, in memory, one model at a time) and writes the merge that the rule picks:

    the highest average among the weights whose every task stays within --max-drop points of the
    base (the target of issue #12); if no weight keeps that, the one with the smallest worst drop.

The sets you choose on are spent by the choice: report the release on other data.
Output: the merged release in --output, and OUTPUT/merge_sweep.json (every weight's scores).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

WEIGHTS = (0.3, 0.4, 0.5, 0.6, 0.7)


def worst_drop(scores: dict[str, float], base: dict[str, float]) -> float:
    """The largest loss against the base over the tasks, in points (x 100); negative = a loss."""
    return min(100 * (scores[t] - base[t]) for t in base)


def average(scores: dict[str, float]) -> float:
    return 100 * sum(scores.values()) / len(scores)


def choose_weight(by_weight: dict[float, dict[str, float]], base: dict[str, float], max_drop: float) -> float:
    """The rule above. Ties go to the larger weight (more of what fine-tuning learned)."""
    within = [w for w, s in by_weight.items() if worst_drop(s, base) >= -max_drop]
    if within:
        return max(within, key=lambda w: (average(by_weight[w]), w))
    return max(by_weight, key=lambda w: (worst_drop(by_weight[w], base), w))


def sweep(model_dir: str | Path, base: str, tasks: list, weights: tuple[float, ...], max_drop: float,
          batch_size: int, out: Path) -> dict:
    """Score the base and every merge on `tasks`; returns {"base": scores, "weights": {w: scores}, "weight": chosen}."""
    import torch

    from eval.cmteb import evaluate
    from train.run.merge import merge_weights
    from train.models.model import open_sentence_transformer, resolve_model
    source, local_only = resolve_model(base)
    # on the GPU where there is one (device None: sentence-transformers' choice): the sweep runs one
    # full evaluation per weight
    base_model = open_sentence_transformer(source, local_only, device=None)
    model = open_sentence_transformer(str(model_dir), local_only=True, device=None)
    trained = {k: v.clone() for k, v in model[0].auto_model.state_dict().items()}
    base_scores = evaluate(base_model, tasks, [None], batch_size, "merge-sweep-base", out / "base")[None]
    by_weight: dict[float, dict[str, float]] = {}
    for w in weights:
        model[0].auto_model.load_state_dict(trained)  # each merge starts from the model as trained
        merge_weights(model, base_model, w)
        with torch.no_grad():
            by_weight[w] = evaluate(model, tasks, [None], batch_size, f"merge-sweep-{w:g}", out / f"w{w:g}")[None]
        print(f"merge weight {w:g}: average {average(by_weight[w]):.2f}, worst vs base "
              f"{worst_drop(by_weight[w], base_scores):+.2f}", flush=True)
    chosen = choose_weight(by_weight, base_scores, max_drop)
    return {"base": base_scores, "weights": {str(w): s for w, s in by_weight.items()}, "weight": chosen,
            "max_drop": max_drop}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="the fine-tuned folder as trained (finetune.py's final_unmerged)")
    p.add_argument("--base", required=True, help="the model it was fine-tuned from (folder or hub id)")
    p.add_argument("--local", action="append", required=True, metavar="[KIND:]PATH",
                   help="a held-out set to choose on (eval/local_tasks.py); repeatable")
    p.add_argument("--weights", default=",".join(f"{w:g}" for w in WEIGHTS), help="the grid of fine-tuned shares")
    p.add_argument("--max-drop", type=float, default=1.0, help="points any task may lose against the base")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", required=True, help="the merged release folder")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from eval.local_tasks import LocalDataError, local_task
    from train.run.merge import merge_release
    try:
        weights = tuple(float(w) for w in args.weights.split(","))
    except ValueError:
        raise SystemExit(f"--weights {args.weights!r}: expected numbers in [0, 1] separated by commas") from None
    if not weights or any(not 0.0 <= w <= 1.0 for w in weights):
        raise SystemExit(f"--weights {args.weights!r}: each must be in [0, 1]")
    try:
        tasks = [local_task(spec) for spec in args.local]
    except LocalDataError as e:
        raise SystemExit(f"data error: {e}") from None
    out = Path(args.output)
    scores_dir = out.with_name(out.name + "_sweep")  # mteb's per-task files, beside the release
    result = sweep(args.model, args.base, tasks, weights, args.max_drop, args.batch_size, scores_dir)
    merge_release(args.model, args.base, result["weight"], out)
    (out / "merge_sweep.json").write_text(json.dumps(result, indent=1))
    print(f"chosen merge weight {result['weight']:g} (max drop {args.max_drop:g} points) -> {out}")
    return result


if __name__ == "__main__":
    main()
