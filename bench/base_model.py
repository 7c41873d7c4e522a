"""The base model the bench scripts train from: --model, the offline multilingual-e5-small, or with
--quick a tiny model built in code (no hub)."""
from __future__ import annotations

from pathlib import Path


def base_model(model: str | None, quick: bool, out: Path) -> str:
    """A local path or hub id to load; the tiny model is built once into `out`."""
    from train.model import DEFAULT_MODEL, resolve_model
    if model:
        return resolve_model(model)[0]
    if quick:
        from tests.tiny_model import make_tiny_model
        path = out / "tiny-base"
        if not (path / "modules.json").is_file():
            make_tiny_model(path, prompts={"query": "query: ", "passage": "passage: "})
        return str(path)
    return resolve_model(DEFAULT_MODEL)[0]
