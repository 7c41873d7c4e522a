"""The release: a model card for the exported folder, and the upload to the Hugging Face Hub."""
from __future__ import annotations

import json
from pathlib import Path

EVAL_START, EVAL_END = "<!-- eval-table:start -->", "<!-- eval-table:end -->"

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A Chinese text-embedding model trained with the Conan-embedding recipe
([arXiv 2408.15710](https://arxiv.org/abs/2408.15710)): multi-task fine-tuning with the Cross-GPU
Batch Balance loss{% if dims %} and Matryoshka representation learning{% endif %}, from `{{ base_model }}`.

## Usage

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{{ repo_id }}"{% if dims %}, truncate_dim={{ dims[0] }}{% endif %})
queries = model.encode(["如何训练中文向量模型？"], prompt_name="query")
passages = model.encode(["先在大规模弱监督数据上预训练，再做多任务微调。"], prompt_name="passage")
print(model.similarity(queries, passages))
```

Prompts saved with the model: query `{{ query_prompt | tojson }}`, passage `{{ passage_prompt | tojson }}`.
{% if dims %}
Embeddings are {{ width }}-dimensional and were trained to be cut to any of
{{ dims | join(", ") }} dimensions (`truncate_dim=`).
{% endif %}

## Training

| setting | value |
|---|---|
| base model | `{{ base_model }}` |
| output width | {{ width }}{% if expanded %} (linear expansion layer after pooling){% endif %} |
| Matryoshka dims | {{ dims | join(", ") if dims else "none" }} |
| task schedule | {{ schedule }} |
| steps | {{ steps }} on {{ world }} rank(s) |
| learning rate | {{ lr }} |
| temperature | {{ temperature }} |
| false negatives | {{ "left out of InfoNCE (copies of a query's positive)" if mask_false_negatives else "kept as negatives" }} |
| CoSENT scale | {{ cosent_scale }} |
| training length | {{ max_length }} tokens per text (a compute choice) |
| inference length | {{ release_length }} tokens (`max_seq_length` of this model) |

| task | type | data | batch / step | negatives | weight | ranks |
|---|---|---|---|---|---|---|
{% for t in tasks -%}
| {{ t.name }} | {{ t.type }} | {{ t.files | join(", ") }} | {{ t.batch_size }} | {{ t.num_negatives }} | {{ t.weight }} | {{ t.ranks }} |
{% endfor %}

## Evaluation

{{ eval_start }}
Not evaluated yet: run `python eval/cmteb.py --model PATH --update-card`.
{{ eval_end }}
"""


def schedule_name(args: dict) -> str:
    """cbb (by-task / every-rank placement) or random, for the card."""
    schedule = args.get("task_schedule", "cbb")
    return f"{schedule} ({args.get('task_placement', 'by-task')})" if schedule == "cbb" else schedule


def write_model_card(folder: Path, base_model: str, tasks: list, dims: list[int], width: int, expanded: bool,
                     args: dict, steps: int, world: int, release_length: int | None = None,
                     repo_id: str | None = None) -> Path:
    """README.md with Hub metadata, usage, training settings and an eval-table placeholder."""
    from huggingface_hub import ModelCard, ModelCardData

    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    repo_id = repo_id or args.get("hub_model_id") or args.get("push_to_hub")
    name = repo_id.split("/")[-1] if repo_id else folder.resolve().parent.name  # OUTPUT_DIR/final -> OUTPUT_DIR
    root = Path(__file__).resolve().parent.parent
    if Path(base_model).is_absolute() and Path(base_model).is_relative_to(root):
        base_model = str(Path(base_model).relative_to(root))  # no machine-specific paths in a public card
    prompts = config.get("prompts", {})
    card_data = ModelCardData(
        language="zh", license="apache-2.0", library_name="sentence-transformers",
        pipeline_tag="sentence-similarity", model_name=name,
        base_model=base_model if _is_hub_id(base_model) else None,  # the Hub wants an id, not a local path
        tags=["sentence-transformers", "sentence-similarity", "feature-extraction", "conan-embedding"]
        + (["matryoshka"] if dims else []))
    card = ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, model_name=name,
        repo_id=repo_id or name, base_model=base_model,  # the id to load it by, never a path of this machine
        query_prompt=prompts.get("query", ""), passage_prompt=prompts.get("passage", ""),
        dims=dims, width=width, expanded=expanded, release_length=release_length, schedule=schedule_name(args), steps=steps,
        world=world, lr=args.get("lr"), temperature=args.get("temperature"),
        mask_false_negatives=args.get("mask_false_negatives", True), cosent_scale=args.get("cosent_scale"), max_length=args.get("max_length"),
        tasks=[dict(name=t.name, type=t.type, files=[Path(f).name for f in t.files], batch_size=t.batch_size,
                    num_negatives=t.num_negatives, weight=t.weight, ranks=len(t.assigned)) for t in tasks],
        eval_start=EVAL_START, eval_end=EVAL_END)
    path = folder / "README.md"
    card.save(path)
    return path


def _is_hub_id(name: str) -> bool:
    import re
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


def replace_eval_table(card_path: Path, table_markdown: str) -> None:
    """Put `table_markdown` between the eval markers (idempotent: the old table is replaced)."""
    text = card_path.read_text(encoding="utf-8")
    if EVAL_START not in text or EVAL_END not in text:
        text = text.rstrip() + f"\n\n## Evaluation\n\n{EVAL_START}\n{EVAL_END}\n"
    head, rest = text.split(EVAL_START, 1)
    _, tail = rest.split(EVAL_END, 1)
    card_path.write_text(f"{head}{EVAL_START}\n{table_markdown.strip()}\n{EVAL_END}{tail}", encoding="utf-8")


def add_model_index(card_path: Path, model_name: str, results: list[tuple[object, float, str]]) -> int:
    """The card's `model-index` metadata, as MTEB results have it on the Hub: one entry per task with its
    type, dataset (path, split, revision) and main score x 100. `results`: (mteb task, main score, split).
    Returns the number of entries; re-running replaces them."""
    from huggingface_hub import EvalResult, ModelCard
    card = ModelCard.load(card_path)
    entries = []
    for task, score, split in results:
        meta = task.metadata
        entries.append(EvalResult(
            task_type=meta.type, dataset_name=f"MTEB {meta.name}",
            dataset_type=path if _is_hub_id(path := str(meta.dataset.get("path", ""))) else meta.name,  # no local paths
            dataset_config="default", dataset_split=split, dataset_revision=meta.dataset.get("revision"),
            metric_type=meta.main_score, metric_value=round(100 * float(score), 4)))
    card.data.model_name = card.data.model_name or model_name
    card.data.eval_results = entries or None
    card.save(card_path)
    return len(entries)


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create the repo if needed and upload the release folder; returns the repo URL."""
    from huggingface_hub import HfApi
    api = HfApi()
    url = api.create_repo(repo_id, exist_ok=True, private=private)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload Conan-embedding model")
    return str(url)
