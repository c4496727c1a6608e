"""setup_models.sh's downloader: resumable HTTP downloads and the checks that guard them (loopback only)."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import threading
from pathlib import Path

import pytest

from paliseg import downloads
from paliseg.downloads import Asset, DownloadError

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0] or 0)
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/asset.bin"
    server.shutdown()


def test_download_resumes_from_a_partial_file_and_records_the_digest(tmp_path, server_url):
    (tmp_path / "asset.bin.part").write_bytes(PAYLOAD[:123_457])
    asset = Asset("asset.bin", "test", "test asset", url=server_url, size=len(PAYLOAD))
    path = downloads.fetch(asset, tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "asset.bin.part").exists()
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert (tmp_path / "SHA256SUMS").read_text() == f"{digest}  asset.bin\n"


def test_a_changed_file_is_refused_once_a_digest_is_recorded(tmp_path, server_url):
    asset = Asset("asset.bin", "test", "test asset", url=server_url)
    downloads.fetch(asset, tmp_path)
    (tmp_path / "asset.bin").write_bytes(b"tampered")
    with pytest.raises(DownloadError, match="differs from the one recorded"):
        downloads.fetch(asset, tmp_path)


def test_published_digest_prefix_and_size_are_checked(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_bytes(b"not the real weights")
    with pytest.raises(DownloadError, match="does not start with the published 01ec64"):
        downloads.verify(Asset(path.name, "sam", "", sha256_prefix="01ec64"), path)
    with pytest.raises(DownloadError, match="size 20 != expected 21"):
        downloads.verify(Asset(path.name, "sam", "", size=21), path)


def test_unreachable_source_is_a_clear_error_and_main_lists_what_is_missing(tmp_path, capsys):
    asset = Asset("x.bin", "test", "", url="http://127.0.0.1:9/x.bin")
    with pytest.raises(DownloadError, match="cannot connect"):
        downloads.fetch(asset, tmp_path)
    assert downloads.main(["--list", "--dir", str(tmp_path)]) == 0
    assert "missing  vae" in capsys.readouterr().out


def test_a_published_sha256_is_checked_in_full(tmp_path):
    path = tmp_path / "vae-oid.npz"
    path.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    assert downloads.verify(Asset(path.name, "vae", "", size=3, sha256=digest), path) == digest
    with pytest.raises(DownloadError, match="is not the published 000000000000"):
        downloads.verify(Asset(path.name, "vae", "", sha256="0" * 64), path)


def test_vae_oid_carries_its_published_size_and_sha256():
    [vae] = [a for a in downloads.ASSETS if a.name == "vae-oid.npz"]
    assert vae.size == 8_479_556
    assert vae.sha256 == "5586010257b8536dddefab65e7755077f21d5672d5674dacf911f73ae95a4447"


def test_paligemma2_assets_cover_pt_and_mix_from_kaggle_and_hugging_face():
    groups = {a.group: a for a in downloads.ASSETS if a.group.startswith("paligemma2-")}
    assert len(groups) == 3 * (3 + 2) * 3  # sizes x (pt resolutions + mix resolutions) x sources
    assert groups["paligemma2-3b-pt-224"].name == "paligemma2-3b-pt-224.b16.npz"
    assert groups["paligemma2-3b-pt-224"].kaggle == "google/paligemma-2/jax/paligemma2-3b-pt-224"
    assert groups["paligemma2-28b-pt-896-jax"].huggingface == "google/paligemma2-28b-pt-896-jax"
    assert groups["paligemma2-10b-mix-448-hf"].huggingface == "google/paligemma2-10b-mix-448"
    assert "paligemma2-3b-mix-896" not in groups  # mix is released at 224 and 448 only
    assert not any(a.sha256 or a.size for a in groups.values())  # none published: none invented
    assert not set(groups) & set(downloads.DEFAULT_GROUPS)


def _script(*args: str, models) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PALISEG_MODELS": str(models)}
    return subprocess.run(["bash", str(root / "setup_models.sh"), *args], capture_output=True, text=True, env=env)


def test_setup_models_dry_run_plans_offline_and_verifies_present_files(tmp_path):
    done = _script("--dry-run", "--only", "vae", "--only", "paligemma2-3b-pt-224", models=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "fetch    vae-oid.npz from https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz" in done.stdout
    assert "8,479,556 bytes; sha256 5586010257b8" in done.stdout
    assert "from kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224 (size not published; no published sha256" in (
        done.stdout
    )
    assert not any(tmp_path.iterdir())  # nothing downloaded or written
    (tmp_path / "vae-oid.npz").write_bytes(b"not the vae")
    done = _script("--dry-run", "--only", "vae", models=tmp_path)
    assert done.returncode == 1
    assert "size 11 != expected 8479556" in done.stderr


def test_setup_models_rejects_an_unknown_group(tmp_path):
    done = _script("--only", "paligemma2-3b-mix-896", models=tmp_path)
    assert done.returncode == 2
    assert "invalid choice: 'paligemma2-3b-mix-896'" in done.stderr
