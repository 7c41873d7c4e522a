"""A corpus of any size on disk: its unique texts, fetched back by position, and their embeddings in fp16
shards with a manifest, encoded on several devices or ranks and resumed shard by shard.

    store = TextStore.build(work / "texts", sources)        # streamed; unique texts in first-seen order
    text = store[i]                                          # read back from disk (mmap), never all in memory
    embeddings = EmbeddingStore(work / "emb", store, shard_rows=100_000, settings={...})
    embeddings.encode(encode_fn, rank=0, world=1)            # each rank its shards; a kill loses one shard
    for start, block in embeddings.blocks():                 # fp32 blocks, one shard at a time
        ...

Texts: one pass writes every text (UTF-8) to texts.bin with its offset and a 64-bit hash; the unique
ones are the first occurrence of each hash (np.unique), so memory is 16 bytes a text, whatever their
length (a hash collision, about 1 in 10^6 for 10^7 texts, would drop one text). Embeddings: shard k
holds the rows [k * shard_rows, (k + 1) * shard_rows), written to a temporary file and renamed, so a
shard on disk is whole; a run started again encodes only the shards that are missing. Ranks of a
launch (RANK / WORLD_SIZE) each encode shards k = rank (mod world) on a shared disk; rank 0 waits
for the others' shards.
"""
from __future__ import annotations

import hashlib
import json
from array import array
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

CRASH_ENV = "CONAN_MINE_CRASH_AFTER_SHARD"  # test hook: die like SIGKILL after writing this many shards
WAIT_REPORT_S = 60.0


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


class TextStore:
    """Unique texts on disk: texts.bin (UTF-8, all texts as read) and the offsets and lengths of the unique ones."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "store.json").read_text())
        self.sources = meta["sources"]
        self.offsets = np.load(self.folder / "offsets.npy", mmap_mode="r")
        self.lengths = np.load(self.folder / "lengths.npy", mmap_mode="r")
        self._data = np.memmap(self.folder / "texts.bin", dtype=np.uint8, mode="r") if meta["bytes"] else b""

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> str:
        start = int(self.offsets[i])
        return bytes(self._data[start:start + int(self.lengths[i])]).decode("utf-8")

    def texts(self, start: int, stop: int) -> list[str]:
        return [self[i] for i in range(start, min(stop, len(self)))]

    @staticmethod
    def is_built(folder: Path, sources: list[str]) -> bool:
        meta = Path(folder) / "store.json"
        return meta.is_file() and json.loads(meta.read_text())["sources"] == sources

    @classmethod
    def build(cls, folder: Path, sources: list[str], texts: Iterable[str]) -> "TextStore":
        """Write the store from `texts` (streamed), unless one of the same `sources` is there already.
        store.json is written last: a store killed while being built is built again."""
        folder = Path(folder)
        if cls.is_built(folder, sources):
            return cls(folder)
        folder.mkdir(parents=True, exist_ok=True)
        offsets, lengths, hashes, at = array("q"), array("q"), array("q"), 0  # 8 bytes a number, not a Python int
        with open(folder / "texts.bin", "wb") as f:
            for text in texts:
                data = text.encode("utf-8")
                f.write(data)
                offsets.append(at)
                lengths.append(len(data))
                hashes.append(text_hash(text))
                at += len(data)
        _, first = np.unique(np.frombuffer(hashes, dtype=np.int64), return_index=True)
        keep = np.sort(first)  # first-seen order
        np.save(folder / "offsets.npy", np.frombuffer(offsets, dtype=np.int64)[keep])
        np.save(folder / "lengths.npy", np.frombuffer(lengths, dtype=np.int64)[keep])
        (folder / "store.json").write_text(json.dumps({"sources": sources, "texts": len(offsets),
                                                       "unique": int(len(keep)), "bytes": at}))
        return cls(folder)


def wait_for(what: str, ready: Callable[[], bool], timeout_s: float, every_s: float = WAIT_REPORT_S) -> None:
    """Poll `ready()` until it holds, saying what is awaited every `every_s`; stop after `timeout_s`."""
    start = said = time.monotonic()
    while not ready():
        now = time.monotonic()
        if now - start > timeout_s:
            raise SystemExit(f"waited {now - start:.0f} s for {what}; is every rank running, on a shared disk?")
        if now - said >= every_s:
            print(f"waiting {now - start:.0f} s for {what}", flush=True)
            said = now
        time.sleep(0.5)


class EmbeddingStore:
    """Embeddings of a TextStore (fp16 by default: half the disk, scores within about 1e-3 of fp32) in shards
    of `shard_rows`, with manifest.json naming what made them."""

    def __init__(self, folder: Path, store: TextStore, shard_rows: int, settings: dict, dtype: str = "float16"):
        self.folder, self.store, self.shard_rows, self.dtype = Path(folder), store, shard_rows, np.dtype(dtype)
        self.shards = max(1, -(-len(store) // shard_rows))
        self.manifest = {**settings, "rows": len(store), "shard_rows": shard_rows, "shards": self.shards,
                         "dtype": self.dtype.name}
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "manifest.json"
        if path.is_file():
            if json.loads(path.read_text()) != self.manifest:
                raise SystemExit(f"{path}: embeddings of another model, prompt or corpus; delete {self.folder} "
                                 "to encode again")
        else:
            tmp = path.with_name(f"manifest.json.{os.getpid()}.tmp")  # ranks may write it at once
            tmp.write_text(json.dumps(self.manifest))
            tmp.replace(path)

    def shard_path(self, k: int) -> Path:
        return self.folder / f"shard_{k:05d}.npy"

    def missing(self) -> list[int]:
        return [k for k in range(self.shards) if not self.shard_path(k).is_file()]

    def encode(self, encode: Callable[[list[str]], np.ndarray], rank: int = 0, world: int = 1,
               progress: Callable[[str], None] = print) -> int:
        """Encode this rank's missing shards (k = rank mod world); returns how many it encoded."""
        done = 0
        mine = [k for k in self.missing() if k % world == rank]
        for k in mine:
            texts = self.store.texts(k * self.shard_rows, (k + 1) * self.shard_rows)
            embeddings = np.asarray(encode(texts), dtype=self.dtype)
            tmp = self.folder / f"shard_{k:05d}.{os.getpid()}.tmp.npy"
            np.save(tmp, embeddings)
            tmp.replace(self.shard_path(k))
            done += 1
            progress(f"corpus shard {k + 1}/{self.shards} encoded ({len(texts)} texts)")
            if os.environ.get(CRASH_ENV) == str(done):
                os._exit(137)
        return done

    def wait_complete(self, timeout_s: float = 24 * 3600) -> None:
        wait_for(f"the corpus shards of the other ranks in {self.folder}", lambda: not self.missing(), timeout_s)

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, fp32 embeddings) of each shard in order, one in memory at a time."""
        for k in range(self.shards):
            yield k * self.shard_rows, np.load(self.shard_path(k)).astype(np.float32)

    def sample(self, rows: int) -> np.ndarray:
        """About `rows` embeddings spread evenly over the corpus (an index's training set), fp32."""
        step = max(1, len(self.store) // max(1, rows))
        picked = [block[(-start) % step::step] for start, block in self.blocks()]
        return np.concatenate(picked)[:rows] if picked else np.zeros((0, 0), np.float32)
