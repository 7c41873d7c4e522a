"""`deepspeed train/finetune.py` on 1 and 2 CPU ranks: CBB, MRL, the expansion layer, the release folder."""
import json

import pytest
import torch
from huggingface_hub import ModelCard
from sentence_transformers import SentenceTransformer

from tests.conftest import ROOT, deepspeed_launch
from train.run.release import EVAL_END, EVAL_START, replace_eval_table

FINETUNE = ROOT / "train/finetune.py"


@pytest.mark.parametrize("ranks", [1, 2])
def test_finetune_runs_and_exports_a_matryoshka_model(tiny_model, tmp_path, ranks):
    out = tmp_path / "ft"
    proc = deepspeed_launch(FINETUNE, "--model", str(tiny_model), "--output-dir", str(out), "--max-steps", "3",
                            "--log-steps", "1", "--expand-dim", "48", "--mrl-dims", "16,32,48", "--lr", "1e-3",
                            "--max-length", "32", "--expansion-lr", "1e-2", num_gpus=ranks)
    assert "export check: reloaded model matches the engine" in proc.stdout
    final = out / "final_unmerged"  # the model as trained; out / "final" is its merge with the base
    check = torch.load(out / "export_check.pt")

    full = SentenceTransformer(str(final), device="cpu")
    assert full.get_embedding_dimension() == 48
    assert full.max_seq_length == 64  # trained at 32 tokens; the release keeps the base model's length
    emb = full.encode(check["texts"], prompt=check["prompt"], convert_to_tensor=True)
    assert (emb - check["embeddings"]).abs().max() < 1e-5
    cut = SentenceTransformer(str(final), device="cpu", truncate_dim=16)
    assert torch.allclose(cut.encode(check["texts"], prompt=check["prompt"], convert_to_tensor=True), emb[:, :16], atol=1e-6)

    card = ModelCard.load(final / "README.md")
    assert card.data.library_name == "sentence-transformers" and "matryoshka" in card.data.tags
    assert card.data.pipeline_tag == "sentence-similarity" and card.data.language == "zh"
    assert card.data.base_model is None  # a local base path is never put in the Hub metadata
    assert "16, 32, 48" in card.text and EVAL_START in card.text
    assert "| training length | 32 tokens" in card.text and "| inference length | 64 tokens" in card.text
    assert list(final.glob("*.safetensors")) and (final / "modules.json").is_file()
    modules = [m["type"] for m in json.loads((final / "modules.json").read_text())]
    assert any(t.endswith("Dense") for t in modules)

    # the release merges the encoder with the base by default (LM-Cocktail, --merge-weight 0.5)
    from safetensors.torch import load_file
    merged, trained = load_file(out / "final/model.safetensors"), load_file(final / "model.safetensors")
    base = load_file(tiny_model / "model.safetensors")
    for name in base:
        assert torch.allclose(merged[name], 0.5 * trained[name] + 0.5 * base[name], atol=1e-6), name
    assert any((trained[n] - base[n]).abs().max() > 1e-4 for n in base)  # training moved the encoder
    released = SentenceTransformer(str(out / "final"), device="cpu")
    assert released.get_embedding_dimension() == 48 and released.max_seq_length == 64
    assert "Merged with the base model" in (out / "final/README.md").read_text()


def test_a_fine_tuned_model_fine_tunes_again_with_the_default_flags(tiny_model, tmp_path):
    """Round two (or a released Conan-style model): the expansion layer is found and kept, not re-added."""
    first, second = tmp_path / "one", tmp_path / "two"
    deepspeed_launch(FINETUNE, "--model", str(tiny_model), "--output-dir", str(first), "--max-steps", "2",
                     "--expand-dim", "48", "--mrl-dims", "16,48", num_gpus=1)
    proc = deepspeed_launch(FINETUNE, "--model", str(first / "final"), "--output-dir", str(second), "--max-steps", "2",
                            num_gpus=1)  # --expand-dim auto, --mrl-dims auto
    assert "keeping the model's expansion layer 32 -> 48; MRL dims [48]" in proc.stdout
    model = SentenceTransformer(str(second / "final"), device="cpu")
    assert model.get_embedding_dimension() == 48
    assert sum(m["type"].endswith("Dense") for m in json.loads((second / "final/modules.json").read_text())) == 1


