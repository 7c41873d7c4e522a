"""--trace-examples: which examples each step trained on, one file per rank (OUTPUT_DIR/trace/rankR.tsv,
"step<TAB>file:line"); the resume and reliability tests compare runs by it."""
from __future__ import annotations

from pathlib import Path


class ExampleTrace:
    def __init__(self, out_dir: Path, rank: int, step: int):
        """Open this rank's trace; on resume it is cut back to the checkpoint's step."""
        path = out_dir / "trace" / f"rank{rank}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if int(line.split("\t")[0]) <= step] if path.is_file() else []
        path.write_text("".join(kept))
        self.file = open(path, "a", encoding="utf-8")

    def write(self, step: int, sources: list[str]) -> None:
        self.file.write("".join(f"{step}\t{s}\n" for s in sources))
        self.file.flush()

    def close(self) -> None:
        self.file.close()
