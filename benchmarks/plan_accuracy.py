"""How close `paliseg plan` comes to the memory a step really takes, on this CPU: for tiny, mid and the real
PaliGemma 2 3B-224 shapes, a LoRA training step and a greedy decode, planned vs measured.

    .venv/bin/python benchmarks/plan_accuracy.py [--presets tiny,mid,paligemma2-3b-224]

For each case, `paliseg plan --json` (its own process) gives the planned peak bytes per device. A second,
fresh process measures. It makes random params (the real tree and dtypes, in pieces of 64 MB), the
optimizer state and a batch, and runs the program once, which compiles it; then it drops every array:
what stays resident is the idle process (Python, jax, the compiled programs). On a CPU the device memory is
this process's own, so the plan predicts

    measured peak = idle resident memory + planned peak

where the measured peak is the kernel's high-water mark VmHWM (reset just before) over one call on fresh
arguments, made by programs compiled already. Error = (predicted - measured) / measured.

Twice: first with glibc's malloc as it is, which keeps freed blocks for reuse (they count as idle, and the
call may reuse them); then with those blocks handed back to the system (`malloc_trim`) before the idle
reading and before the call, so both hold live memory only: the main columns. "above the idle process"
compares the plan with measured - idle alone, which also carries what the plan does not count: what
XLA:CPU's runtime allocates beside its buffer assignment, host copies of the inputs, thread arenas.

The measuring process also compiles the program for its real arguments and reads XLA's buffer sizes, and
the bytes of those arguments: the plan's are the same when it compiles what runs.

The 3B train step needs ~10 GB and a few minutes here: run it alone (`flock /tmp/paliseg-cpu.lock ...`).
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

# (preset, task, batch, seq_len, new tokens): sizes a 2-core CPU measures in minutes; 3B train as full_size_memory.
CASES = (
    ("tiny", "train", 32, 64, None),
    ("tiny", "predict", 8, 64, 64),
    ("mid", "train", 8, 64, None),
    ("mid", "predict", 8, 64, 64),
    ("paligemma2-3b-224", "train", 1, 128, None),
    ("paligemma2-3b-224", "predict", 4, 128, 32),
)
GB = 1e9


def plan_flags(task: str, preset: str, batch: int, seq_len: int, new_tokens: int | None) -> list[str]:
    """`paliseg plan` flags of a case (the measuring process builds the same run from them)."""
    flags = ["--preset", preset, "--batch-size", str(batch), "--seq-len", str(seq_len)]
    return flags + (["--predict", "--max-new-tokens", str(new_tokens)] if task == "predict" else [])


def run_json(argv: list[str]) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,mid,paligemma2-3b-224", help="comma-separated, in this order")
    parser.add_argument("--measure", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # the measuring process
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure)))
        return
    presets = args.presets.split(",")
    print(
        "| case | planned peak | idle process | measured peak | idle + planned | error | malloc as it is: idle, peak, error |"
    )
    print("|---|---|---|---|---|---|---|")
    errors, errors_as_left = [], []
    for preset, task, batch, seq_len, new_tokens in (case for case in CASES if case[0] in presets):
        flags = plan_flags(task, preset, batch, seq_len, new_tokens)
        start = time.perf_counter()
        planned = run_json([sys.executable, "-m", "paliseg.cli.main", "plan", *flags, "--json"])
        measured = run_json([sys.executable, __file__, "--measure", task, *flags])
        plan_peak = planned["bytes_per_device"]["peak"]
        error = (measured["idle"] + plan_peak - measured["peak"]) / measured["peak"]
        error_as_left = (measured["idle_as_left"] + plan_peak - measured["peak_as_left"]) / measured["peak_as_left"]
        errors.append(abs(error))
        errors_as_left.append(abs(error_as_left))
        shape = f"batch {batch}, " + (f"{new_tokens} new tokens" if task == "predict" else f"seq {seq_len}")
        print(
            f"| {preset} {task} ({shape}) | {plan_peak / GB:.3f} GB | {measured['idle'] / GB:.3f} GB | "
            f"{measured['peak'] / GB:.3f} GB | {(measured['idle'] + plan_peak) / GB:.3f} GB | {error:+.1%} | "
            f"{measured['idle_as_left'] / GB:.3f}, {measured['peak_as_left'] / GB:.3f} GB, {error_as_left:+.1%} |",
            flush=True,
        )
        xla, growth = measured["xla_peak"], measured["peak"] - measured["idle"]
        print(
            f"  above the idle process: measured {growth / GB:.3f} GB, planned {(plan_peak - growth) / growth:+.1%}; "
            f"XLA's buffers for the real arguments: peak {xla / GB:.3f} GB (planned {(plan_peak - xla) / xla:+.1%}), "
            f"arguments {measured['argument_bytes'] / GB:.3f} GB of arrays, {measured['xla_arguments'] / GB:.3f} GB "
            f"by XLA; {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    print(f"largest relative error, malloc as it is: {max(errors_as_left):.3f}")
    print(f"largest relative error of the planned process peak: {max(errors):.3f} (goal <= 0.10)")


# --- the measuring process ----------------------------------------------------------------------------


def random_batch(shapes: dict, vocab_size: int) -> dict:
    """A batch of these shapes as the loop makes them: images in [-1, 1], tokens, a 16-token prefix."""
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    suffix = (np.arange(shapes["tokens"].shape[-1]) >= 16).astype(np.int32)
    values = {
        "image": rng.uniform(-1, 1, shapes["image"].shape).astype(np.float32),
        "tokens": rng.integers(3, vocab_size, shapes["tokens"].shape).astype(np.int32),
        "mask_ar": np.broadcast_to(suffix, shapes["mask_ar"].shape),
        "mask_loss": np.broadcast_to(suffix, shapes["mask_loss"].shape),
        "mask_input": np.ones(shapes["mask_input"].shape, np.int32),
    }
    return {key: jax.device_put(values[key], getattr(shape, "sharding", None)) for key, shape in shapes.items()}


def random_params(model_cfg) -> dict:
    """Random values in the model's own tree and dtypes (a quantized base's codes and scales too), made leaf
    by leaf in pieces of 2**24 values: no transient bigger than 64 MB, so a process's peak is its program's."""
    import jax
    from full_size_memory import _random

    from paliseg import model

    leaves, treedef = jax.tree.flatten(model.param_shapes(model_cfg))
    keys = jax.random.split(jax.random.key(0, impl="rbg"), len(leaves))
    return jax.tree.unflatten(treedef, [_random(leaf.shape, leaf.dtype, key) for leaf, key in zip(leaves, keys)])


def train_arguments(step) -> tuple:
    """(state, frozen, batch) for a `train.plan.TrainStep`: random params (the real tree and dtypes), the
    fresh optimizer state and a random batch, placed as the step takes them."""
    import jax

    from train import optim
    from train import params as param_sets
    from train import step as train_step

    frozen, trainable = param_sets.split(random_params(step.model_cfg), step.config.trainable)
    frozen = jax.device_put(frozen, step.layout.frozen_shardings)
    tx = optim.optimizer(step.config)
    state = jax.jit(lambda p: train_step.init_state(p, tx), out_shardings=step.layout.state_shardings)(trainable)
    return state, frozen, random_batch(step.batch, step.model_cfg.llm.vocab_size)


def predict_arguments(model_cfg, batch: int, prompt_len: int) -> tuple:
    """(params, images, tokens, mask_ar, mask_input) for the decode `train.plan.predict_program` plans:
    random params and images, random prompts of 8 tokens padded as predict pads them."""
    import jax
    import numpy as np

    from train import plan

    images, tokens, _, _ = plan.decode_inputs(model_cfg, batch, prompt_len)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model_cfg.llm.vocab_size, tokens.shape).astype(np.int32)
    mask_input = (np.arange(tokens.shape[1]) < 8).astype(np.int32)[None].repeat(batch, 0)
    pixels = rng.uniform(-1, 1, images.shape).astype(np.float32)
    return jax.block_until_ready(random_params(model_cfg)), pixels, ids, np.zeros_like(ids), mask_input


def measure(argv: list[str]) -> dict:
    """The measurement of one case (`train|predict` and its `paliseg plan` flags) in this process."""
    import gc

    import jax
    from _peak import release_free_memory, reset_resident_peak, resident

    from paliseg import decoding
    from paliseg.cli import main as cli
    from train import plan, plan_commands, sharding

    config, settings = plan_commands.resolve(cli.build_parser().parse_args(["plan", *argv[1:]]))
    if argv[0] == "train":
        step = plan.TrainStep.of(config, sharding.make_mesh(config.mesh_fsdp))
        make_arguments = lambda: list(train_arguments(step))  # noqa: E731

        def run(arguments):  # as the loop calls it: the state donated, the new one kept
            arguments[0], metrics = step.jitted(*arguments)
            return metrics
    else:
        model_cfg = plan.predict_model(config)
        options = {"max_new_tokens": settings.max_new_tokens or config.seq_len,
                   "grammar": plan.stand_in_grammar(model_cfg.llm.vocab_size)}  # fmt: skip
        make_arguments = lambda: list(predict_arguments(model_cfg, config.batch_size, settings.prompt_len))  # noqa: E731

        def run(arguments):
            return decoding.generate(model_cfg, *arguments, **options).tokens

    arguments = make_arguments()
    jax.block_until_ready(run(arguments))  # compiles the program, then runs it
    lowered = (
        step.jitted.lower(*arguments)
        if argv[0] == "train"
        else decoding.lower_generate(model_cfg, *arguments, **options)
    )
    xla = plan.Buffers.of(lowered.compile())
    argument_bytes = plan.device_bytes(arguments)
    del lowered

    def measured(release: bool) -> tuple[int, int]:
        """(resident bytes with no array, peak of a call on fresh arguments); `release`: with what malloc
        keeps of freed blocks handed back before each reading."""
        nonlocal arguments
        arguments = None
        gc.collect()
        if release:
            release_free_memory()
        idle, _ = resident()  # the runtime and the compiled programs
        arguments = make_arguments()  # the programs that make them are compiled already
        jax.block_until_ready(arguments)
        if release:
            release_free_memory()
        reset_resident_peak()
        jax.block_until_ready(run(arguments))
        return idle, resident()[1]

    idle_as_left, peak_as_left = measured(release=False)
    idle, peak = measured(release=True)
    return {"idle": idle, "peak": peak, "idle_as_left": idle_as_left, "peak_as_left": peak_as_left,
            "argument_bytes": argument_bytes, "xla_arguments": xla.arguments, "xla_peak": xla.peak}  # fmt: skip


if __name__ == "__main__":
    main()
