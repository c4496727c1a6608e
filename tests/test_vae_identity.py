"""The VAE is part of the data: `paliseg convert` records its SHA-256, `train` copies it into the run, and
`vae.identity.resolve` picks the recorded VAE whatever the current folder holds, refusing a mismatching
--vae unless --allow-vae-mismatch. (Predict and eval on a run: tests/test_infer_run.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vae
from converters import synthetic
from paliseg import downloads, records
from paliseg.cli.main import main
from train import run as run_folder
from vae import identity


@pytest.fixture(scope="module")
def vaes(tmp_path_factory) -> tuple[Path, Path]:
    """Two different random VAEs: the one the data is converted with, and another."""
    folder = tmp_path_factory.mktemp("vaes")
    return vae.write_random_npz(folder / "data-vae.npz", seed=0), vae.write_random_npz(folder / "other.npz", seed=1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, vaes) -> Path:
    """A converted folder (synthetic COCO export, 3 train + 2 valid images) written with the first VAE."""
    root = tmp_path_factory.mktemp("converted")
    config = synthetic.ShapesConfig(image_size=48, classes=("ellipse",))
    synthetic.write_synthetic_coco(root / "export", 3, 2, config, seed=0)
    assert main(["convert", str(root / "export"), "--out", str(root / "data"), "--vae", str(vaes[0])]) == 0
    return root / "data"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch, vaes) -> Path:
    """Another current folder whose models/vae-oid.npz is the other VAE (what `vae.load()` would pick)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PALISEG_MODELS", raising=False)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vae-oid.npz").write_bytes(vaes[1].read_bytes())
    return tmp_path


def test_conversion_json_records_the_vae(converted, vaes):
    recorded = json.loads((converted / records.CONVERSION_FILE).read_text())["vae"]
    assert recorded == {"sha256": downloads.sha256_of(vaes[0]), "path": str(vaes[0].absolute())}
    assert identity.of_data(converted) == identity.VaeIdentity(downloads.sha256_of(vaes[0]), str(vaes[0].absolute()))
    assert identity.VaeIdentity.from_json(recorded, "x") == identity.of_data(converted)


def test_of_data_of_legacy_and_broken_folders(tmp_path):
    assert identity.of_data(tmp_path) is None  # not a converted folder
    (tmp_path / records.CONVERSION_FILE).write_text(json.dumps({"splits": {}}))
    assert identity.of_data(tmp_path) is None  # converted before the record existed
    (tmp_path / records.CONVERSION_FILE).write_text(json.dumps({"vae": {"sha256": 3}}))
    with pytest.raises(ValueError, match=r"conversion\.json: 'vae' must be"):
        identity.of_data(tmp_path)
    (tmp_path / records.CONVERSION_FILE).write_text("{")
    with pytest.raises(ValueError, match=r"conversion\.json: not valid JSON"):
        identity.of_data(tmp_path)


def test_resolve_finds_the_recorded_vae_or_says_which_is_needed(vaes, elsewhere, tmp_path_factory, monkeypatch, capsys):
    data_vae, other = vaes
    recorded = identity.identify(data_vae)
    default = identity.identify(None)
    assert default.sha256 == downloads.sha256_of(other) and default.path == str(elsewhere / "models" / "vae-oid.npz")

    assert identity.resolve(None) == default  # nothing recorded: today's default search
    assert identity.resolve(None, data_vae) == recorded
    assert identity.resolve(recorded) == recorded  # not models/vae-oid.npz, although it exists here
    assert identity.resolve(recorded, data_vae) == recorded

    with pytest.raises(identity.VaeMismatchError) as refused:
        identity.resolve(recorded, other, recorded_by="run r1")
    message = str(refused.value)
    assert recorded.sha256 in message and default.sha256 in message and "run r1" in message
    assert "--allow-vae-mismatch" in message
    assert identity.resolve(recorded, other, allow_mismatch=True) == identity.identify(other)
    assert "warning" in capsys.readouterr().err

    moved = identity.VaeIdentity(recorded.sha256, str(tmp_path_factory.mktemp("gone") / "vae.npz"))
    (elsewhere / "models" / "vae-oid.npz").write_bytes(data_vae.read_bytes())  # e.g. downloaded again
    assert identity.resolve(moved).path == str(elsewhere / "models" / "vae-oid.npz")
    (elsewhere / "models" / "vae-oid.npz").unlink()
    monkeypatch.setattr(identity, "BUNDLED_VAE_PATH", other)  # the bundled VAE is another one too
    with pytest.raises(FileNotFoundError, match=f"{recorded.sha256}.*paliseg vae download.*--vae PATH"):
        identity.resolve(moved)


def test_train_records_the_data_vae_and_folders_must_agree(converted, vaes, tmp_path, capsys):
    recorded = identity.of_data(converted)
    assert run_folder.data_vae([str(converted)]) == recorded
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    assert run_folder.data_vae([str(legacy)]) is None
    assert f"no VAE is recorded in the conversion.json of {legacy}" in capsys.readouterr().err
    assert run_folder.data_vae([str(converted), str(legacy)]) == recorded  # the others' record is kept
    other = tmp_path / "other"
    other.mkdir()
    (other / records.CONVERSION_FILE).write_text(json.dumps({"vae": identity.identify(vaes[1]).to_json()}))
    with pytest.raises(ValueError, match=f"different VAEs.*{converted}.*{other}"):
        run_folder.data_vae([str(converted), str(other)])


def test_ceiling_uses_the_recorded_vae_from_another_folder(converted, vaes, elsewhere, capsys):
    def ceiling(*flags: str) -> tuple[int, dict | None, str]:
        code = main(["vae", "ceiling", str(converted), "--json", *flags])
        captured = capsys.readouterr()
        return code, json.loads(captured.out) if code == 0 else None, captured.err

    code, result, _ = ceiling()
    assert code == 0 and result["vae"] == str(vaes[0].absolute())  # not ./models/vae-oid.npz

    canvas = elsewhere / "canvas"
    code, _, err = ceiling("--vae", str(vaes[1]), "--canvas", str(canvas))
    assert code == 1 and not canvas.exists()
    assert downloads.sha256_of(vaes[0]) in err and downloads.sha256_of(vaes[1]) in err and "--allow-vae-mismatch" in err

    code, result, err = ceiling("--vae", str(vaes[1]), "--allow-vae-mismatch")
    assert code == 0 and result["vae"] == str(vaes[1].absolute()) and "warning" in err


def test_ceiling_of_legacy_data_uses_the_default_vae(converted, vaes, elsewhere, tmp_path, capsys):
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(converted, legacy)
    summary = json.loads((legacy / records.CONVERSION_FILE).read_text())
    del summary["vae"]
    (legacy / records.CONVERSION_FILE).write_text(json.dumps(summary))
    assert main(["vae", "ceiling", str(legacy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vae"] == str(elsewhere / "models" / "vae-oid.npz")
    assert main(["vae", "ceiling", str(legacy), "--vae", str(vaes[0]), "--json"]) == 0  # no record: any --vae
    assert json.loads(capsys.readouterr().out)["vae"] == str(vaes[0].absolute())