def test_an_expansion_width_other_than_the_models_is_refused(tiny_model, tmp_path):
    from train.models.model import add_expansion_layer, with_expansion
    expanded = add_expansion_layer(SentenceTransformer(str(tiny_model), device="cpu"), 48)
    for flag in ("auto", "48", "0"):
        model, added, what = with_expansion(expanded, flag)
        assert model is expanded and added == 0 and "keeping the model's expansion layer 32 -> 48" in what
    with pytest.raises(SystemExit, match="already has an expansion layer 32 -> 48; pass --expand-dim auto"):
        with_expansion(expanded, "64")


def test_expansion_layer_starts_from_the_base_geometry(tiny_model):
    """Prefixes up to the encoder width are the base embedding exactly; the new coordinates are at the
    old ones' scale (not ~0, which left them unused) and the full-width cosine starts near the base's."""
    import torch.nn.functional as F
    from bench.tiny_model import demo_texts
    from train.models.model import add_expansion_layer
    texts = demo_texts()[:40]
    base = F.normalize(SentenceTransformer(str(tiny_model), device="cpu").encode(texts, convert_to_tensor=True), dim=-1)
    wide = add_expansion_layer(SentenceTransformer(str(tiny_model), device="cpu"), 56).encode(texts, convert_to_tensor=True)
    assert (F.normalize(wide[:, :32], dim=-1) - base).abs().max() < 1e-6
    rms_ratio = wide[:, 32:].pow(2).mean(1).sqrt() / wide[:, :32].pow(2).mean(1).sqrt()
    assert 0.5 < rms_ratio.min() and rms_ratio.max() < 2.0
    full = F.normalize(wide, dim=-1)
    assert (full @ full.T - base @ base.T).abs().max() < 0.1


def test_expansion_layer_has_a_learning_rate_of_its_own(tiny_model):
    from train.models.model import add_expansion_layer, parameter_groups
    model = add_expansion_layer(SentenceTransformer(str(tiny_model), device="cpu"), 48)
    encoder, head = parameter_groups(model, 1e-5, 1e-3)
    assert (encoder["lr"], head["lr"]) == (1e-5, 1e-3) and [p.shape for p in head["params"]] == [(48, 32), (48,)]
    assert len(encoder["params"]) + 2 == len(list(model.parameters()))
    assert len(parameter_groups(model, 1e-5)) == 1  # no --expansion-lr: one group


def test_eval_table_update_is_idempotent(tmp_path):
    card = tmp_path / "README.md"
    card.write_text(f"---\nlibrary_name: sentence-transformers\n---\n# m\n\n{EVAL_START}\nold\n{EVAL_END}\n\nfooter\n")
    replace_eval_table(card, "| task | score |\n|---|---|\n| STS | 80.0 |")
    once = card.read_text()
    replace_eval_table(card, "| task | score |\n|---|---|\n| STS | 80.0 |")
    assert card.read_text() == once and "old" not in once and once.endswith("footer\n")


def test_bad_config_stops_before_training(tiny_model, tmp_path):
    bad = tmp_path / "tasks.json"
    bad.write_text(json.dumps({"tasks": {"r": {"type": "retrieval", "files": [str(ROOT / "data/demo/finetune/sts.jsonl")],
                                               "batch_size": 4, "num_negatives": 2}}}))
    proc = deepspeed_launch(FINETUNE, "--model", str(tiny_model), "--data-config", str(bad),
                            "--output-dir", str(tmp_path / "o"), num_gpus=2, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config error: task 'r':" in output and "sts.jsonl:1: missing field 'query'" in output
    assert "Traceback" not in output and "finetune:" not in output  # no training step was taken


def test_random_task_schedule_baseline_runs_one_task_per_step(tiny_model, tmp_path):
    proc = deepspeed_launch(FINETUNE, "--model", str(tiny_model), "--output-dir", str(tmp_path / "r"), "--max-steps", "4",
                            "--log-steps", "1", "--expand-dim", "0", "--mrl-dims", "none", "--task-schedule", "random")
    assert "(random)" in proc.stdout and "done: 4 steps" in proc.stdout
    # every task is held by every rank; each step only one of them runs (one loss in the postfix per step)
    assert "retrieval (retrieval) x8 w=1 on ranks [0, 1]" in proc.stdout
