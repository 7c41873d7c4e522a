"""DeepSpeed config resolution: the shipped configs, 'auto' values, and configs that ask for the impossible."""
import json

import pytest
import torch

from tests.conftest import ROOT
from train.run.ds_config import load_ds_config


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero3_offload"])
def test_shipped_configs_resolve(name):
    cfg = load_ds_config(ROOT / f"ds_configs/{name}.json", micro_batch=8, world=4, grad_clip=1.0, precision="fp32")
    assert cfg["train_batch_size"] == 32 and cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 1
    assert cfg["gradient_clipping"] == 1.0 and cfg["bf16"] == {"enabled": False}
    assert "auto" not in json.dumps(cfg)


def test_precision_flag_sets_bf16():
    cfg = load_ds_config(ROOT / "ds_configs/zero2.json", 8, 1, 0.5, precision="bf16")
    assert cfg["bf16"] == {"enabled": True} and cfg["gradient_clipping"] == 0.5


@pytest.mark.parametrize("content, message", [
    ('{"gradient_accumulation_steps": 4}', "gradient_accumulation_steps must be 1"),
    ('{"optimizer": {"type": "AdamW"}}', "remove the 'optimizer' section"),
    ('{"zero_optimization": {"stage": 2},\n  oops}', r"bad.json:2: malformed JSON"),
])
def test_impossible_configs_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SystemExit, match=message):
        load_ds_config(path, 8, 1, 1.0)


def test_missing_config(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        load_ds_config(tmp_path / "none.json", 8, 1, 1.0)


def test_cpu_optimizer_is_deepspeeds_and_makes_torchs_adamw_update():
    """On a CPU machine the optimizer is DeepSpeedCPUAdam (about 4x torch's AdamW there): it must
    take the same steps as torch's AdamW, per parameter group and learning rate."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from train.run.ds_config import build_optimizer
    torch.manual_seed(0)
    ours, ref = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    ref.load_state_dict(ours.state_dict())
    start = ours.weight.detach().clone()
    groups = lambda m: [{"params": [m.weight], "lr": 1e-2}, {"params": [m.bias], "lr": 1e-1}]  # noqa: E731
    opt = build_optimizer(groups(ours), {}, lr=1e-2, weight_decay=0.1)
    assert isinstance(opt, DeepSpeedCPUAdam)
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(4, 16)
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            model(x).pow(2).sum().backward()
            o.step()
    assert (ours.weight - start).abs().max() > 1e-3  # the steps did something
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_grad_cache_in_bf16_accumulates_in_fp32():
    zero0 = load_ds_config(ROOT / "ds_configs/zero0.json", 8, 2, 1.0, precision="bf16", mini_batch=16)
    assert zero0["zero_optimization"]["stage"] == 1 and zero0["data_types"] == {"grad_accum_dtype": "fp32"}
    zero3 = load_ds_config(ROOT / "ds_configs/zero3.json", 8, 2, 1.0, precision="bf16", mini_batch=16)
    assert zero3["zero_optimization"]["stage"] == 3 and zero3["data_types"] == {"grad_accum_dtype": "fp32"}
    for plain in (load_ds_config(ROOT / "ds_configs/zero0.json", 8, 2, 1.0, precision="fp32", mini_batch=16),
                  load_ds_config(ROOT / "ds_configs/zero0.json", 8, 2, 1.0, precision="bf16")):
        assert plain["zero_optimization"]["stage"] == 0 and "data_types" not in plain


def test_node_local_checkpoints_set_deepspeeds_node_local_storage():
    cfg = load_ds_config(ROOT / "ds_configs/zero2.json", 8, 2, 1.0, precision="fp32", storage="node-local")
    assert cfg["checkpoint"] == {"use_node_local_storage": True}
    assert "checkpoint" not in load_ds_config(ROOT / "ds_configs/zero2.json", 8, 2, 1.0, precision="fp32")
