"""The release after bf16 training, for every shipped DeepSpeed config: fp32 master weights, a
tolerance derived from the model, the fallback when zero_to_fp32 cannot run, the inference length."""
import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from tests.conftest import ROOT, deepspeed_launch
from train.run.checkpoint import latest_checkpoint
from train.run.export import check_export

PRETRAIN = ROOT / "train/pretrain.py"
DATA = str(ROOT / "data/demo/pretrain/question_pairs.jsonl")


def bf16_pretrain(tiny_model, out, config: str, env=None, steps: int = 6):
    return deepspeed_launch(PRETRAIN, "--model", str(tiny_model), "--train-data", DATA, "--output-dir", str(out),
                            "--deepspeed-config", f"ds_configs/{config}.json", "--precision", "bf16",
                            "--batch-size", "4", "--max-steps", str(steps), "--lr", "1e-3", "--max-length", "32",
                            env=env)


def exported_equals_checkpoint(out) -> float:
    """Largest difference between the release's weights and zero_to_fp32 over its final checkpoint."""
    ckpt = out / "checkpoints"
    want = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=latest_checkpoint(ckpt))
    got = load_file(out / "final/model.safetensors")
    return max((got[k] - want["0.model." + k].float()).abs().max().item() for k in got)


@pytest.fixture(scope="module")
def bf16_runs(tiny_model, tmp_path_factory):
    """{config: (output dir, stdout)}, trained once for the tests of this module."""
    root, runs = tmp_path_factory.mktemp("bf16"), {}

    def run(config):
        if config not in runs:
            runs[config] = (root / config, bf16_pretrain(tiny_model, root / config, config).stdout)
        return runs[config]
    return run


@pytest.mark.parametrize("config", ["zero0", "zero1", "zero2", "zero3", "zero3_offload"])
def test_bf16_run_exports_its_fp32_master_weights(bf16_runs, config):
    out, stdout = bf16_runs(config)
    assert "export check: reloaded model matches the engine" in stdout
    check = torch.load(out / "export_check.pt")
    # the engine ran in bf16, the release is fp32: the rounding shows, and stays within the derived bound
    assert 0 < check["max_abs_diff"] <= check["tolerance"] < 5e-2
    if config == "zero0":  # no ZeRO checkpoint to rebuild from: the optimizer's fp32 masters, taken directly
        assert "could not rebuild" not in stdout
        release = load_file(out / "final/model.safetensors")
        assert any((w != w.bfloat16().float()).any() for w in release.values())  # fp32 bits, not bf16 ones
    else:
        assert exported_equals_checkpoint(out) == 0.0
    # training length is a compute choice: the release encodes at the base model's own length
    assert (check["train_max_length"], check["release_max_length"]) == (32, 64)
    assert SentenceTransformer(str(out / "final"), device="cpu").max_seq_length == 64


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_export_falls_back_to_the_engine_weights(tiny_model, tmp_path, config):
    """zero_to_fp32 fails (forced): every rank gathers the fp32 master weights from the engine instead,
    and they are exactly what the checkpoint holds."""
    out = tmp_path / config
    proc = bf16_pretrain(tiny_model, out, config, env={"CONAN_TEST_FAULTS": "no_zero_to_fp32"})
    assert "gathering the fp32 master weights from the engine instead" in proc.stdout
    assert "export check: reloaded model matches the engine" in proc.stdout
    assert exported_equals_checkpoint(out) == 0.0


def test_derived_tolerance_catches_an_untrained_release(tiny_model, bf16_runs):
    """The bf16 tolerance is tight enough to tell the trained engine from the model it started from."""
    out, _ = bf16_runs("zero2")
    check = torch.load(out / "export_check.pt")
    base = SentenceTransformer(str(tiny_model), device="cpu")
    base.max_seq_length = 32
    untrained = base.encode(check["texts"], prompt=check["prompt"], convert_to_tensor=True)
    assert (untrained - check["embeddings"]).abs().max() > check["tolerance"]
    with pytest.raises(SystemExit, match="export check failed"):
        check_export(out / "final", check["texts"], check["prompt"], untrained, bf16=True, train_max_length=32)


