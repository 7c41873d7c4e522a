"""train/run/merge.py: LM-Cocktail's weighted average of a fine-tuned model and its base."""
import pytest
import torch
from sentence_transformers import SentenceTransformer

from train.run.merge import main as merge_main, merge_weights
from train.models.model import add_expansion_layer, expansion_layer


def fine_tuned_copy(base_dir, out_dir):
    """The base with every encoder weight moved, and an expansion layer: what finetune.py releases."""
    model = SentenceTransformer(str(base_dir), device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model[0].auto_model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = add_expansion_layer(model, 48)
    model.max_seq_length = 100
    model.save(str(out_dir))
    return out_dir


def test_merge_averages_the_encoder_and_keeps_the_expansion_layer(tiny_model, tmp_path):
    ft_dir = fine_tuned_copy(tiny_model, tmp_path / "ft")
    base = SentenceTransformer(str(tiny_model), device="cpu")
    ft = SentenceTransformer(str(ft_dir), device="cpu")
    merge_main(["--model", str(ft_dir), "--base", str(tiny_model), "--weight", "0.25", "--output", str(tmp_path / "m")])
    merged = SentenceTransformer(str(tmp_path / "m"), device="cpu")
    b, f, m = (x[0].auto_model.state_dict() for x in (base, ft, merged))
    for name in b:
        torch.testing.assert_close(m[name], 0.25 * f[name] + 0.75 * b[name], rtol=0, atol=1e-6)
    assert expansion_layer(merged) == (32, 48)
    dense_ft, dense_m = (list(x)[-2] if expansion_layer(x) else None for x in (ft, merged))
    torch.testing.assert_close(dense_m.linear.weight, dense_ft.linear.weight)
    assert merged.max_seq_length == 100 and merged.prompts == ft.prompts
    # a merged model is a model: it encodes, and it is neither of its parents
    texts = ["如何训练中文向量模型？", "今天天气很好"]
    e_m, e_f = merged.encode(texts, convert_to_tensor=True), ft.encode(texts, convert_to_tensor=True)
    assert e_m.shape == e_f.shape and (e_m - e_f).abs().max() > 1e-3


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_merge_weight_ends_are_the_parents(tiny_model, tmp_path, weight):
    ft_dir = fine_tuned_copy(tiny_model, tmp_path / "ft")
    ft = SentenceTransformer(str(ft_dir), device="cpu")
    merge_weights(ft, SentenceTransformer(str(tiny_model), device="cpu"), weight)
    parent = SentenceTransformer(str(ft_dir if weight == 1.0 else tiny_model), device="cpu")
    for (name, a), b in zip(ft[0].auto_model.state_dict().items(), parent[0].auto_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)


def test_a_base_of_another_shape_is_refused(tiny_model, tmp_path):
    from bench.tiny_model import make_tiny_model
    other = make_tiny_model(tmp_path / "other", hidden=16)
    with pytest.raises(SystemExit, match="does not match"):
        merge_main(["--model", str(tiny_model), "--base", str(other), "--output", str(tmp_path / "m")])


def test_the_merge_weight_rule_keeps_every_task_near_the_base():
    from eval.merge_sweep import choose_weight
    base = {"sts": 0.80, "retrieval": 0.90}
    by_weight = {0.3: {"sts": 0.81, "retrieval": 0.895},   # +1.0 / -0.5: within 1 point
                 0.5: {"sts": 0.83, "retrieval": 0.892},   # -0.8: best average within (86.1)
                 0.7: {"sts": 0.86, "retrieval": 0.880}}   # best average, but -2.0 on retrieval
    assert choose_weight(by_weight, base, max_drop=1.0) == 0.5
    assert choose_weight(by_weight, base, max_drop=3.0) == 0.7
    # no weight keeps the bound: the smallest worst drop
    assert choose_weight(by_weight, base, max_drop=0.1) == 0.3


def test_merge_sweep_releases_the_merge_its_rule_picks_on_held_out_data(tiny_model, tmp_path):
    import json
    from eval.merge_sweep import choose_weight, main as sweep_main
    from tests.conftest import ROOT
    dev = tmp_path / "sts.jsonl"
    lines = (ROOT.parent / "shared/data/stsb-zh/validation.jsonl").read_text(encoding="utf-8").splitlines()[:24]
    dev.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ft_dir = fine_tuned_copy(tiny_model, tmp_path / "ft")
    result = sweep_main(["--model", str(ft_dir), "--base", str(tiny_model), "--local", f"sts:{dev}",
                         "--weights", "0.2,0.8", "--output", str(tmp_path / "m")])
    saved = json.loads((tmp_path / "m/merge_sweep.json").read_text())
    assert set(saved["weights"]) == {"0.2", "0.8"} and saved["weight"] == result["weight"]
    assert saved["weights"]["0.2"] != saved["weights"]["0.8"]  # the merges differ on the data
    assert result["weight"] == choose_weight({float(w): s for w, s in saved["weights"].items()}, saved["base"], 1.0)
    w = result["weight"]
    b, f, m = (SentenceTransformer(str(d), device="cpu")[0].auto_model.state_dict()
               for d in (tiny_model, ft_dir, tmp_path / "m"))
    for name in b:
        torch.testing.assert_close(m[name], w * f[name] + (1 - w) * b[name], rtol=0, atol=1e-6)
