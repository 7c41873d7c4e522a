"""2-rank worker: under ZeRO-3 the backbone is built partitioned (deepspeed.zero.Init), never whole.

    torchrun --nproc_per_node 2 tests/workers/zero3_construction.py MODEL_DIR OUT_DIR

Opens the model as train/pretrain.py does (train/run/runner.py's open_backbone, ZeRO-3 config) and
writes, per rank, before DeepSpeed's engine exists: how many weights the rank holds in memory, how
many the model has, and whether every backbone weight is a ZeRO-3 parameter; then after
open_backbone, whether a later load (the export's rebuild) builds a whole model again.
"""
import json
import sys
from pathlib import Path

import torch.distributed as dist

from train.args import run_config
from train.models.decoder import backbone
from train.models.model import open_sentence_transformer
from train.pretrain import parse_args
from train.run.runner import open_backbone, start_run

model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
args = parse_args(["--model", model_dir, "--deepspeed-config", "ds_configs/zero3.json", "--output-dir", str(out_dir),
                   "--precision", "fp32"])
rank, world = start_run(args.seed)
model, *_ = open_backbone(args.model, run_config(args), args.batch_size, world)
params = list(backbone(model).parameters())
held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
rebuilt = open_sentence_transformer(model_dir, local_only=True)  # after open_backbone: no zero.Init any more
report = {"rank": rank, "held": held, "total": total, "all_partitioned": all(hasattr(p, "ds_id") for p in params),
          "rebuild_whole": all(not hasattr(p, "ds_id") and p.numel() > 0 for p in rebuilt.parameters())}
(out_dir / f"rank{rank}.json").write_text(json.dumps(report))
dist.barrier()
dist.destroy_process_group()