def test_bf16_grad_cache_run_accumulates_in_fp32_and_releases_its_masters(tiny_model, tmp_path):
    """--mini-batch in bf16: zero0 runs as ZeRO-1 with fp32 gradient accumulation (DeepSpeed's
    BF16_Optimizer); the run trains, and its release is the checkpoint's fp32 weights exactly."""
    out = tmp_path / "cached"
    proc = deepspeed_launch(PRETRAIN, "--model", str(tiny_model), "--train-data", DATA, "--output-dir", str(out),
                            "--precision", "bf16", "--mini-batch", "3", "--batch-size", "4", "--max-steps", "4",
                            "--lr", "1e-3", "--max-length", "32")
    assert "ZeRO 1, bf16" in proc.stdout and "export check: reloaded model matches the engine" in proc.stdout
    assert "could not rebuild" not in proc.stdout
    masters, release = bf16_optimizer_masters(out / "checkpoints/step4"), load_file(out / "final/model.safetensors")
    assert masters.keys() == {"0.model." + k for k in release}
    assert max((release[k] - masters["0.model." + k]).abs().max().item() for k in release) == 0.0
    assert any((w != w.bfloat16().float()).any() for w in release.values())  # fp32 bits, not bf16 ones


def bf16_optimizer_masters(tag_dir) -> dict:
    """The fp32 master weights in a checkpoint of DeepSpeed's BF16_Optimizer (which zero_to_fp32 does not
    read): every rank's slice of the flat fp32 group, joined and cut into parameters in the group's order."""
    ranks = [torch.load(f, weights_only=False)["optimizer_state_dict"]
             for f in sorted(tag_dir.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                             key=lambda f: int(f.name.split("_")[4]))]
    assert all(len(r["single_partition_of_fp32_groups"]) == 1 for r in ranks)  # one group: every parameter
    flat = torch.cat([r["single_partition_of_fp32_groups"][0] for r in ranks])
    names = list(dict.fromkeys(name for r in ranks for name in r["param_slice_mappings"][0]))
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    masters, at = {}, 0
    for name in names:
        n = module[name].numel()
        masters[name] = flat[at:at + n].reshape(module[name].shape)
        at += n
    return masters


def bf16_backbone(tiny_model, out):
    """The tiny model saved as LLM backbones are: bf16 weights, `dtype: bfloat16` in its config."""
    model = SentenceTransformer(str(tiny_model), device="cpu")
    model.to(torch.bfloat16)
    model.save(str(out))
    return out


def test_a_backbone_saved_in_bf16_trains_from_fp32_weights_and_releases_them(tiny_model, tmp_path):
    """transformers loads a checkpoint in its config's dtype: a bf16 backbone trained with --precision fp32
    used to update bf16 weights (1e-5-sized AdamW steps round away) and fail its export check at the end."""
    base = bf16_backbone(tiny_model, tmp_path / "bf16_base")
    out = tmp_path / "o"
    proc = deepspeed_launch(PRETRAIN, "--model", str(base), "--train-data", DATA, "--output-dir", str(out),
                            "--precision", "fp32", "--batch-size", "4", "--max-steps", "3", "--lr", "1e-5")
    assert "export check: reloaded model matches the engine (max |diff| " in proc.stdout
    release, start = load_file(out / "final/model.safetensors"), load_file(base / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in release.values())
    moved = [(release[k] != start[k].float()).float().mean().item() for k in start if start[k].is_floating_point()]
    assert sum(moved) / len(moved) > 0.5  # 1e-5 steps show in fp32 weights; in bf16 ones they round away
    assert any((w != w.bfloat16().float()).any() for w in release.values())  # fp32 bits


def test_bf16_weights_without_bf16_mixed_precision_are_refused(tiny_model, tmp_path):
    proc = deepspeed_launch(PRETRAIN, "--model", str(tiny_model), "--train-data", DATA, "--output-dir",
                            str(tmp_path / "o"), "--precision", "fp32", "--model-dtype", "bfloat16", "--max-steps", "1",
                            check=False)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("--model-dtype bfloat16 without --precision bf16") == 2
