"""Decoder-only backbones through the training scripts on 2 CPU ranks: LoRA and soft masking under
every DeepSpeed setup give the one-process result, ZeRO-3 builds the model partitioned, a resumed run
continues soft masking's schedule, and fine-tuning with instructions releases them as named prompts.
A tiny random Qwen3-style checkpoint (bench/tiny_model.py) stands in for an LLM."""
import json

import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from bench.tiny_model import make_tiny_decoder
from tests.conftest import ROOT, launch

PRETRAIN, FINETUNE = ROOT / "train/pretrain.py", ROOT / "train/finetune.py"
QUESTIONS = str(ROOT / "data/demo/pretrain/question_pairs.jsonl")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_tiny_decoder(tmp_path_factory.mktemp("qwen") / "model", "qwen3")


def pretrain(qwen, out, *extra, nproc=2, batch=4):
    return launch(PRETRAIN, "--model", str(qwen), "--train-data", QUESTIONS, "--output-dir", str(out),
                  "--batch-size", str(batch), "--max-steps", "6", "--save-steps", "100", "--lr", "1e-3",
                  "--max-length", "48", "--lora-rank", "4", "--lora-alpha", "8", "--attention", "soft",
                  "--instruction", "检索意思相同的问题", *extra, nproc=nproc)


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_lora_with_soft_masking_trains_alike_on_every_setup_and_releases_the_merged_model(qwen, tmp_path):
    plain = tmp_path / "zero0"
    proc = pretrain(qwen, plain, "--save-adapter")
    assert "LoRA r=4" in proc.stdout and "attention soft" in proc.stdout
    assert "export check: reloaded model matches the engine" in proc.stdout
    # ZeRO-3 with GradCache and gradient checkpointing, stopped at step 3 and resumed: the soft mask's
    # schedule is the step, so the resumed run continues it where it stopped
    z3 = tmp_path / "zero3"
    z3_args = ["--deepspeed-config", "ds_configs/zero3.json", "--mini-batch", "3", "--gradient-checkpointing"]
    pretrain(qwen, z3, *z3_args, "--stop-at-step", "3")
    assert "export check" in pretrain(qwen, z3, *z3_args, "--resume", "auto").stdout
    one = tmp_path / "one_process"  # the same global batch of 8 in one process: what gathering must equal
    pretrain(qwen, one, nproc=1, batch=8)

    reference = weights(plain / "final")
    for other in (z3, one):
        got = weights(other / "final")
        assert got.keys() == reference.keys()
        worst = max((got[k] - reference[k]).abs().max().item() for k in reference)
        assert worst < 2e-5, f"{other.name}: {worst}"
    # the release is merged (no adapter keys), not the base, attends both ways, and keeps the instruction
    assert not any("lora" in k for k in reference)
    base = SentenceTransformer(str(qwen), device="cpu")[0].auto_model.state_dict()
    assert set(base) <= set(reference)
    moved = {k: (reference[k] - base[k]).abs().max().item() for k in base}
    assert max(moved["layers.0.self_attn.q_proj.weight"], moved["layers.1.mlp.down_proj.weight"]) > 1e-4
    assert moved["embed_tokens.weight"] == 0  # LoRA leaves what it does not adapt exactly as it was
    release = SentenceTransformer(str(plain / "final"), device="cpu")
    assert release[0].auto_model.config.is_causal is False
    assert release.prompts["Retrieval-query"] == "Instruct: 检索意思相同的问题\nQuery: "
    assert release.prompts["Retrieval-document"] == ""
    check = torch.load(plain / "export_check.pt")
    release.max_seq_length = check["train_max_length"]  # compared at the length it trained at
    got = release.encode(check["texts"], prompt=check["prompt"], convert_to_tensor=True)
    assert (got - check["embeddings"]).abs().max() < 1e-4
    adapter = load_file(str(plain / "final_adapter/adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())
    assert json.loads((plain / "final_adapter/adapter_config.json").read_text())["base_model_name_or_path"] == str(qwen)


def test_zero3_builds_the_backbone_partitioned(qwen, tmp_path):
    launch(ROOT / "tests/workers/zero3_construction.py", str(qwen), str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["all_partitioned"] and report["held"] <= 0.55 * report["total"], report
        assert report["rebuild_whole"]
    assert sum(r["held"] for r in reports) >= reports[0]["total"]


def test_soft_masked_full_fine_tuning_with_instructions(qwen, tmp_path):
    demo = ROOT / "data/demo/finetune"
    config = tmp_path / "tasks.json"
    config.write_text(json.dumps({"tasks": {
        "retrieval": {"type": "retrieval", "files": [str(demo / "retrieval.jsonl")], "batch_size": 4,
                      "num_negatives": 2, "instruction": "检索同义句"},
        "sts": {"type": "sts", "files": [str(demo / "sts.jsonl")], "batch_size": 4,
                "instruction": "语义相似"}}}))
    out = tmp_path / "ft"
    proc = launch(FINETUNE, "--model", str(qwen), "--data-config", str(config), "--output-dir", str(out),
                  "--max-steps", "4", "--save-steps", "100", "--lr", "1e-3", "--max-length", "48",
                  "--attention", "soft", "--deepspeed-config", "ds_configs/zero3.json")
    assert "no expansion layer" not in proc.stdout and "expansion layer 32 -> 64 added" in proc.stdout
    assert "export check: reloaded model matches the engine" in proc.stdout
    for folder in ("final_unmerged", "final"):  # as trained, and merged with the base (the default)
        release = SentenceTransformer(str(out / folder), device="cpu")
        assert release[0].auto_model.config.is_causal is False
        assert release.prompts["STS"] == "Instruct: 语义相似\nQuery: "
        assert release.prompts["Retrieval-query"] == "Instruct: 检索同义句\nQuery: "
        assert release.tokenizer.padding_side == "left"


def test_a_prompt_that_leaves_no_room_for_the_text_is_refused(qwen, tmp_path):
    proc = launch(PRETRAIN, "--model", str(qwen), "--train-data", QUESTIONS, "--output-dir", str(tmp_path),
                  "--max-length", "32", "--instruction", "Given a web search query, retrieve relevant passages",
                  nproc=1, check=False)
    assert proc.returncode != 0 and "more than half of --max-length 32" in proc.stdout + proc.stderr
