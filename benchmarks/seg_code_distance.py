"""Does the codebook distance `--seg-label-smoothing` spreads its mass by say which codes draw similar masks?
For N masks of a converted data folder, every one of their 16 codes is replaced by each of the 128 codes in
turn and decoded; the share of the 64x64 mask's pixels that change, averaged per (true code, replacement),
is compared with the distance between the two codes' codebook vectors (and with the distance between the
masks a uniform grid of each code draws) by Spearman rank correlation, and by how many of each code's 5
nearest codes by pixels are among its 5 nearest by the distance. The codebook's correlation is printed
last.

    .venv/bin/python benchmarks/seg_code_distance.py --data demo_out/data/shapes [--vae FILE] [--masks 24]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vae
from paliseg import tokens as codec
from vae import model as vae_model


def data_codes(data: Path, count: int) -> np.ndarray:
    """int [N, 16]: the seg codes of the first `count` objects of the folder's train records."""
    codes = []
    with open(data / "_annotations.train.jsonl") as handle:
        for line in handle:
            for parsed in codec.parse_suffix(json.loads(line)["suffix"]).objects:
                codes.append(parsed.seg)
            if len(codes) >= count:
                break
    return np.asarray(codes[:count], np.int32)


def pixel_changes(model: vae.MaskVAE, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([128, 128] mean share of pixels changed when code k is replaced by code j, [128] bool: k was seen)."""
    size = vae_model.CODEBOOK_SIZE
    total, seen = np.zeros((size, size)), np.zeros(size)
    for object_codes in codes:
        drawn = model.decode(object_codes[None])[0] > 0
        for position, code in enumerate(object_codes):
            replaced = np.repeat(object_codes[None], size, axis=0)
            replaced[:, position] = np.arange(size)
            total[code] += np.mean((model.decode(replaced) > 0) != drawn[None], axis=(1, 2))
            seen[code] += 1
    return total / np.maximum(seen, 1)[:, None], seen > 0


def nearest_overlap(reference: np.ndarray, distance: np.ndarray, rows: np.ndarray, k: int = 5) -> float:
    """Mean share of each row's k nearest others by `reference` that are among its k nearest by `distance`."""
    shares = []
    for row, code in enumerate(rows):
        by_reference = set(np.argsort(reference[row])[1 : k + 1])
        by_distance = set(np.argsort(distance[code])[1 : k + 1])
        shares.append(len(by_reference & by_distance) / k)
    return float(np.mean(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="a converted data folder (its train records)")
    parser.add_argument("--vae", help="the VAE (default: the one paliseg loads: vae-oid.npz if present, else bundled)")
    parser.add_argument("--masks", type=int, default=24, help="objects whose codes are replaced")
    args = parser.parse_args()
    model = vae.load(args.vae)
    changes, seen = pixel_changes(model, data_codes(args.data, args.masks))
    codebook = np.asarray(model.params["codebook"], np.float64)
    size = vae_model.CODEBOOK_SIZE
    uniform = model.decode(np.repeat(np.arange(size)[:, None], vae_model.TOKENS, axis=1)) > 0
    distances = {
        "codebook vectors": np.linalg.norm(codebook[:, None] - codebook[None], axis=-1),
        "uniform-grid masks": np.mean(uniform[:, None] != uniform[None], axis=(2, 3)),
    }
    rows = np.flatnonzero(seen)
    reference = changes[rows]
    others = ~np.eye(size, dtype=bool)[rows]
    print(f"{model.source}: {args.masks} objects of {args.data}, {len(rows)} distinct codes replaced by all {size}")
    print(f"pixels changed by one replaced code: median {np.median(reference[others]):.4f} of the mask")
    for name in reversed(distances):
        distance = distances[name]
        correlation = spearmanr(reference[others], distance[rows][others]).correlation
        overlap = nearest_overlap(reference, distance, rows)
        print(f"{name}: Spearman {correlation:.2f} with the pixels changed; 5 nearest shared {overlap:.2f}")


if __name__ == "__main__":
    main()
