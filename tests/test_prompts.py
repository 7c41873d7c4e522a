"""Prompts reach the model as sentence-transformers passes them (`preprocess(texts, prompt=...)`), so a
Pooling that leaves prompt tokens out pools the same tokens in training as at inference."""
import torch
from sentence_transformers import SentenceTransformer

from tests.conftest import ROOT, deepspeed_launch
from bench.tiny_model import make_tiny_model
from train.step.encoding import MixedPromptPooling, allow_mixed_prompts, encode_groups

PROMPTS = {"query": "query: ", "passage": "passage: 这是一段较长的前缀 "}
QUERIES = ["如何训练中文向量模型？", "今天天气怎么样"]
PASSAGES = ["先在大规模弱监督数据上预训练，再做多任务微调。", "今天是晴天。"]


def test_one_forward_of_mixed_prompts_equals_encode_with_each_prompt(tmp_path):
    for include_prompt in (True, False):
        path = make_tiny_model(tmp_path / str(include_prompt), prompts=PROMPTS, include_prompt=include_prompt)
        model = SentenceTransformer(str(path), device="cpu")
        want_q = model.encode(QUERIES, prompt=PROMPTS["query"], convert_to_tensor=True)
        want_p = model.encode(PASSAGES, prompt=PROMPTS["passage"], convert_to_tensor=True)
        allow_mixed_prompts(model)
        assert isinstance(model[1], MixedPromptPooling) != include_prompt
        with torch.no_grad():
            (q, p, none), tokens = encode_groups(model, model, [(QUERIES, PROMPTS["query"]),
                                                                (PASSAGES, PROMPTS["passage"]), ([], "")], "cpu")
        assert (q - want_q).abs().max() < 1e-6 and (p - want_p).abs().max() < 1e-6
        assert none.shape == (0, 32) and tokens > 0
        if not include_prompt:  # gluing the prompt onto the text pools the prompt's tokens too: not what is released
            glued = model(model.preprocess([PROMPTS["query"] + t for t in QUERIES]))["sentence_embedding"]
            assert (glued - want_q).abs().max() > 1e-2


def test_pretraining_a_prompt_excluding_model_releases_what_it_trained(tmp_path):
    """The export check encodes the release with plain `encode(prompt=...)`: it matches the engine only if
    training pooled without the prompt tokens as well."""
    path = make_tiny_model(tmp_path / "m", prompts=PROMPTS, include_prompt=False)
    out = tmp_path / "run"
    proc = deepspeed_launch(ROOT / "train/pretrain.py", "--model", str(path), "--output-dir", str(out),
                            "--train-data", str(ROOT / "data/demo/pretrain/question_pairs.jsonl"),
                            "--batch-size", "4", "--max-steps", "2", "--lr", "1e-3")
    assert "export check: reloaded model matches the engine" in proc.stdout
    release = SentenceTransformer(str(out / "final"), device="cpu")
    assert type(release[1]).__name__ == "Pooling" and release[1].include_prompt is False
    check = torch.load(out / "export_check.pt")
    assert check["prompt"] == PROMPTS["query"] and check["max_abs_diff"] < 1e-5
