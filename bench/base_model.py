"""The base models the bench scripts train from: --model, the offline multilingual-e5-small, with
--quick a tiny model built in code (no hub), and for the GPU benchmark a BERT-large-shaped model
with random weights."""
from __future__ import annotations

from pathlib import Path

# bge-large-zh's shape (BERT-large with a Chinese vocabulary), the size of Conan-embedding's encoder
LARGE = dict(hidden=1024, layers=24, heads=16, intermediate=4096, vocab_size=21128, max_length=512, pooling="cls")
TINY = dict(hidden=32, layers=2, heads=2, intermediate=64, max_length=64, pooling="cls")


def base_model(model: str | None, quick: bool, out: Path) -> str:
    """A local path or hub id to load; the tiny model is built once into `out`."""
    from train.models.model import DEFAULT_MODEL, resolve_model
    if model:
        return resolve_model(model)[0]
    if quick:
        from bench.tiny_model import make_tiny_model
        path = out / "tiny-base"
        if not (path / "modules.json").is_file():
            make_tiny_model(path, prompts={"query": "query: ", "passage": "passage: "})
        return str(path)
    return resolve_model(DEFAULT_MODEL)[0]


def random_model(out: Path, shape: dict) -> str:
    """A sentence-transformers folder of the given BERT shape with random weights (speed only: the
    weights do not change the FLOPs), with a character-level WordPiece vocabulary of the demo data."""
    from bench.tiny_model import make_tiny_model
    path = out / f"random-{shape['layers']}x{shape['hidden']}"
    if not (path / "modules.json").is_file():
        make_tiny_model(path, **shape)
    return str(path)


def matmul_parameters(path: str) -> int:
    """Parameters of the transformer layers: those each token multiplies through. The embedding
    tables are left out (a lookup costs no FLOPs; counting them would inflate MFU), and so is BERT's
    pooler (it runs once per text, not per token)."""
    import torch
    from transformers import AutoConfig, AutoModel
    with torch.device("meta"):  # shapes only, no memory
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for name, p in encoder.named_parameters()
               if "embeddings" not in name and "pooler" not in name)
