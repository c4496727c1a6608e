"""The real model assets, where they come from, and a resumable, checked download of each.

Used by `setup_models.sh` (and `paliseg vae download`). Everything lands in `models/` beside the checkout
(or `$PALISEG_MODELS`). Checks, strongest first:
- a published SHA-256 and size (`vae-oid.npz`): verified;
- SAM files carry the first hex digits of their SHA-256 in their names (`sam_vit_h_4b8939.pth`): verified;
- the other files carry no digest here (none that could be cited; the fields stay blank rather than
  guessed): on the first complete download the SHA-256 is recorded in `models/SHA256SUMS`, so every later run
  verifies the same bytes (and a re-download that differs is reported, never silently accepted).
Downloads resume from a `.part` file and are renamed into place only when complete and checked.

PaliGemma 2 (groups `paligemma2-SIZE-KIND-RES`, none fetched by default): pt at 224/448/896 px and mix at
224/448 px, for SIZE 3b, 10b and 28b, each from three places:
- Kaggle `google/paligemma-2/jax/paligemma2-SIZE-KIND-RES`: the big_vision `paligemma2-SIZE-KIND-RES.b16.npz`
  (the handle of big_vision's colab for pt; the mix handles follow the same naming);
- Hugging Face `google/paligemma2-SIZE-KIND-RES-jax` (group suffix `-jax`): the same npz in a folder (28B as
  `.b16.npz.part*` pieces, which `paliseg` reads in place: pass the first piece or the base name);
- Hugging Face `google/paligemma2-SIZE-KIND-RES` (group suffix `-hf`): the transformers folder.
`--dry-run` prints what would be fetched from where and checks the files already present, offline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

_GCS = "https://storage.googleapis.com/big_vision"
_SAM = "https://dl.fbaipublicfiles.com/segment_anything"


@dataclasses.dataclass(frozen=True)
class Asset:
    name: str  # file name under models/
    group: str  # what `setup_models.sh --only GROUP` selects
    description: str
    url: str | None = None  # plain HTTPS download
    kaggle: str | None = None  # kagglehub model handle (big_vision npz)
    huggingface: str | None = None  # Hugging Face repo id (safetensors folder; needs a token)
    sha256_prefix: str | None = None  # published digest prefix (SAM's file names)
    size: int | None = None  # exact size in bytes where published
    sha256: str | None = None  # full published digest (None: none published; recorded on first download)

    @property
    def source(self) -> str:
        if self.url:
            return self.url
        return f"kaggle:{self.kaggle}" if self.kaggle else f"huggingface:{self.huggingface}"


def _paligemma2_assets() -> list[Asset]:
    """PaliGemma 2 (big_vision `VANITY_NAMES`, the Kaggle and Hugging Face model pages): pt at three
    resolutions, mix at two, each size from Kaggle (npz), Hugging Face JAX (npz) and Hugging Face (safetensors)."""
    assets = []
    for size in ("3b", "10b", "28b"):
        for kind, resolutions in (("pt", (224, 448, 896)), ("mix", (224, 448))):
            for res in resolutions:
                name = f"paligemma2-{size}-{kind}-{res}"
                what = f"PaliGemma 2 {size.upper()} {'pretrained' if kind == 'pt' else 'mix'}, {res} px"
                assets += [
                    Asset(f"{name}.b16.npz", name, f"{what} (big_vision npz, bf16)",
                          kaggle=f"google/paligemma-2/jax/{name}"),
                    Asset(f"{name}-jax", f"{name}-jax", f"{what} (big_vision npz folder; needs HF_TOKEN)",
                          huggingface=f"google/{name}-jax"),
                    Asset(f"{name}-hf", f"{name}-hf", f"{what} (Hugging Face safetensors; needs HF_TOKEN)",
                          huggingface=f"google/{name}"),
                ]  # fmt: skip
    return assets


ASSETS: tuple[Asset, ...] = (
    Asset(
        "paligemma_tokenizer.model",
        "tokenizer",
        "PaliGemma SentencePiece tokenizer (Gemma + loc/seg)",
        url=f"{_GCS}/paligemma_tokenizer.model",
    ),
    Asset(
        "vae-oid.npz",
        "vae",
        "big_vision mask VQ-VAE trained on OpenImages",
        url=f"{_GCS}/paligemma/vae-oid.npz",
        size=8_479_556,
        sha256="5586010257b8536dddefab65e7755077f21d5672d5674dacf911f73ae95a4447",
    ),
    Asset(
        "paligemma-3b-pt-224.f16.npz",
        "paligemma",
        "PaliGemma 3B pretrained, 224 px (big_vision npz, f16)",
        kaggle="google/paligemma/jax/paligemma-3b-pt-224",
    ),
    Asset(
        "paligemma-3b-mix-224.f16.npz",
        "paligemma",
        "PaliGemma 3B mix, 224 px (big_vision npz, f16)",
        kaggle="google/paligemma/jax/paligemma-3b-mix-224",
    ),
    Asset(
        "paligemma-3b-pt-448.f16.npz",
        "paligemma-448",
        "PaliGemma 3B pretrained, 448 px (big_vision npz, f16)",
        kaggle="google/paligemma/jax/paligemma-3b-pt-448",
    ),
    Asset(
        "paligemma-3b-pt-224-hf",
        "paligemma-hf",
        "PaliGemma 3B pretrained, 224 px (Hugging Face safetensors; needs HF_TOKEN and the accepted licence)",
        huggingface="google/paligemma-3b-pt-224",
    ),
    Asset(
        "paligemma-3b-mix-224-hf",
        "paligemma-hf",
        "PaliGemma 3B mix, 224 px (Hugging Face safetensors; needs HF_TOKEN)",
        huggingface="google/paligemma-3b-mix-224",
    ),
    Asset(
        "sam_vit_h_4b8939.pth",
        "sam",
        "Segment Anything ViT-H",
        url=f"{_SAM}/sam_vit_h_4b8939.pth",
        sha256_prefix="4b8939",
    ),
    Asset(
        "sam_vit_b_01ec64.pth",
        "sam-small",
        "Segment Anything ViT-B",
        url=f"{_SAM}/sam_vit_b_01ec64.pth",
        sha256_prefix="01ec64",
    ),
    *_paligemma2_assets(),
)
DEFAULT_GROUPS = ("tokenizer", "vae", "paligemma", "sam")


def models_dir() -> Path:
    return Path(os.environ.get("PALISEG_MODELS", Path.cwd() / "models"))


class DownloadError(RuntimeError):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _recorded_digests(directory: Path) -> dict[str, str]:
    sums = directory / "SHA256SUMS"
    if not sums.exists():
        return {}
    return {
        name: digest
        for digest, name in (line.split(maxsplit=1) for line in sums.read_text().splitlines() if line.strip())
    }


def _record_digest(directory: Path, name: str, digest: str) -> None:
    from paliseg import files

    recorded = _recorded_digests(directory) | {name: digest}
    text = "".join(f"{d}  {n}\n" for n, d in sorted(recorded.items()))
    files.write_bytes(directory / "SHA256SUMS", text.encode())


def verify(asset: Asset, path: Path) -> str:
    """Check a present file; returns its digest or raises DownloadError saying what does not match."""
    if asset.size is not None and path.stat().st_size != asset.size:
        raise DownloadError(f"{path}: size {path.stat().st_size} != expected {asset.size}")
    digest = sha256_of(path)
    if asset.sha256 and digest != asset.sha256:
        raise DownloadError(f"{path}: sha256 {digest[:12]}... is not the published {asset.sha256[:12]}...")
    if asset.sha256_prefix and not digest.startswith(asset.sha256_prefix):
        raise DownloadError(f"{path}: sha256 {digest[:12]}... does not start with the published {asset.sha256_prefix}")
    recorded = _recorded_digests(path.parent).get(asset.name)
    if recorded and recorded != digest:
        raise DownloadError(
            f"{path}: sha256 {digest[:12]}... differs from the one recorded in SHA256SUMS ({recorded[:12]}...)"
        )
    return digest


def _http_download(url: str, target: Path) -> None:
    part = target.with_name(target.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as error:
        if error.code == 416:  # the .part is already complete
            part.rename(target)
            return
        raise DownloadError(f"{url}: HTTP {error.code}") from error
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(f"{url}: cannot connect ({error})") from error
    from paliseg import console

    with response:
        resumed = response.status == 206
        total = int(response.headers.get("Content-Length", 0)) + (start if resumed else 0)
        bar = console.progress_bar(target.name, total=total or None, unit="B")
        bar.update(start if resumed else 0)
        with open(part, "ab" if resumed else "wb") as handle:
            for block in iter(lambda: response.read(1 << 20), b""):
                handle.write(block)
                bar.update(len(block))
        bar.close()
    if total and part.stat().st_size != total:
        raise DownloadError(f"{url}: got {part.stat().st_size} of {total} bytes; run again to resume")
    part.rename(target)


def _hub_download(asset: Asset, target: Path) -> None:
    try:
        if asset.kaggle:
            import kagglehub

            folder = Path(kagglehub.model_download(asset.kaggle))
            source = next(folder.rglob(asset.name), None) or next(folder.rglob("*.npz"), None)
            if source is None:
                raise DownloadError(f"kaggle {asset.kaggle}: no .npz in {folder}")
            target.symlink_to(source.resolve())
        else:
            import huggingface_hub

            huggingface_hub.snapshot_download(asset.huggingface, local_dir=target)
    except ImportError as error:
        raise DownloadError(f"{asset.name}: {error.name} is not installed (run setup_env.sh)") from error
    except DownloadError:
        raise
    except Exception as error:  # hub clients raise many types; the message is what the user needs
        raise DownloadError(f"{asset.name}: {type(error).__name__}: {error}") from error


def fetch(asset: Asset, directory: Path) -> Path:
    """Download `asset` into `directory` unless present; verify it either way."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / asset.name
    if not target.exists():
        if asset.url:
            _http_download(asset.url, target)
        else:
            _hub_download(asset, target)
    if target.is_file():
        _record_digest(directory, asset.name, verify(asset, target))
    return target


