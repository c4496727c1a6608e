"""`paliseg predict`, `paliseg eval` and `paliseg serve` (registered by paliseg.cli.main).

Only argparse and the standard library at the top: the handlers import jax, the model and the metrics.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from paliseg.config import DTYPES, QUANTIZED_DTYPES

_PREDICT_HELP = (
    "Predict boxes and full-resolution masks for images and prompts, with a run's checkpoint or any checkpoint."
)
_PREDICT_EPILOG = """\
model (one of):
  --run RUN_DIR [--step N|best|latest]   a `paliseg train` run; best = the step `paliseg eval` chose
                                         (default best, else latest); 0 = the base before fine-tuning
  --checkpoint PATH [--preset NAME] [--tokenizer TOK]   a big_vision .npz (PaliGemma 1 or 2; or its
                                         first .part0 piece; --preset, else the preset whose sizes it has),
                                         a Hugging Face folder, or a paliseg checkpoint folder

inputs:
  --image IMG|DIR|JSONL   one image, a folder of images (recursive), or annotation records (each record's
                          own prompt; its ground truth is drawn and scored; --prompt filters the records)
  --prompt TEXT           e.g. "segment crack"; repeat it to ask several prompts about every image

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
  paliseg predict --checkpoint models/paligemma2-3b-mix-224-hf --tokenizer models/paligemma_tokenizer.model \
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

examples:
  paliseg eval runs/r1 --data data/cracks --out runs/r1/eval
  paliseg eval runs/r1 --data data/cracks --split test --steps 100,200 --limit 50 --out /tmp/quick --json
