"""Do the GPU paths work? One script, under 8 minutes; a PASS/FAIL line per check with its figure.

    bash bench/gpu_check.sh                 # after README's install, on a machine with a CUDA GPU
    python bench/gpu_check.py --quick       # the same checks on CPU with a tiny model (the tests run this)

The training rows run in bf16 on one rank, or on two (torchrun, one thread each) where there are two
GPUs and in the CPU form, which exercises every row's code path a CPU can (bf16 on the CPU included).

On a BERT-large-shaped model with random weights (bge-large-zh's shape; the weights change no code path):
  cuda                   torch sees a GPU with bf16
  pretrain zero0 cache   bf16 pre-training steps with GradCache under zero0.json (run as ZeRO-1 with fp32
                         gradient accumulation), the export and its check; peak GPU memory
  pretrain zero3 cache   the same under zero3.json
  finetune zero3 cache   CBB fine-tuning steps (expansion layer, Matryoshka) under zero3.json, the export
  grad cache = plain     one step's gradient with GradCache equals the uncached one on the device (fp32)
  llm lora zero3         a random decoder of Qwen3-0.6B's body (1024 wide, 28 layers; small vocabulary):
                         CBB fine-tuning with LoRA, GradCache and gradient checkpointing under zero3.json
                         (the model built partitioned), the merged release and its check
  llm soft zero3         the same model fully fine-tuned with soft masking
  throughput             bench/throughput.py's large and large_cache rows: tokens/s, TFLOP/s, MFU
Results: OUT/gpu_check.md (the lines) and OUT/<check>.log.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import launch

ROOT = Path(__file__).resolve().parent.parent
DEMO_PAIRS = ROOT / "data/demo/pretrain/question_pairs.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/gpu_check", help="logs and the report")
    p.add_argument("--quick", action="store_true", help="CPU and a tiny model: the checks' own test")
    p.add_argument("--skip", default="", help="comma-separated checks to leave out: llm, pretrain_zero0, pretrain_zero3, "
                                              "finetune, grad_cache, throughput")
    return p.parse_args(argv)


class Report:
    """PASS/FAIL lines, printed as they come and kept in OUT/gpu_check.md."""

    def __init__(self, out: Path):
        self.out, self.lines = out, []

    def line(self, name: str, ok: bool, figure: str) -> bool:
        text = f"{'PASS' if ok else 'FAIL'}  {name:<22} {figure}"
        print(text, flush=True)
        self.lines.append(text)
        (self.out / "gpu_check.md").write_text("\n".join(self.lines) + "\n")
        return ok


def run(name: str, cmd: list[str], out: Path, timeout: int = 300, cpu: bool = False) -> tuple[int, str, float]:
    """`cmd` with its output in OUT/<name>.log; `cpu`: pinned to the CPU, one thread a rank (--quick, which
    must not pick up a GPU: on one GPU its second rank would bind cuda:1)."""
    started = time.time()
    env = launch.script_env(threads=1 if cpu else None)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, text = 124, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    (out / f"{name.replace(' ', '_').replace('=', 'eq')}.log").write_text(text)
    return code, text, time.time() - started


def run_summary(output_dir: Path) -> dict:
    """What a training run did, as it wrote it (OUTPUT_DIR/summary.json); {} if it wrote none."""
    path = output_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def training_check(report: Report, name: str, script: str, model: str, config: str, args: list[str], out: Path,
                   ranks: int, cpu: bool) -> None:
    """A few bf16 steps on `ranks` ranks (torchrun, as a user launches: with several ranks it gives each one
    thread), the release and its export check."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port", "29431",
           str(ROOT / script), "--model", model, "--deepspeed-config", str(ROOT / f"ds_configs/{config}.json"),
           "--precision", "bf16", "--max-steps", "4", "--save-steps", "100000",
           "--output-dir", str(out / "runs" / name.replace(" ", "_")), *args]
    code, text, seconds = run(name, cmd, out, cpu=cpu)
    stats = run_summary(out / "runs" / name.replace(" ", "_"))
    exported = "export check: reloaded model matches the engine" in text
    check = next((ln for ln in text.splitlines() if ln.startswith("export check")), "no export check line")
    memory = f"peak GPU {stats['peak_gpu_mb']:,.0f} MB" if "peak_gpu_mb" in stats else \
        f"peak RSS {stats.get('peak_rss_mb', 0):,.0f} MB"
    figure = (f"{stats.get('steps', 0)} steps in {seconds:.0f} s, {memory}; {check}" if code == 0 else
              f"exit {code} after {seconds:.0f} s; last lines: {' | '.join(text.strip().splitlines()[-3:])[:400]}")
    report.line(f"{name}{' x' + str(ranks) if ranks > 1 else ''}", code == 0 and exported, figure)


