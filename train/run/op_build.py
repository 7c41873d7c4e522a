"""DeepSpeed's JIT-compiled ops (cpu_adam: the optimizer on a CPU machine and under ZeRO-Offload) wait
for torch's build lock with a bound and a message, never silently forever.

torch builds an extension under a lock file, `<build dir>/lock` (torch/utils/cpp_extension.py,
_jit_compile), and takes it on the first load in every process, even when the op is built already.
A build killed by SIGKILL or SIGTERM (a launcher stopping its ranks, Ctrl-C twice) leaves the file;
torch's FileBaton.wait then polls for it forever, printing nothing: every later run hangs at start-up.

    with bounded_extension_wait():          # around DeepSpeedCPUAdam(...)
        optimizer = DeepSpeedCPUAdam(...)

While another process on this machine holds the lock (a rank building right now: it has the lock
open, or its ninja and compilers run in the build directory), the wait is as long as the build. A
lock that no process holds is waited for CONAN_EXTENSION_LOCK_TIMEOUT seconds (default 600: a build
on another node sharing the directory cannot be seen), then the run stops naming the file to delete.
It is never deleted here: torch imports the op without building it once the wait returns.
"""
from __future__ import annotations

import contextlib
import os
import time

TIMEOUT_ENV = "CONAN_EXTENSION_LOCK_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
REPORT_EVERY_S = 30.0


def extension_lock_path(name: str = "cpu_adam") -> str:
    """The lock file torch's cpp_extension.load(name=...) takes: DeepSpeed's op builder passes the op's
    name and no build_directory (deepspeed/ops/op_builder/builder.py, jit_load), so torch's own build
    directory: $TORCH_EXTENSIONS_DIR/NAME, else ~/.cache/torch_extensions/pyXY_{cpu,cuXYZ}/NAME."""
    from torch.utils.cpp_extension import _get_build_directory  # what load() calls (private in torch 2.13)
    return os.path.join(_get_build_directory(name, verbose=False), "lock")


def lock_holders(path: str) -> list[int] | None:
    """PIDs on this machine building in the lock's directory: those with the lock open (torch keeps it
    open until it releases it) and those working in the build directory (ninja and the compilers, which
    outlive a killed parent). None where /proc cannot tell."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    lock, build_dir, pids = os.path.realpath(path), os.path.realpath(os.path.dirname(path)), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd") == build_dir or \
                    any(os.readlink(f"/proc/{pid}/fd/{fd}") == lock for fd in os.listdir(f"/proc/{pid}/fd")):
                pids.append(int(pid))
        except OSError:  # gone meanwhile, or another user's
            pass
    return pids


def wait_for_lock(path: str, timeout_s: float, every_s: float = REPORT_EVERY_S) -> None:
    """Return once `path` is gone; say what is happening every `every_s`; stop once it has stood
    `timeout_s` with no process on this machine holding it."""
    start = time.monotonic()
    said, unheld_since = start - every_s, None
    while os.path.exists(path):
        now, holders = time.monotonic(), lock_holders(path)
        unheld_since = None if holders else (unheld_since or now)
        if now - said >= every_s:
            who = (f"held by pid {', '.join(map(str, holders[:4]))}: a build in progress" if holders else
                   "no process on this machine holds it: a build killed before it finished, or one on another "
                   "node sharing this directory" if holders is not None else "its holder cannot be seen here")
            print(f"waiting {now - start:.0f} s for torch's extension build lock {path} ({who})", flush=True)
            said = now
        if unheld_since is not None and now - unheld_since >= timeout_s:
            raise SystemExit(
                f"torch's extension build lock {path} has stood {now - start:.0f} s and no process on this machine "
                f"holds it: a build of the op was killed before it finished, and torch would wait for it forever. "
                f"If no build is running (here, or on another node sharing {os.path.dirname(path)}), delete it "
                f"(rm {path}) and start again; {TIMEOUT_ENV} sets this wait in seconds")
        time.sleep(min(1.0, every_s))


@contextlib.contextmanager
def bounded_extension_wait(timeout_s: float | None = None, every_s: float = REPORT_EVERY_S):
    """Within: torch's FileBaton.wait (unbounded and silent) is `wait_for_lock`, which covers a lock
    met at the start and one another rank takes meanwhile."""
    from torch.utils.file_baton import FileBaton
    timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)) if timeout_s is None else timeout_s
    wait = FileBaton.wait
    FileBaton.wait = lambda baton: wait_for_lock(baton.lock_file_path, timeout_s, every_s)
    try:
        yield
    finally:
        FileBaton.wait = wait
