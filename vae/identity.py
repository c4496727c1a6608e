"""Which VAE a dataset's (and so a run's) seg tokens belong to, and the one rule that picks the VAE to load.

Seg tokens are codes of one particular VAE: decoded with another, they give other masks and wrong scores,
with no sign of it. So `paliseg convert` records the identity of its VAE (SHA-256 and the path it was found
at) in DIR/conversion.json, `paliseg train` copies it into RUN_DIR/config.json, and every command that
decodes or encodes tokens of a dataset or run calls `resolve`:

    identity = resolve(recorded, args.vae, args.allow_vae_mismatch, "run runs/r1")
    model = vae.load(identity.path)

- no `--vae`: the recorded VAE: its recorded file if it still has that digest, else models/vae-oid.npz or
  the bundled VAE if one of them has it, else an error saying which digest is needed and how to get it;
- `--vae PATH` of another digest: refused (naming both digests) unless `--allow-vae-mismatch`, which turns
  the refusal into a warning on stderr;
- nothing recorded (data converted before the record existed, a plain checkpoint): `--vae`, else the
  default location (`vae.model.default_path`), as before.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from paliseg import console, downloads, records
from vae.model import BUNDLED_VAE_PATH, RELEASED_VAE_NAME, default_path

MISMATCH_FLAG = "--allow-vae-mismatch"


class VaeMismatchError(ValueError):
    """A --vae of another digest than the one the tokens were written with."""


@dataclasses.dataclass(frozen=True)
class VaeIdentity:
    """A VAE file by content: its SHA-256, and where it was found (absolute) when it was identified."""

    sha256: str
    path: str

    def to_json(self) -> dict[str, str]:
        return {"sha256": self.sha256, "path": self.path}

    @classmethod
    def from_json(cls, data: Any, where: str) -> VaeIdentity:
        if not (isinstance(data, dict) and isinstance(data.get("sha256"), str) and isinstance(data.get("path"), str)):
            raise ValueError(f"{where}: 'vae' must be an object with the strings 'sha256' and 'path', got {data!r}")
        return cls(data["sha256"], data["path"])


def identify(path: str | os.PathLike | None = None) -> VaeIdentity:
    """The identity of the VAE `path` names, or with None the one `vae.load(None)` would load."""
    path = Path(default_path() if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: VAE file not found")
    return VaeIdentity(downloads.sha256_of(path), str(path.absolute()))


def of_data(folder: str | os.PathLike) -> VaeIdentity | None:
    """The VAE recorded in a converted folder's conversion.json; None when the folder has none (not a
    converted folder, or converted before the VAE was recorded)."""
    path = Path(folder) / records.CONVERSION_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    recorded = summary.get("vae") if isinstance(summary, dict) else None
    return None if recorded is None else VaeIdentity.from_json(recorded, str(path))


def resolve(
    recorded: VaeIdentity | None,
    requested: str | os.PathLike | None = None,
    allow_mismatch: bool = False,
    recorded_by: str = "the data",
) -> VaeIdentity:
    """The VAE to load for tokens written with the `recorded` VAE (None: unknown), given the user's --vae
    (`requested`) and --allow-vae-mismatch. `recorded_by` names the record's owner in messages."""
    if requested is not None:
        chosen = identify(requested)
        if recorded is not None and chosen.sha256 != recorded.sha256:
            mismatch = (
                f"--vae {requested} (SHA-256 {chosen.sha256}) is not the VAE that wrote the seg tokens of "
                f"{recorded_by} (SHA-256 {recorded.sha256}, recorded at {recorded.path})"
            )
            if not allow_mismatch:
                raise VaeMismatchError(
                    f"{mismatch}: their masks would be decoded wrongly. Leave out --vae to use the recorded VAE, "
                    f"or pass {MISMATCH_FLAG} if the mismatch is intended"
                )
            console.info(f"warning: {mismatch}; using it anyway ({MISMATCH_FLAG})")
        return chosen
    if recorded is None:
        return identify(None)
    candidates = [Path(recorded.path), downloads.models_dir() / RELEASED_VAE_NAME, BUNDLED_VAE_PATH]
    for candidate in dict.fromkeys(path.absolute() for path in candidates):
        if candidate.is_file() and downloads.sha256_of(candidate) == recorded.sha256:
            return VaeIdentity(recorded.sha256, str(candidate))
    raise FileNotFoundError(
        f"the seg tokens of {recorded_by} were written with the VAE of SHA-256 {recorded.sha256}, found at "
        f"{recorded.path} then; no file with that digest is there, at "
        f"{downloads.models_dir() / RELEASED_VAE_NAME} or bundled. Get it back (`paliseg vae download` if it "
        "was the released vae-oid.npz) or pass --vae PATH to a copy"
    )
