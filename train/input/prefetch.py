"""Input overlapped with the step: batches read, parsed, grouped and (optionally) tokenized ahead in
a background thread.

A thread, not DataLoader worker processes: the stream is one ordered, resumable sequence per rank
(train/input/data.py), JSON parsing holds the GIL only between the step's torch calls, and the fast
tokenizers release the GIL while they encode, so one thread overlaps nearly all of the input work
without copying batches between processes.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

from train import fault_injection


class PrefetchError(RuntimeError):
    """The prefetch thread stopped on a BaseException (SystemExit, KeyboardInterrupt, GeneratorExit)."""


class Prefetch:
    """The batches of `batches(position)`, each passed through `prepare` (e.g. tokenization), made
    `depth` batches ahead in a thread.

    The thread works on its own copy of the position; each batch comes with the position just after
    it, and `position` is set to that when the batch is taken, so a checkpoint still saves exactly
    what was trained on. An error (a DataError for a bad line) is raised here, in order, with
    `position` at the start of the block that holds the bad line. `close()` stops and joins the
    thread, which then holds no file open.
    """

    _END = object()

    def __init__(self, batches: Callable[[dict], Iterator[list]], position: dict, depth: int = 4,
                 prepare: Callable[[list], Any] | None = None):
        self.position, self.queue = position, queue.Queue(max(1, depth))
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(batches, dict(position), prepare), daemon=True)
        self.thread.start()

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, batches: Callable, ahead: dict, prepare: Callable | None) -> None:
        stream = batches(ahead)
        try:
            for count, batch in enumerate(stream, 1):
                fault_injection.in_prefetch(count)
                if not self._put((prepare(batch) if prepare else batch, dict(ahead), None)):
                    return
            self._put((self._END, dict(ahead), None))
        except BaseException as e:  # anything (a tokenizer error, MemoryError, SystemExit): handed to the
            self._put((None, dict(ahead), e))  # consumer, raised at the batch it belongs to, never left waiting
        finally:
            getattr(stream, "close", lambda: None)()  # a generator closes its open shards

    def __iter__(self):
        return self

    def __next__(self):
        batch, position, error = self.queue.get()
        self.position.clear()
        self.position.update(position)
        if isinstance(error, Exception):
            raise error
        if error is not None:  # a BaseException in the thread becomes an error of this step's input
            raise PrefetchError(f"{type(error).__name__} in the prefetch thread: {error}") from error
        if batch is self._END:
            raise StopIteration
        return batch

    def close(self) -> None:
        self._stop.set()
        self.thread.join()


def prefetched(batches: Callable[[dict], Iterator[list]], position: dict, depth: int,
               prepare: Callable[[list], Any] | None = None) -> Iterator:
    """`batches(position)` through `prepare`, made `depth` batches ahead in a thread (0: in the step,
    as each is asked for). Call `close_prefetch` on it when done."""
    if depth > 0:
        return Prefetch(batches, position, depth, prepare)
    stream = batches(position)
    return (prepare(b) for b in stream) if prepare else stream


def close_prefetch(batches: Iterator) -> None:
    """Stop a prefetching thread (or close a plain generator) before the run goes on without it."""
    getattr(batches, "close", lambda: None)()
