"""`paliseg predict`, `paliseg eval` and `paliseg serve` (registered by paliseg.cli.main).

Only argparse and the settings (infer/config.py) at the top: the handlers import jax, the model and the metrics.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from infer.config import (
    INPUTS_OUTPUTS,
    DecodingSettings,
    EvalSettings,
    ModelSettings,
    PredictSettings,
    ServeSettings,
)
from paliseg import settings
from train.config import ProcessSettings

_PREDICT_HELP = (
    "Predict boxes and full-resolution masks for images and prompts, with a run's checkpoint or any checkpoint."
)
_PREDICT_EPILOG = """\
mask VAE: a run decodes with the VAE its data was converted with (its SHA-256 is in RUN_DIR/config.json),
  found at its recorded path, models/vae-oid.npz or bundled; a --vae of another SHA-256 is refused unless
  --allow-vae-mismatch. --checkpoint: --vae, else models/vae-oid.npz, else the bundled VAE.

outputs in OUT (NAME = IMAGE_STEM.PROMPT_SLUG):
  masks/NAME.png          union mask (0/255) at the image's full resolution
  objects/NAME.K.png      each object's own mask
  json/NAME.json          raw decoded text, objects (label, confidence, pixel box xyxy, tokens), invalid chunks
  canvases/NAME.png       original | ground truth (JSONL input) | prediction   (--no-canvas to skip)
  predictions.jsonl       annotation records of the predictions (for `paliseg visualize --pred`)
  coco_results.json       COCO results (RLE masks, xywh boxes, score = confidence) + coco_dataset.json (images,
                          categories = prompts, ground truth for JSONL input): pycocotools evaluates them

examples:
  paliseg predict --run runs/r1 --image wall.jpg --prompt "segment crack" --out pred
  paliseg predict --run runs/r1 --step 200 --image data/_annotations.valid.jsonl --out pred_valid --json
  paliseg predict --checkpoint paligemma.npz --preset paligemma-3b-224 --tokenizer tok.model \\
      --image photos/ --prompt "segment crack" --prompt "segment taping area" --out pred
  paliseg predict --checkpoint hf_paligemma/ --image wall.jpg --prompt "caption en" --raw --no-constrain
  paliseg predict --checkpoint models/paligemma2-3b-mix-224-hf --tokenizer models/paligemma_tokenizer.model \\
      --image wall.jpg --prompt "segment crack" --dtype float32 --out pred
"""

_EVAL_HELP = "Score every checkpoint of a run on a split, pick the best, write a report with plots and canvases."
_EVAL_EPILOG = """\
scores step 0 (the base, before fine-tuning), every saved checkpoint, and the token round-trip ceiling
(the ground truth through loc + seg tokens and back: the best these tokens allow), on every record of the
split. Per prompt and overall: mIoU, mDice, cIoU, box mIoU, box accuracy at IoU 0.5 / 0.75, invalid
predictions (scored 0), P10/P50/P90 of the per-image IoU.

the best checkpoint (by --metric over all prompts) is written to RUN_DIR/best.json:
`paliseg predict --run RUN_DIR --step best` uses it.

the mask VAE is the one the run's data was converted with (SHA-256 in RUN_DIR/config.json, else in
DATA/conversion.json); a --vae of another SHA-256, or a --data folder converted with another VAE than the
run's, is refused unless --allow-vae-mismatch.

outputs in REPORT_DIR:
  report.md, report.json, metrics.csv      tables per prompt: base, each checkpoint, best, ceiling
  plots/<metric>_vs_step.png               one line per prompt; plots/iou_histogram.png (best step)
  canvases/best.png, canvases/worst.png    the best and worst images of the best checkpoint
  steps/step_NNNNNN/per_image.csv          per-image scores of every step; ceiling/ likewise
  predictions/step_NNNNNN.jsonl            the decoded texts (a cache: a re-run decodes only what is new,
                                           and a crash loses at most one batch)

a checkpoint that fails to load or decode is reported and skipped; unreadable images and masks are
counted skips (listed in the report).

every device decodes its share of each batch (--batch-size rounded up to a multiple of the devices). On
several hosts start the same command on each with --distributed or --coordinator/--num-processes/
--process-id, as for `paliseg train`: each host reads its share of the images, process 0 writes the report
(RUN_DIR and --data readable by every host). The report is the one a single device writes.

examples:
  paliseg eval runs/r1 --data data/cracks --out runs/r1/eval
  paliseg eval runs/r1 --data data/cracks --split test --steps 100,200 --limit 50 --out /tmp/quick --json
