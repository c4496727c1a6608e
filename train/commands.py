"""`paliseg train`: fine-tune PaliGemma on converted data (registered by paliseg.cli.main)."""

from __future__ import annotations

import argparse

_DESCRIPTION = """\
Fine-tune PaliGemma on converted data: LoRA adapters (default), the Gemma attention (big_vision's colab
recipe) or every parameter. Checkpoints every --save-every steps; --resume continues exactly where the
latest one left off (the same losses as an uninterrupted run)."""

_EPILOG = """\
inputs:
  --data DIR          a converted folder (`paliseg convert`): DIR/_annotations.train.jsonl + images;
                      repeat --data to mix several (--data-weights or --balance-prompts set the mix)
  --checkpoint BASE   the base model (big_vision .npz, HF safetensors, or a paliseg checkpoint), or
  --init random       a seeded random model (the tiny presets, trained from scratch with --trainable all)
  --config FILE       JSON of settings (keys as the flags, with _: {"lr": 1e-4, "lora_rank": 16});
                      flags given on the command line win

outputs in RUN_DIR (--out):
  config.json         the resolved settings, base checkpoint and model config of the run, and the
                      SHA-256 of the VAE that wrote the data's seg tokens (from DIR/conversion.json)
  checkpoints/<step>/ trainable params + optimizer state (orbax), every --save-every steps, all kept
  metrics.csv, tb/    loss, lr, grad norm, examples/s per step (CSV and TensorBoard)

examples:
  paliseg train --data data/cracks --data data/drywall --balance-prompts \\
      --checkpoint models/paligemma-3b-pt-224.bf16.npz --tokenizer models/paligemma_tokenizer.model \\
      --out runs/lora --steps 500 --batch-size 16 --grad-accum 2
  paliseg train --data data/cracks --init random --preset tiny --trainable all --lr 1e-3 --out runs/tiny
  paliseg train --out runs/lora --resume          # continue an interrupted run

several hosts (TPU pod slice, GPU nodes): start the same command on every host with
  --distributed                      (TPU pods, SLURM: jax.distributed.initialize() finds the peers), or
  --coordinator HOST:PORT --num-processes N --process-id I   (explicit, e.g. GPU hosts)
every host reads its own slice of each batch; --out must be a folder every host can write (GCS or NFS)."""



