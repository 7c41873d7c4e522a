"""One rank, ZeRO-3: the devices sentence-transformers is asked to move the backbone to while
train/run/runner.py's open_backbone builds it inside zero.Init and the expansion layer is added
(tests/test_gpu_seams.py).

    torchrun --nproc_per_node 1 tests/workers/zero3_placement.py MODEL_DIR OUT_JSON

Mocked at two seams, as no GPU is here: cluster.run_device (the device DeepSpeed's accelerator names
this rank's, here "cuda:3", rank 0 of a GPU node whose fourth GPU it drives) and SentenceTransformer.to,
which records the device it is asked for and moves only to the CPU (there is no cuda:3 to move to).
On a GPU node every such move of a model built under zero.Init must be to cuda:N: DeepSpeed never moves
it back (engine.py, _configure_distributed_model) and a gathered weight lands on its placeholder's device.
"""
import json
import sys

import deepspeed
import torch
from sentence_transformers import SentenceTransformer

from train.args import run_config
from train.models.model import with_expansion
from train.pretrain import parse_args
from train.run import cluster, runner

GPU = torch.device("cuda:3")


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    cluster.open_host_group()
    runner.run_device = lambda: GPU
    moves, move = [], SentenceTransformer.to

    def recording_to(self, *args, **kwargs):
        target = next((a for a in (*args, kwargs.get("device")) if isinstance(a, (str, torch.device))), None)
        if target is None:  # a dtype-only move
            return move(self, *args, **kwargs)
        moves.append(str(target))
        return self if torch.device(target).type == "cuda" else move(self, *args, **kwargs)
    SentenceTransformer.to = recording_to
    args = parse_args(["--model", model_dir, "--deepspeed-config", "ds_configs/zero3.json", "--precision", "fp32"])
    model, *_ = runner.open_backbone(model_dir, run_config(args), 1, 1)
    loaded = list(moves)
    model, added, _ = with_expansion(model, "64")
    result = {"zero3_parameters": sum(hasattr(p, "ds_tensor") for p in model.parameters()),
              "parameters": sum(1 for _ in model.parameters()), "expansion": added,
              "moves_at_load": loaded, "moves_at_expansion": moves[len(loaded):]}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
