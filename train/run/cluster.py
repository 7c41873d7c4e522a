"""What a run over several GPUs and machines needs that one CPU machine never showed: each process
bound to its own device, a host-side (gloo) group for the small Python-object messages, the check
that gloo can reach the other machines, and start-up verdicts that every rank reaches together.

    bind_device()                        # before the process group: cuda:LOCAL_RANK (DeepSpeed's accelerator API)
    deepspeed.init_distributed(...)
    refuse_unreachable_gloo()            # multi-node with the hostname on 127.0.1.1: say what to set
    open_host_group()                    # gloo beside NCCL (or the default group when it is gloo)
    value = agree(lambda: check(...))    # every rank runs the check; one failing stops them all, same message

Why a host group: an object collective (broadcast_object_list, all_gather_object) on the NCCL group
puts its tensors on the *current* CUDA device; a process never bound to its device sends from
cuda:0 and NCCL refuses ("Tensor found on device cuda:0 but backend constrained to cuda:N").
Control messages belong on the host anyway: no device sync, no kernel, no GPU memory.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

_HOST_GROUP: list = [None]  # the gloo group made by open_host_group (None: the default group is gloo)
_PATIENT_GROUP: list = [None]  # gloo, a long timeout: where the other ranks wait while rank 0 writes the release
RELEASE_WAIT = timedelta(hours=24)  # a release of a large LLM on a slow disk can take longer than --dist-timeout


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def accelerator_is_gpu() -> bool:
    """Whether this run trains on a CUDA GPU, as DeepSpeed's accelerator decides (DS_ACCELERATOR, else
    what it detects); not whether torch sees a GPU: a run pinned to the CPU (DS_ACCELERATOR=cpu, as the
    tests are) on a GPU machine sees one, and every choice that follows the device (bf16, the
    optimizer, threads, memory figures) must follow the accelerator the engine uses."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name() == "cuda"


def run_device() -> torch.device:
    """The device this rank trains on: the one DeepSpeed's engine and ZeRO-3's zero.Init place it on
    (cuda:LOCAL_RANK on a GPU node, cpu on the CPU accelerator)."""
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(accelerator.device_name(local_rank()))


def bind_device() -> str:
    """Make this process's accelerator device the current one (cuda:LOCAL_RANK on a GPU node), before
    any collective: NCCL and every `torch.cuda` call without an index use the current device. The
    CPU accelerator has no device to set. Returns the device name."""
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return "cpu"
    accelerator.set_device(local_rank())
    return accelerator.device_name(local_rank())


def open_host_group(timeout: timedelta | None = None) -> None:
    """A gloo group over all ranks for host-side messages, waiting `timeout` for a lost rank (torch's
    default for a new group is 30 minutes, whatever --dist-timeout says), and a second one whose only
    use is `wait_for_rank_zero` (collectives: every rank calls it once)."""
    _HOST_GROUP[0] = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
    _PATIENT_GROUP[0] = dist.new_group(backend="gloo", timeout=RELEASE_WAIT)


def host_group():
    """The group for object collectives, flags and barriers that carry no model data."""
    return _HOST_GROUP[0]


def host_barrier() -> None:
    dist.barrier(group=host_group())


def wait_for_rank_zero() -> None:
    """Every rank waits here until rank 0 arrives, for up to RELEASE_WAIT (a barrier on the patient group):
    for the end of work rank 0 does alone that may outlast --dist-timeout (writing and checking the
    release). Any other collective would time out there and the launcher would kill rank 0 mid-write.
    A rank 0 that dies meanwhile is noticed by the launcher, which stops the others."""
    dist.barrier(group=_PATIENT_GROUP[0] if _PATIENT_GROUP[0] is not None else host_group())


def is_multi_node(env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", 1))
    local = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)
    return world > local


def gloo_interface_problem(env: dict | None = None, resolve: Callable[[str], str] = socket.gethostbyname,
                           hostname: str | None = None) -> str | None:
    """Why gloo would fail to reach the other machines, or None.

    gloo picks its network interface from the address this machine's hostname resolves to. Many
    images map the hostname to 127.0.1.1 in /etc/hosts: then gloo listens on loopback, and on
    several machines the run fails at start-up (or hangs). GLOO_SOCKET_IFNAME names the interface
    instead. One machine, or a master on loopback (every rank on this machine), is fine.
    """
    env = os.environ if env is None else env
    if env.get("GLOO_SOCKET_IFNAME") or not is_multi_node(env):
        return None
    master = env.get("MASTER_ADDR", "")
    hostname = hostname or socket.gethostname()
    try:
        address = resolve(hostname)
        master_is_loopback = master in ("localhost", "") or resolve(master).startswith("127.")
    except OSError:
        return None  # cannot tell; gloo's own error will name the host
    if not address.startswith("127.") or master_is_loopback:
        return None
    names = ", ".join(sorted(n for _, n in socket.if_nameindex() if n != "lo")) or "see `ip -br addr`"
    return (f"gloo, which carries this run's host-side messages, would listen on {address} (loopback): "
            f"the hostname {hostname!r} resolves to it, and the run spans several machines. Set "
            f"GLOO_SOCKET_IFNAME to the interface that reaches the other machines (here: {names}) "
            f"on every node, e.g. in the launcher's environment file (.deepspeed_env)")


def refuse_unreachable_gloo() -> None:
    """Every rank stops with the same message when some rank's gloo would sit on loopback. Runs on
    the default group before any gloo group exists (on NCCL, with the device already bound)."""
    verdicts: list = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, gloo_interface_problem())
    problems = [f"rank {r}: {v}" for r, v in enumerate(verdicts) if v]
    if problems:
        raise SystemExit("cluster error: " + problems[0] + (f" (and {len(problems) - 1} more ranks)" if problems[1:] else ""))


def agree(check: Callable[[], Any], what: str = "start-up check") -> Any:
    """Run `check()` on every rank; if it fails on any (SystemExit or another exception), every rank
    stops with the same message naming each failing rank and its host. Returns this rank's result.

    For what each rank must verify for itself (a model folder on its disk, its part of a checkpoint):
    one rank stopping alone would leave the others waiting in the next collective until the timeout.
    """
    error = None
    try:
        result = check()
    except SystemExit as e:
        error, result = str(e.code if e.code is not None else e), None
    except Exception as e:  # the message travels; the traceback would be from deep inside a library
        error, result = f"{type(e).__name__}: {e}", None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if error:
            raise SystemExit(error)
        return result
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, (error, socket.gethostname()), group=host_group())
    failed = [(r, e, host) for r, (e, host) in enumerate(errors) if e]
    if failed:
        lines = [f"  rank {r} ({host}): {e}" for r, e, host in failed]
        raise SystemExit(f"{what} failed on {len(failed)} of {len(errors)} ranks; every rank stops:\n" + "\n".join(lines))
    return result


def from_rank_zero(compute: Callable[[], Any], error: Callable[[str], BaseException] = SystemExit,
                   catch: tuple[type[Exception], ...] = (Exception,)) -> Any:
    """`compute()` on rank 0, its value on every rank; if it fails with one of `catch`, `error(message)`
    is raised on every rank (SystemExit by default; the data stream passes DataError), so none waits in
    the broadcast."""
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", compute())
        except SystemExit as e:
            box[0] = ("error", str(e.code if e.code is not None else e))
        except catch as e:
            box[0] = ("error", str(e) if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0, group=host_group())
    status, value = box[0]
    if status == "error":
        raise error(value)
    return value