def _comma_list(kind):
    def parse(text: str):
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="Fine-tune PaliGemma (LoRA, attention-only or full) on converted data; checkpoints every N steps, resumable.",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = parser.add_argument_group("data, model and run folder")
    io.add_argument("--data", action="append", metavar="DIR", help="converted data folder (repeatable)")
    io.add_argument("--data-weights", type=_comma_list(float), metavar="W1,W2",
                    help="sampling weight of each --data folder (default: proportional to size)")
    io.add_argument("--balance-prompts", action="store_const", const=True,
                    help="sample every prompt equally often (e.g. the small drywall set as often as cracks)")
    io.add_argument("--split", metavar="SPLIT", help="annotation split to train on (default: train)")
    base = io.add_mutually_exclusive_group()
    base.add_argument("--checkpoint", metavar="BASE", help="base PaliGemma checkpoint")
    base.add_argument("--init", choices=["random"], help="start from a seeded random model instead")
    io.add_argument("--tokenizer", metavar="PATH", help="SentencePiece model (default: the preset's; the tiny "
                    "presets bundle one, the 3B presets need paligemma_tokenizer.model)")
    io.add_argument("--out", metavar="RUN_DIR", required=True, help="run folder (config, checkpoints, metrics)")
    io.add_argument("--config", metavar="FILE", help="JSON file of settings; flags override it")
    io.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    io.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")

    model = parser.add_argument_group("model")
    model.add_argument("--preset", metavar="NAME", help="model preset: paligemma-3b-224 (default), -448, -896, tiny, tiny-112, mid")
    model.add_argument("--seq-len", metavar="N", type=int, help="text tokens per example (default 128); longer examples are an error")
    model.add_argument("--base-dtype", choices=["bfloat16", "float16", "float32"],
                       help="dtype of the frozen base (default: the preset's)")
    model.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                       help="recompute activations in the backward pass (default: on)")

    what = parser.add_argument_group("what is trained")
    what.add_argument("--trainable", choices=["lora", "attn", "all"], help="parameter set (default: lora)")
    what.add_argument("--lora-rank", metavar="R", type=int, help="adapter rank (default 8)")
    what.add_argument("--lora-alpha", metavar="A", type=float, help="adapter scale numerator: scale = alpha / rank (default 16)")
    what.add_argument("--lora-dropout", metavar="P", type=float, help="dropout on the adapter input (default 0)")
    what.add_argument("--lora-targets", type=_comma_list(str), metavar="T1,T2",
                      help="projections to adapt (default q,k,v,o,gate,up,down; SigLIP: img_q,img_k,img_v,"
                           "img_o,img_fc1,img_fc2)")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--steps", metavar="N", type=int, help="optimizer steps (default 200)")
    opt.add_argument("--batch-size", metavar="B", type=int, help="examples per step over all devices and hosts (default 8)")
    opt.add_argument("--grad-accum", metavar="K", type=int, help="micro-batches per step (default 1)")
    opt.add_argument("--optimizer", choices=["adamw", "sgd"], help="default adamw")
    opt.add_argument("--lr", metavar="LR", type=float, help="peak learning rate (default 3e-4)")
    opt.add_argument("--warmup-fraction", metavar="F", type=float, help="share of the steps in linear warmup (default 0.1)")
    opt.add_argument("--min-lr-ratio", metavar="F", type=float, help="final lr of the cosine, relative to --lr (default 0)")
    opt.add_argument("--momentum", metavar="M", type=float, help="SGD momentum (default 0)")
    opt.add_argument("--weight-decay", metavar="WD", type=float, help="decoupled weight decay on matrices (default 0)")
    opt.add_argument("--grad-clip", metavar="NORM", type=float, help="global-norm clip, 0 for none (default 1)")
    opt.add_argument("--label-smoothing", metavar="LS", type=float, help="default 0 (big_vision's refcoco_seg uses 0.3)")
    opt.add_argument("--seed", metavar="S", type=int, help="seeds data order, augmentation, adapters, dropout (default 0)")
    opt.add_argument("--no-augment", dest="augment", action="store_const", const=False,
                     help="turn off the photometric augmentation (brightness, contrast, saturation)")

    run = parser.add_argument_group("execution")
    run.add_argument("--save-every", metavar="N", type=int, help="checkpoint every N steps, all kept (default 25)")
    run.add_argument("--log-every", metavar="N", type=int, help="write metrics every N steps (default 1)")
    run.add_argument("--workers", metavar="N", type=int, help="image-loading threads (default 4)")
    run.add_argument("--prefetch", metavar="N", type=int, help="batches loaded ahead (default 2)")
    run.add_argument("--mesh-fsdp", metavar="N", type=int, help="devices that share one copy of the model (FSDP); the "
                     "others replicate it (data parallel); default 1")
    run.add_argument("--distributed", action="store_true",
                     help="multi-host: call jax.distributed.initialize() and let it find the peers")
    run.add_argument("--coordinator", metavar="HOST:PORT", help="multi-host: address of process 0")
    run.add_argument("--num-processes", metavar="N", type=int, help="multi-host: number of processes")
    run.add_argument("--process-id", metavar="I", type=int, help="multi-host: this process's index")
    # Every flag named after a TrainConfig field fills it; None means "not given" (the config file or the
    # default applies, and --resume sees no conflict), hence no argparse defaults above.
    parser.set_defaults(run=_train)


def _initialize_distributed(args: argparse.Namespace) -> None:
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError("multi-host needs all of --coordinator, --num-processes and --process-id")
    if args.distributed or args.coordinator:
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from paliseg import console
    from train import trainer
    from train import config as train_config
    from train.run import Run

    _initialize_distributed(args)
    requested = {field.name: getattr(args, field.name, None) for field in dataclasses.fields(train_config.TrainConfig)}
    if args.resume:
        if args.config:
            raise ValueError("--resume takes the settings from the run's config.json; drop --config")
        config = train_config.check_resume(Run(args.out).train_config, requested)
    else:
        config = train_config.resolve(requested, args.config)
    result = trainer.run(config, resume=args.resume)
    if not result["losses"]:
        console.report({k: v for k, v in result.items() if k != "losses"},
                       f"nothing to train: {result['run_dir']} already has all {result['steps']} steps", args.json)
        return 0
    human = (f"trained steps {result['start_step']}..{result['end_step']} of {result['steps']}: loss "
             f"{result['first_loss']:.4f} -> {result['last_loss']:.4f}, {result['examples_per_s']:.1f} examples/s; "
             f"checkpoints at steps {', '.join(map(str, result['checkpoint_steps']))} in {result['run_dir']}")
    summary = {key: value for key, value in result.items() if key != "losses"}
    console.report(summary, human, args.json)
    return 0
