"""Where the run's tensors live, checked once when the engine is built, on every rank.

A weight or buffer off the device the engine computes on fails only at the first forward, deep inside
torch ("Expected all tensors to be on the same device, cuda:0 and cpu"), or worse, silently runs on
the CPU. The ways it happens are GPU-only and invisible on a CPU machine: under ZeRO-3 DeepSpeed does
not move a model built inside zero.Init (it owns placement there), and a gathered weight is written
to its placeholder's device, so a model that something moved to the CPU after construction
(sentence-transformers' constructor calls `self.to(device)`) keeps its buffers and placeholders there.

    refuse_misplaced(engine)   # after deepspeed.initialize: stops every rank, naming the tensors

What is checked, against engine.device:
  - every parameter's storage: ZeRO 0-2 the parameter itself; ZeRO-3 its placeholder (`param.data`,
    where the gathered weight lands) and its partition (`ds_tensor`, on the CPU under offload_param);
  - every buffer (BERT's position_ids and token_type_ids, rotary inv_freq, ...);
  - any other module the loss uses, when given.
"""
from __future__ import annotations

import torch

from train.run.cluster import agree

SHOWN = 8  # tensors named in the message; the count says how many more


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:N agree where either has no index (the current device); cpu is cpu."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def partition_device(engine) -> torch.device | None:
    """Where ZeRO-3 keeps this rank's partitions: the CPU under offload_param to cpu, nowhere to check
    under NVMe offload (None), else the engine's device."""
    offload = engine.zero_offload_param()  # DeepSpeed's parsed config: the deprecated cpu_offload_param too
    device = getattr(getattr(offload, "device", "none"), "value", getattr(offload, "device", "none"))
    if device == "nvme":
        return None
    return torch.device("cpu") if device == "cpu" else torch.device(engine.device)


def misplaced_tensors(module: torch.nn.Module, device: torch.device, partitions: torch.device | None = None,
                      prefix: str = "") -> list[str]:
    """'name (what) on DEVICE' for each weight or buffer of `module` that is not on `device`; under ZeRO-3
    the partitions are expected on `partitions` (None: not checked)."""
    wrong = []
    for name, param in module.named_parameters():
        if hasattr(param, "ds_tensor"):  # a ZeRO-3 parameter
            if not same_device(param.data.device, device):
                wrong.append(f"{prefix}{name} (ZeRO-3 placeholder, where its gathered weight lands) on {param.data.device}")
            if partitions is not None and param.ds_tensor is not None and \
                    not same_device(param.ds_tensor.device, partitions):
                wrong.append(f"{prefix}{name} (ZeRO-3 partition) on {param.ds_tensor.device}, expected {partitions}")
        elif not same_device(param.device, device):
            wrong.append(f"{prefix}{name} on {param.device}")
    for name, buffer in module.named_buffers():
        if not same_device(buffer.device, device):
            wrong.append(f"{prefix}{name} (buffer) on {buffer.device}")
    return wrong


def refuse_misplaced(engine, others: dict[str, torch.nn.Module] | None = None) -> None:
    """Every rank stops at start-up, naming the tensors, if a weight or buffer of the engine's module (or
    of `others`, modules the loss uses outside it) is not on engine.device."""
    def check() -> None:
        device = torch.device(engine.device)
        wrong = misplaced_tensors(engine.module, device, partition_device(engine))
        for name, module in (others or {}).items():
            wrong += misplaced_tensors(module, device, partition_device(engine), prefix=f"{name}.")
        if wrong:
            more = f" (and {len(wrong) - SHOWN} more)" if len(wrong) > SHOWN else ""
            raise SystemExit(f"placement error: {len(wrong)} tensors are not on {device}, where the engine computes: "
                             f"{'; '.join(wrong[:SHOWN])}{more}. The first forward would fail (or run on the CPU); "
                             "a model moved after it was built (under ZeRO-3, after zero.Init) is the usual cause")
    agree(check, "placement check")
