"""setup_models.sh's downloader: resumable HTTP downloads and the checks that guard them (loopback only)."""

from __future__ import annotations

import hashlib
import http.server
import threading

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
