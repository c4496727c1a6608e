"""`paliseg train`: fine-tune PaliGemma on converted data (registered by paliseg.cli.main)."""

from __future__ import annotations

import argparse

from paliseg import settings
from train.config import INPUTS, PLAN, PlanConfig, ProcessSettings, TrainConfig

_DESCRIPTION = """\
Fine-tune PaliGemma on converted data: LoRA adapters (default), the Gemma attention (big_vision's colab
recipe) or every parameter. Checkpoints every --save-every steps; --resume continues exactly where the
latest one left off (the same losses as an uninterrupted run)."""

_EPILOG = """\
inputs:
  --data DIR          a converted folder (`paliseg convert`): DIR/_annotations.train.jsonl + images;
                      repeat --data to mix several (--data-weights or --balance-prompts set the mix)
  --checkpoint BASE   the base model (big_vision .npz, HF safetensors, or a paliseg checkpoint), or
  --init random       a seeded random model (the tiny presets, trained from scratch with --trainable all), or
  --init-run RUN      a checkpoint of another run (--init-step best|latest|N; its LoRA merged in)
  --config FILE       JSON of settings (keys as the flags, with _; --lora-* nested:
                      {"lr": 1e-4, "lora": {"rank": 16}}); flags given on the command line win

outputs in RUN_DIR (--out):
  config.json         the resolved settings, base checkpoint and model config of the run, and the
                      SHA-256 of the VAE that wrote the data's seg tokens (from DIR/conversion.json)
  checkpoints/<step>/ trainable params + optimizer state (orbax), every --save-every steps, all kept
  metrics.csv, tb/    loss, lr, grad norm, examples/s per step (CSV and TensorBoard); with --objective
                      grpo also mean/std reward, KL, clip fraction, zero-variance groups, tokens/s

--objective grpo (reinforcement fine-tuning, train/grpo.py): per step, --grpo-group-size completions of
each image/prompt are sampled under the segmentation grammar, decoded to masks at the ground truth's
resolution and rewarded with the per-image mask IoU `paliseg eval` reports (+ --grpo-box-weight x box
mIoU); group-normalised advantages, the clipped policy-gradient loss, a KL penalty (--grpo-kl-coef) to the
starting policy. Start it from a trained run: --init-run RUN --init-step best. Devices and hosts as for
supervised runs (--batch-size prompts split over the devices, --mesh-fsdp).

examples:
  paliseg train --data data/cracks --data data/drywall --balance-prompts \\
      --checkpoint models/paligemma-3b-pt-224.f16.npz --tokenizer models/paligemma_tokenizer.model \\
      --out runs/lora --steps 500 --batch-size 16 --grad-accum 2
  paliseg train --data data/cracks --init random --preset tiny --trainable all --lr 1e-3 --out runs/tiny
  paliseg train --data data/cracks --checkpoint models/paligemma2-10b-pt-224.b16.npz \\
      --preset paligemma2-10b-224 --tokenizer models/paligemma_tokenizer.model --base-dtype nf4 --out runs/q
                                                  # QLoRA: the frozen base in 4 bits (int8: 8), LoRA in float32
  paliseg train --out runs/lora --resume          # continue an interrupted run
  paliseg train --objective grpo --init-run runs/lora --init-step best --data data/cracks \
      --out runs/grpo --steps 200 --batch-size 4 --grpo-group-size 8 --lr 1e-5

several hosts (TPU pod slice, GPU nodes): start the same command on every host with
  --distributed                      (TPU pods, SLURM: jax.distributed.initialize() finds the peers), or
  --coordinator HOST:PORT --num-processes N --process-id I   (explicit, e.g. GPU hosts)
every host reads its own slice of each batch; --out must be a folder every host can write (GCS or NFS)."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="Fine-tune PaliGemma (LoRA, attention-only or full) on converted data; checkpoints every N steps, resumable.",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # A flag per TrainConfig field (train/config.py declares them), all defaulting to None: "not given", so
    # the config file or the default applies, and --resume sees no conflict.
    groups = settings.add_arguments(parser, TrainConfig)
    io = groups[INPUTS]
    io.add_argument("--config", metavar="FILE", help="JSON file of settings; flags override it")
    io.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    io.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    settings.add_arguments(parser, ProcessSettings, groups)
    plan = settings.add_arguments(parser, PlanConfig, groups)[PLAN]
    plan.add_argument(
        "--plan", action="store_true", help="print the memory and time of this run's step (`paliseg plan`) and exit"
    )
    parser.set_defaults(run=_train)


def run(config, resume: bool = False, stop_after: int | None = None) -> dict:
    """Train (or continue) the run `config` describes with its --objective's step (`train.loop.run`);
    returns the run's summary. `stop_after`: end this session after that many steps in total."""
    from train import loop

    if config.objective == "grpo":
        from train.grpo import Grpo as objective
    else:
        from train.supervised import Supervised as objective
    return loop.run(config, objective, resume, stop_after)


def _train(args: argparse.Namespace) -> int:
    from paliseg import console
    from train import config as train_config
    from train import run as run_folder
    from train import sharding

    sharding.join_processes(settings.from_args(args, ProcessSettings))
    requested = settings.given(args, TrainConfig)
    if args.resume:
        if args.config:
            raise ValueError("--resume takes the settings from the run's config.json; drop --config")
        config = train_config.check_resume(run_folder.Run(args.out).train_config, requested)
    else:
        config = run_folder.resolve_config(requested, args.config)
    if args.plan:
        from train import plan_commands

        return plan_commands.report(config, plan_commands.plan_settings(args), args.json)
    result = run(config, resume=args.resume)
    if not result["losses"]:
        console.report(
            {k: v for k, v in result.items() if k != "losses"},
            f"nothing to train: {result['run_dir']} already has all {result['steps']} steps",
            args.json,
        )
        return 0
    reward = f"mean reward {result['first_reward']:.4f} -> {result['last_reward']:.4f}, " if "rewards" in result else ""
    human = (
        f"trained steps {result['start_step']}..{result['end_step']} of {result['steps']}: {reward}loss "
        f"{result['first_loss']:.4f} -> {result['last_loss']:.4f}, {result['examples_per_s']:.1f} examples/s; "
        f"checkpoints at steps {', '.join(map(str, result['checkpoint_steps']))} in {result['run_dir']}"
    )
    summary = {key: value for key, value in result.items() if key not in ("losses", "rewards")}
    console.report(summary, human, args.json)
    return 0