def grad_cache_equals_plain(report: Report, model: str, out: Path, quick: bool) -> None:
    """One rank on the device, fp32, ZeRO-1: the gradient of a step through GradCache against the plain step."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port", "29432",
           str(ROOT / "bench/gpu_grad_cache.py"), model, str(out / "grad_cache.json")]
    code, text, _ = run("grad cache = plain", cmd, out, cpu=quick)
    if code:
        report.line("grad cache = plain", False, f"exit {code}: {' | '.join(text.strip().splitlines()[-3:])[:400]}")
        return
    r = json.loads((out / "grad_cache.json").read_text())
    report.line("grad cache = plain", r["relative_difference"] < 1e-4,
                f"relative L2 difference {r['relative_difference']:.1e} over {r['parameters']:,} parameters "
                f"on {r['device']} ({r['mini_batches']} mini-batches)")


def throughput(report: Report, out: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench/throughput.py"), "--device", "cuda", "--rows", "large,large_cache",
           "--steps", "8", "--out", str(out / "throughput")]
    code, text, seconds = run("throughput", cmd, out, timeout=360)
    if code:
        report.line("throughput", False, f"exit {code} after {seconds:.0f} s: {' | '.join(text.strip().splitlines()[-3:])[:400]}")
        return
    results = json.loads((out / "throughput/results.json").read_text())
    for row, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}% MFU" if r.get("mfu") else "MFU n/a"
        report.line(f"throughput {row}", True, f"{r['warm_tokens'] / max(r['warm_seconds'], 1e-9):,.0f} tokens/s, "
                    f"{r['tflops_per_gpu']:.0f} TFLOP/s, {mfu}, peak GPU {r.get('peak_gpu_mb', 0):,.0f} MB")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report, skip = Report(out), {s.strip() for s in args.skip.split(",") if s.strip()}
    import torch
    from bench.base_model import LARGE, TINY, random_model
    if not args.quick:
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        if not report.line("cuda", ok, f"{name}, torch {torch.__version__}, {torch.cuda.device_count()} GPU(s)"):
            return 1
    # two ranks where there are two GPUs (the gathers, the NCCL/gloo split and torchrun's one thread per
    # rank only show with several); the CPU form runs two ranks too, one thread each
    ranks = 2 if args.quick or torch.cuda.device_count() >= 2 else 1
    model = random_model(out, TINY if args.quick else LARGE)
    length = ["--max-length", "64" if args.quick else "512"]
    pretrain_args = ["--train-data", str(DEMO_PAIRS), "--batch-size", "8" if args.quick else "64",
                     "--mini-batch", "4" if args.quick else "32", *length]
    for config in ("zero0", "zero3"):
        if f"pretrain_{config}" not in skip:
            training_check(report, f"pretrain {config} cache", "train/pretrain.py", model, config, pretrain_args, out,
                           ranks, args.quick)
    if "finetune" not in skip:
        training_check(report, "finetune zero3 cache", "train/finetune.py", model, "zero3",
                       ["--mini-batch", "8" if args.quick else "32", "--merge-weight", "1", *length], out, ranks, args.quick)
    if "grad_cache" not in skip:
        grad_cache_equals_plain(report, model, out, args.quick)
    if "llm" not in skip:
        from bench.tiny_model import make_tiny_decoder
        shape = dict(hidden=32, layers=2) if args.quick else dict(hidden=1024, layers=28, heads=16, kv_heads=8,
                                                                  intermediate=3072)
        llm = str(make_tiny_decoder(out / "llm", "qwen3", **shape))
        common = ["--mini-batch", "8" if args.quick else "32", "--merge-weight", "1", "--gradient-checkpointing",
                  *length]
        training_check(report, "llm lora zero3", "train/finetune.py", llm, "zero3",
                       ["--lora-rank", "16", "--lr", "1e-4", *common], out, ranks, args.quick)
        training_check(report, "llm soft zero3", "train/finetune.py", llm, "zero3",
                       ["--attention", "soft", "--lr", "1e-5", *common], out, ranks, args.quick)
    if "throughput" not in skip and not args.quick:
        throughput(report, out)
    failed = sum(line.startswith("FAIL") for line in report.lines)
    print(f"gpu check: {len(report.lines) - failed} passed, {failed} failed; report: {out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