"""


_SERVE_HELP = "Serve a checkpoint: a web page to try it and a JSON API, with concurrent requests batched."
_SERVE_EPILOG = """\
model: as `paliseg predict` (--run RUN_DIR [--step N|best|latest] or --checkpoint PATH [--preset NAME]
  [--tokenizer TOK]; the run's VAE unless --vae, refused if another unless --allow-vae-mismatch). It loads
  once; every batch size (1, 2, 4, ... --max-batch) is compiled before the port opens (for prompts as long
  as the first suggested one; other prompt lengths compile on first use, in buckets of 16 tokens).

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
    predict = subparsers.add_parser(
        "predict", help=_PREDICT_HELP, description=_PREDICT_HELP, epilog=_PREDICT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _model_arguments(predict)
    predict.add_argument("--image", required=True, type=Path, metavar="IMG|DIR|JSONL", help="what to predict on")
    predict.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="prompt (repeatable)")
    predict.add_argument("--out", type=Path, metavar="DIR", help="output folder (required unless --raw)")
    predict.add_argument(
        "--raw",
        action="store_true",
        help="print the decoded texts, one line per image and prompt (without --out: write nothing)",
    )
    predict.add_argument(
        "--no-constrain",
        action="store_true",
        help="decode freely (default: the segmentation grammar for prompts that start with 'segment')",
    )
    _decoding_arguments(predict)
    _dtype_argument(predict)
    _quantize_argument(predict)
    _vae_arguments(predict)
    predict.add_argument("--no-canvas", action="store_true", help="do not draw canvases")
    predict.add_argument("--overwrite", action="store_true", help="replace an earlier prediction set in --out")
    predict.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    predict.set_defaults(run=run_predict)

    evaluate = subparsers.add_parser(
        "eval", help=_EVAL_HELP, description=_EVAL_HELP, epilog=_EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a `paliseg train` run folder")
    evaluate.add_argument("--data", required=True, type=Path, metavar="DIR", help="converted data (`paliseg convert`)")
    evaluate.add_argument("--split", default="valid", help="split to score (default: valid)")
    evaluate.add_argument("--steps", default="all", metavar="all|N,M", help="checkpoints to score (default: all)")
    evaluate.add_argument("--limit", type=int, metavar="K", help="score only the first K records")
    evaluate.add_argument("--out", required=True, type=Path, metavar="REPORT_DIR", help="report folder")
    evaluate.add_argument(
        "--metric",
        default="miou",
        help="metric that picks the best checkpoint (default: miou; "
        "also mdice, ciou, box_miou, box_acc50, box_acc75, p10, p50, p90)",
    )
    _decoding_arguments(evaluate)
    _dtype_argument(evaluate)
    _quantize_argument(evaluate)
    evaluate.add_argument("--no-base", action="store_true", help="do not score step 0 (the base)")
    evaluate.add_argument("--no-ceiling", action="store_true", help="do not score the token round-trip ceiling")
    _vae_arguments(evaluate)
    evaluate.add_argument(
        "--canvases", type=int, default=4, metavar="N", help="best and worst images to draw (default 4)"
    )
    evaluate.add_argument("--overwrite", action="store_true", help="replace a report of another run in REPORT_DIR")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    evaluate.set_defaults(run=run_eval)

    serve = subparsers.add_parser(
        "serve", help=_SERVE_HELP, description=_SERVE_HELP, epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _model_arguments(serve)
    _dtype_argument(serve)
    _quantize_argument(serve)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    serve.add_argument(
        "--max-batch", type=int, default=8, metavar="B", help="requests decoded together at most (default 8)"
    )
    serve.add_argument(
        "--max-wait-ms", type=float, default=10.0, metavar="T",
        help="how long a request waits for others to share its batch (default 10)",
    )  # fmt: skip
    serve.add_argument("--max-image-mb", type=float, default=20.0, metavar="MB", help="largest upload (default 20)")
    serve.add_argument("--max-prompts", type=int, default=8, metavar="N", help="prompts per request (default 8)")
    serve.add_argument(
        "--prompt", action="append", default=[], metavar="TEXT",
        help="a prompt the page suggests (repeatable; a run's data prompts are suggested too)",
    )  # fmt: skip
    serve.add_argument(
        "--max-new-tokens", type=int, metavar="T",
        help="decoding budget per image (default: the run's --seq-len, else 128; an object is ~22 tokens)",
    )  # fmt: skip
    _vae_arguments(serve)
    serve.add_argument("--no-access-log", action="store_true", help="do not log every request")
    serve.set_defaults(run=run_serve)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--run", dest="run_dir", type=Path, metavar="RUN_DIR", help="a `paliseg train` run folder")
    model.add_argument("--checkpoint", type=Path, metavar="PATH", help="a checkpoint file or folder")
    parser.add_argument(
        "--step", metavar="N|best|latest", help="the run's step (default: best if recorded, else latest)"
    )
    parser.add_argument(
        "--preset",
        metavar="NAME",
        help="model sizes of a big_vision .npz (e.g. paligemma2-3b-224; default: the one preset they fit)",
    )
    parser.add_argument(
        "--tokenizer", type=Path, metavar="TOK", help="SentencePiece model (default: the run's or checkpoint's)"
    )


def _dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="weights and matmuls (default: the run's or preset's; bfloat16 for a Hugging Face folder); "
        "float32 decodes token for token as transformers does on a float32 checkpoint",
    )


def _quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize",
        choices=QUANTIZED_DTYPES,
        help="store the projection weights quantized as they load: int8 (per-output-channel scales) or nf4 "
        "(4-bit NormalFloat, blocks of 64); matmuls stay in --dtype (default: a run trained with --base-dtype "
        "is scored on that base, anything else unquantized)",
    )


def _decoding_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="images per decoding batch (default 8)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="T",
        help="decoding budget per image (default: the run's --seq-len, else 128; an object is ~22 tokens)",
    )


def _vae_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vae",
        type=Path,
        metavar="NPZ",
        help="mask VAE (default: the one the run's data was "
        "converted with; for a plain checkpoint models/vae-oid.npz, else the bundled one)",
    )
    parser.add_argument(
        "--allow-vae-mismatch",
        action="store_true",
        help="use --vae even though its SHA-256 differs from the recorded VAE's (a warning, not an error)",
    )


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be at least 1, got {value}")