"""


_SERVE_HELP = "Serve a checkpoint: a web page to try it and a JSON API, with concurrent requests batched."
_SERVE_EPILOG = """\
the model and its mask VAE are chosen as by `paliseg predict`. It loads once; every batch size (1, 2, 4,
... --max-batch) is compiled before the port opens (for prompts as long as the first suggested one; other
prompt lengths compile on first use, in buckets of 16 tokens).

  http://HOST:PORT/          a page: drop an image, type a prompt (the run's prompts are suggested), see each
                             object's mask, box, label and confidence; toggle them, download the mask PNG and JSON
  POST /v1/segment           multipart form: image=@FILE, prompt=TEXT (repeatable) ->
                             {"image": {"width", "height"}, "results": [{"prompt", "text", "objects": [{"label",
                             "confidence", "box": [x1, y1, x2, y2], "mask": COCO RLE, ...}], "invalid": N}]}
  GET /v1/health, /v1/info   liveness and batching counters; the model, step, prompts, VAE and limits

batching: requests that arrive within --max-wait-ms of each other are decoded together, up to --max-batch.
bad input is a 4xx JSON {"error": ...} (413 for an upload over --max-image-mb or an image over
--max-image-pixels); the server goes on. SIGINT or SIGTERM: the requests in flight finish, then exit 0.

examples:
  paliseg serve --run runs/r1 --step best
  curl -F image=@wall.jpg -F prompt="segment crack" http://127.0.0.1:8000/v1/segment
"""


def register(subparsers) -> None:
    predict = _subcommand(subparsers, "predict", _PREDICT_HELP, _PREDICT_EPILOG, run_predict)
    groups = settings.add_arguments(predict, PredictSettings)  # a flag per field (infer/config.py)
    groups[INPUTS_OUTPUTS].add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    groups[INPUTS_OUTPUTS].add_argument(
        "--beam", nargs=argparse.REMAINDER, metavar="PIPELINE_OPTION",
        help="predict on Apache Beam (infer/beam.py) with these pipeline options, the rest of the line; the files "
        "equal a run without it",
    )  # fmt: skip

    evaluate = _subcommand(subparsers, "eval", _EVAL_HELP, _EVAL_EPILOG, run_eval)
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a `paliseg train` run folder")
    groups = settings.add_arguments(evaluate, EvalSettings)
    groups[INPUTS_OUTPUTS].add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    settings.add_arguments(evaluate, ProcessSettings)

    serve = _subcommand(subparsers, "serve", _SERVE_HELP, _SERVE_EPILOG, run_serve)
    settings.add_arguments(serve, ServeSettings)


def _subcommand(subparsers, name: str, help_text: str, epilog: str, handler) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.set_defaults(run=handler)
    return parser


def load_predictor(model: ModelSettings, decoding: DecodingSettings, **options):
    """(the Predictor, the run or None) of --run/--step or --checkpoint/--preset, --tokenizer, and the VAE:
    a run's recorded one unless --vae (refused if another, unless --allow-vae-mismatch; `vae.identity`)."""
    import vae
    from infer.predictor import Predictor
    from train.run import Run
    from vae import identity

    if decoding.max_new_tokens:
        options["max_new_tokens"] = decoding.max_new_tokens
    options.update(samples=decoding.samples, temperature=decoding.temperature)
    weights = {"tokenizer": model.tokenizer, "dtype": decoding.dtype, "quantize": decoding.quantize}
    if model.run_dir is not None:
        if model.preset:
            raise ValueError("--preset goes with --checkpoint; a run records its own model config")
        run = Run(model.run_dir)
        vae_file = identity.resolve(run.vae, decoding.vae, decoding.allow_vae_mismatch, f"run {model.run_dir}")
        step = model.step or ("best" if run.best is not None else "latest")
        predictor = Predictor.from_run(run, step, vae_model=vae.load(vae_file.path), **weights, **options)
        return predictor, run
    if model.step:
        raise ValueError("--step goes with --run")
    predictor = Predictor.from_checkpoint(
        model.checkpoint, preset=model.preset, vae_model=vae.load(decoding.vae), **weights, **options
    )
    return predictor, None


def _load_predictor_only(model: ModelSettings, decoding: DecodingSettings, batch_size: int, constrain: bool | None):
    """The Predictor of `load_predictor`, as a Beam worker loads it (`infer.beam`)."""
    return load_predictor(model, decoding, batch_size=batch_size, constrain=constrain)[0]


