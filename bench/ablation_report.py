"""The ablation's report: the table, the per-task plot and the block of docs/ablation.md (bench/ablation.py)."""
from __future__ import annotations

from pathlib import Path

from eval.merge_sweep import average, worst_drop

ROOT = Path(__file__).resolve().parent.parent

DOC_BEGIN, DOC_END = "<!-- ablation:begin -->", "<!-- ablation:end -->"
DOC = ROOT / "docs/ablation.md"


def table(results: dict[str, dict], labels: dict[str, str], machine: str) -> str:
    """Each task, the average, the worst drop against the base row, mining, and the training time."""
    base = results["base"]["scores"]
    tasks = list(base)
    head = ("| row | " + " | ".join(tasks) + " | average | worst vs base | average at base width "
            "| negatives replaced (steps) | train s |")
    lines = [head, "|" + "---|" * (len(tasks) + 6)]
    for row, r in results.items():
        s = r["scores"]
        avg, worst = average(s), worst_drop(s, base)
        narrow = f"{average(r['scores_base_width']):.2f}" if r["width"] != results["base"]["width"] else "="
        m = r.get("mining")
        mined = f"{m['replaced']} ({m['first_step']}–{m['last_step']})" if m and m["replaced"] else ("0" if m else "—")
        lines.append(f"| {row}: {labels[row]} | " + " | ".join(f"{100 * s[t]:.2f}" for t in tasks)
                     + f" | **{avg:.2f}** | {'—' if row == 'base' else f'{worst:+.2f}'} | {narrow} | {mined} | "
                     + (f"{r['seconds']:.0f}" if r.get("seconds") else "—") + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(results["base"]["scores"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(results)
    for i, (row, r) in enumerate(results.items()):
        ax.bar([t + i * width for t in range(len(tasks))], [100 * r["scores"][t] for t in tasks], width, label=row)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
    low = min(100 * r["scores"][t] for r in results.values() for t in tasks)
    ax.set_ylim(max(0, low - 5), None)
    ax.set_ylabel("dev score x 100 (Spearman / nDCG@10)")
    ax.legend(ncols=len(results), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_doc(text: str) -> None:
    """Replace the table between the markers of docs/ablation.md (the prose around it is written by hand)."""
    content = DOC.read_text(encoding="utf-8")
    if DOC_BEGIN not in content:
        raise SystemExit(f"{DOC} has no {DOC_BEGIN} marker")
    head, rest = content.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    DOC.write_text(f"{head}{DOC_BEGIN}\n{text}\n{DOC_END}{tail}", encoding="utf-8")