def status(directory: Path) -> list[tuple[Asset, bool]]:
    return [(asset, (directory / asset.name).exists()) for asset in ASSETS]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="setup_models.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--list", action="store_true", help="show which assets are present and exit")
    groups = sorted({a.group for a in ASSETS})
    parser.add_argument(
        "--only",
        action="append",
        choices=groups,
        metavar="GROUP",
        help=f"asset group to fetch, repeatable (default: {', '.join(DEFAULT_GROUPS)}); one of: "
        + ", ".join(g for g in groups if not g.startswith("paligemma2-"))
        + ", paligemma2-{3b,10b,28b}-pt-{224,448,896}[-jax|-hf], paligemma2-{3b,10b,28b}-mix-{224,448}[-jax|-hf]",
    )
    parser.add_argument("--dir", type=Path, default=None, help="target folder (default: ./models or $PALISEG_MODELS)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be fetched from where, and verify the files already present; no network",
    )
    args = parser.parse_args(argv)
    directory = args.dir or models_dir()
    if args.list:
        for asset, present in status(directory):
            print(f"{'present' if present else 'missing':8} {asset.group:26} {asset.name:34} {asset.description}")
        return 0
    selected = [a for a in ASSETS if a.group in (args.only or DEFAULT_GROUPS)]
    failed = []
    for asset in selected:
        try:
            if args.dry_run:
                print(_plan(asset, directory))
            else:
                print(f"{asset.name}: {fetch(asset, directory)}", file=sys.stderr)
        except DownloadError as error:
            failed.append(f"{asset.name} ({error})")
    if failed:
        print(
            "setup_models.sh: these assets are missing or fail their checks:\n  " + "\n  ".join(failed), file=sys.stderr
        )
        print(
            "Without them `paliseg demo` and the tests still run: they use the bundled tiny tokenizer, the bundled VAE and models trained here.",
            file=sys.stderr,
        )
        return 1
    return 0


def _plan(asset: Asset, directory: Path) -> str:
    """One `--dry-run` line: a present file verified (raises DownloadError), or where a missing one comes from."""
    target = directory / asset.name
    if target.is_file():
        verify(asset, target)
        return f"present  {asset.name}: verified"
    if target.exists():
        return f"present  {asset.name}"
    size = f"{asset.size:,} bytes" if asset.size else "size not published"
    digest = f"sha256 {asset.sha256}" if asset.sha256 else (
        f"sha256 {asset.sha256_prefix}..." if asset.sha256_prefix else "no published sha256 (recorded on download)"
    )  # fmt: skip
    return f"fetch    {asset.name} from {asset.source} ({size}; {digest})"


if __name__ == "__main__":
    sys.exit(main())