def load_predictor(args: argparse.Namespace, **options):
    """(the Predictor, the run or None) of --run/--step or --checkpoint/--preset, --tokenizer, and the VAE:
    a run's recorded one unless --vae (refused if another, unless --allow-vae-mismatch; `vae.identity`)."""
    import vae
    from infer.predictor import Predictor
    from train.run import Run
    from vae import identity

    if args.max_new_tokens:
        options["max_new_tokens"] = args.max_new_tokens
    if args.run_dir is not None:
        if args.preset:
            raise ValueError("--preset goes with --checkpoint; a run records its own model config")
        run = Run(args.run_dir)
        vae_file = identity.resolve(run.vae, args.vae, args.allow_vae_mismatch, f"run {args.run_dir}")
        step = args.step or ("best" if run.best is not None else "latest")
        predictor = Predictor.from_run(
            run, step, tokenizer=args.tokenizer, vae_model=vae.load(vae_file.path), dtype=args.dtype,
            quantize=args.quantize, **options,
        )  # fmt: skip
        return predictor, run
    if args.step:
        raise ValueError("--step goes with --run")
    predictor = Predictor.from_checkpoint(
        args.checkpoint,
        preset=args.preset,
        tokenizer=args.tokenizer,
        vae_model=vae.load(args.vae),
        dtype=args.dtype,
        quantize=args.quantize,
        **options,
    )
    return predictor, None


def run_predict(args: argparse.Namespace) -> int:
    from infer import outputs
    from paliseg import console

    _positive(args.batch_size, "--batch-size")
    _positive(args.max_new_tokens, "--max-new-tokens")
    if args.out is None and not args.raw:
        raise ValueError("--out DIR is required (or --raw alone: print the decoded texts, write nothing)")
    jobs = outputs.jobs_for(args.image, args.prompt)  # bad input fails before the model loads
    predictor, _ = load_predictor(args, batch_size=args.batch_size, constrain=False if args.no_constrain else None)
    console.info(f"predict: {len(jobs)} image/prompt pair(s) with {predictor.source}")
    if args.out is None:
        predictions = predictor.predict([job.image_path for job in jobs], [job.prompt for job in jobs])
        result = {"model": predictor.source, "results": [
            {"name": job.name, **prediction.to_json()} for job, prediction in zip(jobs, predictions)
        ]}  # fmt: skip
    else:
        result = outputs.predict_set(predictor, jobs, args.out, canvases=not args.no_canvas, overwrite=args.overwrite)
    console.report(
        result, "\n".join(r["text"] for r in result["results"]) if args.raw else _predict_text(result), args.json
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


def parse_steps(text: str) -> str | list[int]:
    if text == "all":
        return "all"
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--steps must be 'all' or comma-separated step numbers, got {text!r}") from None


def run_eval(args: argparse.Namespace) -> int:
    from infer import sweep
    from paliseg import console

    _positive(args.batch_size, "--batch-size")
    _positive(args.max_new_tokens, "--max-new-tokens")
    _positive(args.limit, "--limit")
    report = sweep.evaluate_run(
        args.run_dir, args.data, args.out, split=args.split, steps=parse_steps(args.steps), limit=args.limit,
        metric=args.metric, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        base=not args.no_base, ceiling=not args.no_ceiling, vae_path=args.vae, canvases=args.canvases,
        overwrite=args.overwrite, allow_vae_mismatch=args.allow_vae_mismatch, dtype=args.dtype,
        quantize=args.quantize,
    )  # fmt: skip
    console.report(report, _eval_text(report, args.out), args.json)
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

    _positive(args.max_new_tokens, "--max-new-tokens")
    config = serve.ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                               max_image_mb=args.max_image_mb, max_prompts=args.max_prompts)  # fmt: skip
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {args.port}")
    predictor, run = load_predictor(args, batch_size=config.max_batch)
    prompts = list(dict.fromkeys([*args.prompt, *(serve.run_prompts(run) if run is not None else [])]))
    vae = identity.identify(predictor.vae.source).to_json()
    console.info(f"serve: {predictor.source}, VAE {vae['sha256'][:12]}, prompts: {', '.join(prompts) or '(none)'}")
    app = serve.create_app(predictor, config, {"prompts": prompts, "vae": vae})
    serve.serve(app, args.host, args.port, access_log=not args.no_access_log)
    return 0
