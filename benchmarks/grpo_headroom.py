"""How far GRPO could take a checkpoint on the demo's task: per class, on the synthetic valid split, the
greedy mask IoU that `paliseg eval` reports, the mean IoU of sampled completions, and the best IoU of each
image's G samples (what a policy that always drew its best sample would score).

    .venv/bin/python benchmarks/grpo_headroom.py --run demo_out/run [--step best] [--group 16] [--temperature 0.7]

GRPO moves probability toward each group's better samples, so best-of-G bounds what it can distil from
the policy it starts with; a run that only sharpens its policy shows a rising sample mean and a falling
best-of-G while the greedy score barely moves. Two answers decoding alone could give from the same samples
are scored too: the sample whose mask agrees most with the others' (minimum Bayes risk by mask IoU), and
the pixel-wise majority of the G masks (an invalid sample votes for an empty mask). Samples are drawn as
`paliseg train --objective grpo` draws them (the KV-cached decoder under the segmentation grammar) and rewarded by its reward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vae
from metrics import masks as mask_metrics
from paliseg import decoding, images
from train import data as train_data
from train import grpo, loop
from train import params as param_sets
from train import run as run_folder
from train.run import Run, data_vae
from vae import identity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run folder (e.g. a demo's run/ or a GRPO run)")
    parser.add_argument("--step", default="best", help="best, latest or a number")
    parser.add_argument("--data", help="the converted data (default: the run's first --data folder)")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--group", type=int, default=16, help="samples per image (G)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    run = Run(args.run)
    data_dir = args.data or run.train_config.data[0]
    config = run_folder.resolve_config(
        {"data": [data_dir], "split": args.split, "out": str(Path(args.run) / "headroom-unused"),
         "objective": "grpo", "init_run": args.run, "init_step": args.step, "trainable": "all", "remat": False}
    )  # fmt: skip
    model_cfg = run_folder.model_config(config).replace(remat=False)
    config = config.replace(tokenizer=loop.tokenizer_path(config, model_cfg))
    tokenizer = loop.load_tokenizer(config, model_cfg)
    data = train_data.TrainData(config, tokenizer, model_cfg.img.image_size)
    rollouts = grpo.Rollouts(config, tokenizer, data, vae.load(identity.resolve(data_vae(config.data)).path))
    params = param_sets.join(*run_folder.initial_params(config, model_cfg))
    grammar = decoding.segment_grammar(tokenizer, model_cfg.llm.vocab_size)
    ids = np.arange(len(data))
    pixels = np.stack(
        [images.preprocess(images.read_image(e.record.image_path), model_cfg.img.image_size) for e in data.examples]
    )
    classes = [e.record.prefix.removeprefix("segment ") for e in data.examples]

    def masks(sampling: decoding.Sampling, group: int) -> list[list[np.ndarray]]:
        """Per image, its `group` samples' union masks at the image's size (an invalid sample's: empty)."""
        prompts = {
            key: np.stack([rollouts.prompt(int(i))[key] for i in ids]) for key in ("tokens", "mask_ar", "mask_input")
        }
        generated = decoding.generate(
            model_cfg, params, pixels, prompts["tokens"], prompts["mask_ar"], prompts["mask_input"],
            max_new_tokens=rollouts.max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
            grammar=grammar, sampling=sampling, rng=jax.random.key(args.seed), samples_per_prompt=group,
        )  # fmt: skip
        texts = [tokenizer.decode(row) for row in np.asarray(generated.tokens)]
        sizes = [(data.examples[i].width, data.examples[i].height) for i in np.repeat(ids, group)]
        decoded = vae.texts_masks([(text, *size) for text, size in zip(texts, sizes)], rollouts.vae)
        unions = [np.zeros((h, w), bool) if d.union is None else d.union for d, (w, h) in zip(decoded, sizes)]
        return [unions[row * group : (row + 1) * group] for row in range(len(ids))]

    truths = [rollouts.ground_truth(int(i))[0] for i in ids]  # read once: every row below scores against them

    def ious(predicted: list[np.ndarray]) -> np.ndarray:
        return np.asarray([mask_metrics.iou(mask, truth) for mask, truth in zip(predicted, truths)])

    greedy = ious([group[0] for group in masks(decoding.Sampling(), 1)])
    groups = masks(decoding.Sampling(args.temperature, 1.0), args.group)
    sampled = np.stack([ious([group[g] for group in groups]) for g in range(args.group)], axis=1)
    agreement = [[[mask_metrics.iou(a, b) for b in group] for a in group] for group in groups]
    rows = {
        "greedy": greedy,
        f"sample mean (T={args.temperature})": sampled.mean(1),
        f"best of {args.group}": sampled.max(1),
        f"MBR of {args.group}": ious([group[int(np.argmax(np.sum(a, 1)))] for group, a in zip(groups, agreement)]),
        f"vote of {args.group}": ious([np.mean(group, axis=0) > 0.5 for group in groups]),
    }
    names = sorted(set(classes))
    print(f"{args.run} step {config.init_step}, {len(ids)} {args.split} images")
    print(f"{'':<24}" + "".join(f"{n:>11}" for n in [*names, "all"]))
    for label, values in rows.items():
        per_class = [np.mean([v for v, c in zip(values, classes) if c == n]) for n in names]
        print(f"{label:<24}" + "".join(f"{v:11.3f}" for v in [*per_class, values.mean()]))


if __name__ == "__main__":
    main()
