"""Writes docs/flags.md from the two training scripts' own argument parsers.

    python docs/make_flags.py          # after changing a flag (tests/test_layout.py checks it is current)
"""
from __future__ import annotations

from pathlib import Path

from train import finetune, pretrain
from train.args import ROOT, flags_markdown

DOC = ROOT / "docs/flags.md"


def flags_doc() -> str:
    head = ("# Flags\n\nEvery flag of the two training scripts, grouped as `--help` prints them; made by "
            "`python docs/make_flags.py` from the parsers themselves.\n\n")
    return head + flags_markdown(pretrain.build_parser(), "train/pretrain.py") + "\n" + \
        flags_markdown(finetune.build_parser(), "train/finetune.py")


if __name__ == "__main__":
    Path(DOC).write_text(flags_doc())
    print(f"wrote {DOC}")