def run_predict(args: argparse.Namespace) -> int:
    from infer import outputs
    from paliseg import console

    config = settings.from_args(args, PredictSettings)
    jobs = outputs.jobs_for(config.image, config.prompt)  # bad input fails before the model loads
    if args.beam is not None:
        import functools

        from infer import beam

        constrain = None if config.constrain else False
        load = functools.partial(_load_predictor_only, config.model, config.decoding, config.batch_size, constrain)
        result = beam.predict_set(config, jobs, load, args.beam)  # each worker loads the model
        console.report(result, _predict_text(result), args.json)
        return 0
    predictor, _ = load_predictor(
        config.model, config.decoding, batch_size=config.batch_size, constrain=None if config.constrain else False
    )
    console.info(f"predict: {len(jobs)} image/prompt pair(s) with {predictor.source}")
    if config.out is None:
        predictions = predictor.predict([job.image_path for job in jobs], [job.prompt for job in jobs])
        result = {"model": predictor.source, "results": [
            {"name": job.name, **prediction.to_json()} for job, prediction in zip(jobs, predictions)
        ]}  # fmt: skip
    else:
        result = outputs.predict_set(predictor, jobs, config.out, canvases=config.canvas, overwrite=config.overwrite)
    console.report(
        result, "\n".join(r["text"] for r in result["results"]) if config.raw else _predict_text(result), args.json
    )
    return 0


def _predict_text(result: dict) -> str:
    lines = []
    for item in result["results"][:20]:
        status = "INVALID" if not item["valid"] else f"{len(item['objects'])} object(s), {item['area']} px"
        confidences = [o["confidence"] for o in item["objects"] if o["confidence"] is not None]
        if confidences:
            status += ", confidence " + " ".join(f"{c:.2f}" for c in confidences)
        score = f", IoU {item['score']['iou']:.3f}" if item["score"] else ""
        text = item["text"] if len(item["text"]) <= 160 else item["text"][:160] + " ..."
        lines.append(f"{item['name']}: {status}{score}\n    text: {text or '(empty: no object)'}")
    if len(result["results"]) > 20:
        lines.append(f"... and {len(result['results']) - 20} more (see {result['out']}/json/)")
    lines.append(
        f"{result['predicted']} predicted in {result['seconds']:.1f} s, {len(result['skipped'])} skipped, "
        f"{result['invalid_predictions']} invalid; files in {result['out']}/ (masks/, objects/, json/, canvases/, "
        "predictions.jsonl, coco_results.json)"
    )
    if result["summary"] is not None:
        overall = result["summary"]["overall"]
        lines.append(f"against the records' ground truth: mIoU {overall['miou']:.4f}, mDice {overall['mdice']:.4f}")
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    from infer import sweep
    from paliseg import console
    from train import sharding

    config = settings.from_args(args, EvalSettings, run_dir=args.run_dir)
    sharding.join_processes(settings.from_args(args, ProcessSettings))
    report = sweep.evaluate_run(config)
    if report is None:  # another process than 0: it decoded its share, process 0 wrote the report
        return 0
    console.report(report, _eval_text(report, config.out), args.json)
    return 0


def _eval_text(report: dict, out: Path) -> str:
    from train.run import BEST_FILE

    lines = []
    metric = report["metric"]
    for step in report["steps"]:
        if step["status"] != "ok":
            lines.append(f"step {step['step']:>6}: FAILED ({step['error']})")
            continue
        overall = step["summary"]["overall"]
        lines.append(f"step {step['step']:>6}: {metric} {overall[metric]:.4f}  mIoU {overall['miou']:.4f}  "
                     f"invalid {overall['invalid']}  (decoded {step['decoded']}, cached {step['cached']})")  # fmt: skip
    if report["ceiling"] is not None:
        lines.append(f"ceiling    : {metric} {report['ceiling']['overall'][metric]:.4f}  (token round trip)")
    best = report["best"]
    lines.append(
        f"best: step {best['step']} ({metric} {best['value']:.4f}), written to {Path(report['run_dir']) / BEST_FILE}"
        if best
        else "no checkpoint could be scored: no best step recorded"
    )
    if report["skipped"]:
        lines.append(f"{len(report['skipped'])} record(s) skipped: {report['skipped_by_reason']}")
    lines.append(f"report: {out}/report.md")
    return "\n".join(lines)


def run_serve(args: argparse.Namespace) -> int:
    from infer import serve
    from paliseg import console
    from vae import identity

    config = settings.from_args(args, ServeSettings)
    predictor, run = load_predictor(config.model, config.decoding, batch_size=config.server.max_batch)
    prompts = list(dict.fromkeys([*config.prompt, *(serve.run_prompts(run) if run is not None else [])]))
    vae = identity.identify(predictor.vae.source).to_json()
    console.info(f"serve: {predictor.source}, VAE {vae['sha256'][:12]}, prompts: {', '.join(prompts) or '(none)'}")
    app = serve.create_app(predictor, config.server, {"prompts": prompts, "vae": vae})
    serve.serve(app, config.host, config.port, access_log=config.access_log)
    return 0
