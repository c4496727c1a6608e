"""The first thing to run on a machine with a GPU (`bash benchmarks/gpu_check.sh`, under 8 minutes on one
H100 or H200): the real PaliGemma 2 shapes with random weights, each part beside `paliseg plan`'s prediction.

    train    paligemma2-3b-224, LoRA (rank 8, remat, AdamW) over the bf16 base, batch 32 of 256 image +
             128 text tokens: examples/s, MFU (the plan's model FLOPs over the bf16 peak), peak memory
    decode   paligemma2-3b-224, greedy decode of batch 32, 16 prompt + 128 new tokens under a stand-in
             grammar (`train.plan.stand_in_grammar`: rows end only where eos wins, so about the whole
             budget): images/s, peak memory
    nf4      paligemma2-10b-224 over an NF4 base (--base-dtype nf4), LoRA step, batch 8: peak memory, step time

Each part runs in a process of its own, so the allocator's peak (`memory_stats()["peak_bytes_in_use"]`)
is that part's (random params are made in pieces of 64 MB: no init transient tops it). The plan is made
on the same device first (`train.plan.plan`: XLA's buffer assignment of that device's compile); beside
it, `paliseg plan` run on this machine's CPU (JAX_PLATFORMS=cpu, in the background while the parts run):
the prediction one makes before renting the GPU. Writes one JSON (--out, default runs/gpu_check.json) and
prints a table.

`--smoke`: the same code on tiny shapes (tiny, tiny-pg2) on a CPU, where the "measured peak" is the
process's resident peak above its idle size, compiles included: a check of the code paths, not of the plan
(benchmarks/plan_accuracy.py measures that on a CPU). CI runs it (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# part: (`paliseg plan` flags, seconds it may take on one H100/H200, compiles included)
PARTS = {
    "train": (["--preset", "paligemma2-3b-224", "--batch-size", "32", "--seq-len", "128"], 150),
    "decode": (["--preset", "paligemma2-3b-224", "--batch-size", "32", "--seq-len", "128", "--predict"], 120),
    "nf4": (["--preset", "paligemma2-10b-224", "--base-dtype", "nf4", "--batch-size", "8", "--seq-len", "128"], 180),
}
SMOKE = {  # the same parts on tiny shapes
    "train": ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32"],
    "decode": ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--predict"],
    "nf4": ["--preset", "tiny-pg2", "--base-dtype", "nf4", "--batch-size", "4", "--seq-len", "32"],
}
TIMED_STEPS = 5
GB = 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on a CPU: the code paths, in seconds")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check.json", help="the JSON written")
    parser.add_argument("--part", choices=tuple(PARTS), help=argparse.SUPPRESS)  # one part, in its own process
    args = parser.parse_args()
    if args.part:
        print(json.dumps(run_part(args.part, flags(args.part, args.smoke))))
        return
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    plan_on_cpu = [sys.executable, "-m", "paliseg.cli.main", "plan", "--json"]
    cpu_plans = {  # what `paliseg plan` says on a CPU, before any GPU (train steps: decoding is laid out per backend)
        name: subprocess.Popen(
            [*plan_on_cpu, *flags(name, args.smoke)],
            env={**env, "JAX_PLATFORMS": "cpu"},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for name in ("train", "nf4")
    }
    results = {}
    for name, (_, budget) in PARTS.items():
        print(f"{name}: up to {budget} s ...", file=sys.stderr, flush=True)
        part_start = time.perf_counter()
        command = [sys.executable, __file__, "--part", name, *(["--smoke"] if args.smoke else [])]
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - part_start
        if done.returncode:
            results[name] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
            print(done.stderr[-4000:], file=sys.stderr)
        else:
            results[name] = json.loads(done.stdout.splitlines()[-1])
        results[name]["seconds"] = seconds
        print(f"{name}: {seconds:.0f} s (budget {budget} s)", file=sys.stderr, flush=True)
    for name, process in cpu_plans.items():
        try:
            stdout, _ = process.communicate(timeout=max(1.0, 480 - (time.perf_counter() - started)))
            if process.returncode == 0:
                results[name]["cpu_plan_peak"] = json.loads(stdout.splitlines()[-1])["bytes_per_device"]["peak"]
        except subprocess.TimeoutExpired:
            process.kill()
    report = {"smoke": args.smoke, "seconds": time.perf_counter() - started, "parts": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True))
    print(table(report))
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")


def flags(part: str, smoke: bool) -> list[str]:
    return SMOKE[part] if smoke else PARTS[part][0]


def table(report: dict) -> str:
    def size(value):
        return "-" if value is None else f"{value / GB:.2f} GB"

    lines = [
        "| part | device | planned peak | measured peak | error | planned on CPU | speed | MFU | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, part in report["parts"].items():
        if "error" in part:
            lines.append(f"| {name} | failed: {part['error']} | | | | | | | {part['seconds']:.0f} |")
            continue
        planned, measured = part["planned_peak"], part["measured_peak"]
        mfu = "-" if part.get("mfu") is None else f"{part['mfu']:.1%}"
        lines.append(
            f"| {name} | {part['device']} | {size(planned)} | {size(measured)} | {(planned - measured) / measured:+.1%} | "
            f"{size(part.get('cpu_plan_peak'))} | {part['speed']:.2f} {part['unit']} | {mfu} | {part['seconds']:.0f} |"
        )
    if any(part.get("measured_as", "").startswith("resident") for part in report["parts"].values()):
        lines.append("(CPU: measured = the process's resident peak above idle, compiles included; no plan check)")
    return "\n".join(lines)


def run_part(name: str, argv: list[str]) -> dict:
    """One part in this process: plan it, make random arguments, run, time and read the peak."""
    import jax
    import numpy as np
    from _peak import device_peak, resident
    from plan_accuracy import predict_arguments, train_arguments

    from paliseg import decoding
    from paliseg.cli import main as cli
    from train import plan, plan_commands, sharding

    jax.block_until_ready(jax.jit(lambda x: x + 1)(np.float32(1)))
    idle, _ = resident()
    device = jax.devices()[0]
    known = plan.accelerator_of(device.device_kind)
    config, settings = plan_commands.resolve(cli.build_parser().parse_args(["plan", *argv]))
    start = time.perf_counter()
    planned = plan.plan(config, settings)
    timings = {"plan_s": time.perf_counter() - start}
    if settings.predict:
        model_cfg = plan.predict_model(config)
        inputs = predict_arguments(model_cfg, config.batch_size, settings.prompt_len)
        options = {
            "max_new_tokens": planned["max_new_tokens"],
            "grammar": plan.stand_in_grammar(model_cfg.llm.vocab_size),
        }

        def run():
            return decoding.generate(model_cfg, *inputs, **options).tokens

        count, unit = config.batch_size, "images/s"
    else:
        step = plan.TrainStep.of(config, sharding.make_mesh(config.mesh_fsdp))
        arguments = list(train_arguments(step))

        def run():
            arguments[0], metrics = step.jitted(*arguments)
            return metrics["loss"]

        count, unit = config.batch_size, "examples/s"
    start = time.perf_counter()
    jax.block_until_ready(run())
    timings["first_call_s"] = time.perf_counter() - start  # compiles
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        jax.block_until_ready(run())
    seconds = (time.perf_counter() - start) / TIMED_STEPS
    measured = device_peak()
    flops = planned.get("flops_per_step")
    return {
        "device": device.device_kind,
        "flags": argv,
        "planned_peak": planned["bytes_per_device"]["peak"],
        "plan": planned,
        "measured_peak": resident()[1] - idle if measured is None else measured,
        "measured_as": "resident peak above idle" if measured is None else "allocator peak_bytes_in_use",
        "seconds_per_call": seconds,
        "speed": count / seconds,
        "unit": unit,
        "mfu": None if flops is None or known is None else flops / seconds / known.bf16_flops,
        **timings,
    }


if __name__ == "__main__":
    main()
