"""`paliseg serve`: the batching worker on a stub model (fast), then a real server process on a free loopback
port with a tiny trained run: its answers equal `paliseg predict`'s, bad input gets a 4xx and the server goes
on, 64 concurrent requests, a real browser on the page, and SIGTERM finishing the requests in flight."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from helpers import PROMPT, train_tiny_run
from PIL import Image

from infer import serve
from paliseg import decoding, images

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds for any one request (the first of a batch size may compile on a loaded machine)


# --- the batching worker, on a stub predictor ---------------------------------------------------------------


@dataclasses.dataclass
class StubPredictor:
    """Records each decoding call (its prompts and padded batch size); answers each prompt with itself. Each
    call sets `entered`, then waits for `gate`: a test holds the worker inside a decode while it queues jobs."""

    constrain: bool | None = None
    calls: list = dataclasses.field(default_factory=list)
    entered: threading.Event = dataclasses.field(default_factory=threading.Event)
    gate: threading.Event = dataclasses.field(default_factory=threading.Event)

    def decode_texts(self, pixels, prompts, batch_size):
        self.entered.set()
        self.gate.wait(10)
        self.calls.append((list(prompts), batch_size))
        return [decoding.Decoded(f"text of {p}", ()) for p in prompts]


def test_batch_sizes_are_powers_of_two_then_the_largest():
    assert serve.batch_sizes(1) == (1,)
    assert serve.batch_sizes(8) == (1, 2, 4, 8)
    assert serve.batch_sizes(6) == (1, 2, 4, 6)
    assert serve.batch_sizes(16) == (1, 2, 4, 8, 16)


def test_batcher_groups_queued_jobs_pads_to_a_size_and_never_mixes_grammars():
    stub = StubPredictor()
    batcher = serve.Batcher(stub, max_batch=4, max_wait_ms=0)
    batcher.start()
    pixels = np.zeros((2, 2, 3), np.float32)
    first = batcher.submit(pixels, "segment a")  # the worker takes it alone and blocks on the gate
    assert stub.entered.wait(10)
    prompts = ["segment b", "caption en", "segment c", "segment d", "segment e", "segment f", "detect g"]
    futures = [batcher.submit(pixels, p) for p in prompts]
    stub.gate.set()
    assert first.result(10).text == "text of segment a"
    assert [f.result(10).text for f in futures] == [f"text of {p}" for p in prompts]
    batcher.close()
    assert stub.calls == [
        (["segment a"], 1),
        (["segment b", "segment c", "segment d", "segment e"], 4),  # at most max_batch, grammar prompts only
        (["caption en", "detect g"], 2),  # the held-back free-decoding jobs, together
        (["segment f"], 1),
    ]
    assert (batcher.batches, batcher.jobs) == (4, 8)
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit(pixels, "segment late")


def test_batcher_waits_for_companions_and_a_failed_batch_fails_only_its_requests():
    stub = StubPredictor()
    stub.gate.set()
    batcher = serve.Batcher(stub, max_batch=8, max_wait_ms=300)
    batcher.start()
    pixels = np.zeros((2, 2, 3), np.float32)
    early = batcher.submit(pixels, "segment a")
    time.sleep(0.05)  # within the first job's wait: joins its batch
    late = batcher.submit(pixels, "segment b")
    assert early.result(10).text == "text of segment a" and late.result(10).text == "text of segment b"
    assert stub.calls == [(["segment a", "segment b"], 2)]

    def broken(pixels, prompts, batch_size):
        raise RuntimeError("out of memory")

    stub.decode_texts = broken
    with pytest.raises(RuntimeError, match="out of memory"):
        batcher.submit(pixels, "segment c").result(10)
    stub.decode_texts = StubPredictor.decode_texts.__get__(stub)
    assert batcher.submit(pixels, "segment d").result(10).text == "text of segment d"  # the worker lives on
    batcher.close()


def test_uploads_are_read_from_memory_with_the_image_reader():
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (10, 200, 30)).save(buffer, "PNG")
    png = buffer.getvalue()
    image = images.decode_image(png, "'upload.png'", formats=serve.UPLOAD_FORMATS)
    assert image.size == (30, 20) and image.mode == "RGB" and image.getpixel((0, 0)) == (10, 200, 30)
    with pytest.raises(images.ImageReadError, match=r"^'x.txt': cannot read image: cannot identify image file$"):
        images.decode_image(b"hello", "'x.txt'")
    with pytest.raises(images.ImageReadError, match="truncated"):
        images.decode_image(png[:60], "'cut.png'")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(images.ImageReadError, match="cannot identify"):  # not handed to Ghostscript
        images.decode_image(eps, "'a.eps'", formats=serve.UPLOAD_FORMATS)
    with images.pixel_limit(599), pytest.raises(images.ImageTooLargeError, match="600 pixels, over the limit of 599"):
        images.decode_image(png, "'big.png'")


# --- a real server -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path
    cwd: Path

    def post(self, image: bytes | None, prompts=(PROMPT,), filename="image.png", **kwargs) -> requests.Response:
        """A multipart form as `curl -F image=@FILE -F prompt=TEXT` sends it."""
        parts = [] if image is None else [("image", (filename, image, "image/png"))]
        parts += [("prompt", (None, p)) for p in prompts]
        return requests.post(f"{self.url}v1/segment", files=parts, timeout=TIMEOUT, **kwargs)

    def health(self) -> dict:
        return requests.get(f"{self.url}v1/health", timeout=TIMEOUT).json()

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


def start_server(run_dir: Path, cwd: Path, *flags: str) -> Server:
    """`paliseg serve` of the run's step 4 on a free port of 127.0.0.1 (--port 0; the URL from its log)."""
    cwd.mkdir(parents=True, exist_ok=True)
    log = cwd.parent / f"{cwd.name}.log"
    command = [sys.executable, "-m", "paliseg.cli.main", "--max-image-pixels", "100000", "serve", "--run",
               str(run_dir), "--step", "4", "--host", "127.0.0.1", "--port", "0", "--no-access-log", *flags]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+/)", log.read_text())
        if found:
            return Server(process, found.group(1), log, cwd)
        if process.poll() is not None:
            pytest.fail(f"paliseg serve exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.5)
    process.kill()
    pytest.fail(f"paliseg serve did not start in time:\n{log.read_text()}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data dir, a tiny run with checkpoints at steps 2 and 4, its VAE path), as tests/test_infer_run.py."""
    return train_tiny_run(tmp_path_factory.mktemp("serve_run"))


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """The served run: batches of up to 8, 1 MB uploads, 4 prompts a request, 100,000 pixels an image.
    Stopped with SIGINT at the end, which must exit 0."""
    _, run_dir, _ = trained
    started = start_server(run_dir, tmp_path_factory.mktemp("serve") / "cwd", "--max-batch", "8",
                           "--max-wait-ms", "20", "--max-image-mb", "1", "--max-prompts", "4")  # fmt: skip
    yield started
    assert started.stop(signal.SIGINT) == 0, started.log.read_text()


def _png(path: Path) -> bytes:
    return path.read_bytes()


@pytest.mark.slow
def test_health_and_info(server, trained):
    from vae import identity

    _, run_dir, vae_path = trained
    assert server.health()["status"] == "ok"
    info = requests.get(f"{server.url}v1/info", timeout=TIMEOUT).json()
    assert info["model"] == f"{run_dir} step 4" and info["step"] == 4
    assert info["prompts"] == [PROMPT]  # the run's data prompts, suggested on the page
    assert info["vae"] == identity.identify(vae_path).to_json()
    assert info["batch_sizes"] == [1, 2, 4, 8] and info["limits"]["max_prompts"] == 4


@pytest.mark.slow
def test_answers_equal_paliseg_predict(server, trained, tmp_path, capsys):
    from pycocotools import mask as coco_mask

    from paliseg.cli.main import main

    data, run_dir, _ = trained
    prompts = [PROMPT, "caption en"]  # with the grammar and without: decoded in separate batches
    compared = 0
    for index in range(3):
        path = data / "images" / f"valid_{index}.png"
        response = server.post(_png(path), prompts, filename=path.name)
        assert response.status_code == 200, response.text
        answer = response.json()
        width, height = Image.open(path).size
        assert answer["image"] == {"width": width, "height": height}
        assert [r["prompt"] for r in answer["results"]] == prompts
        for prompt, result in zip(prompts, answer["results"]):
            out = tmp_path / f"{index}-{prompt}"
            argv = ["predict", "--run", str(run_dir), "--step", "4", "--image", str(path), "--prompt", prompt,
                    "--out", str(out), "--json", "--no-canvas"]  # fmt: skip
            assert main(argv) == 0
            [expected] = json.loads(capsys.readouterr().out)["results"]
            assert result["text"] == expected["text"] and result["valid"] == expected["valid"]
            assert result["invalid"] == sum(expected["invalid"].values())
            assert len(result["objects"]) == len(expected["objects"])
            for got, want in zip(result["objects"], expected["objects"]):
                assert {k: got[k] for k in ("label", "confidence", "locs", "seg", "area")} == {
                    k: want[k] for k in ("label", "confidence", "locs", "seg", "area")
                }
                assert got["box"] == want["box_xyxy"]
                if want["mask"] is None:
                    assert got["mask"] is None
                    continue
                rle = {"size": got["mask"]["size"], "counts": got["mask"]["counts"].encode()}
                np.testing.assert_array_equal(coco_mask.decode(rle).astype(bool), images.read_mask(out / want["mask"]))
                compared += 1
    assert compared >= 3  # every image had an object with a mask to compare


BAD_REQUESTS = {
    # name: (what is sent, the status, a phrase of the error)
    "not an image": (dict(image=b"just some text, not a picture"), 400, "cannot identify image file"),
    "truncated image": ("truncated", 400, "truncated"),
    "empty image file": (dict(image=b""), 400, "empty"),
    "no image": (dict(image=None), 400, "no image"),
    "no prompt": (dict(prompts=()), 400, "no prompt"),
    "empty prompt": (dict(prompts=("  ",)), 400, "non-empty"),
    "too many prompts": (dict(prompts=(PROMPT,) * 5), 400, "5 prompts; at most 4"),
    "too long a prompt": (dict(prompts=("segment " + "x" * 200,)), 400, "at most 128"),
    "upload over the size limit": (dict(image=b"\x89PNG" + bytes(1_200_000)), 413, "over the limit"),
    "image of too many pixels": ("pixels", 413, "over the limit of 100,000"),
    "empty body": ("empty body", 400, "empty request body"),
    "not a form": ("json", 415, "multipart/form-data"),
    "malformed form": ("malformed", 400, "malformed form"),
}


@pytest.mark.slow
def test_bad_input_gets_a_4xx_and_the_server_goes_on(server, trained):
    data, _, _ = trained
    good = _png(data / "images" / "valid_0.png")
    url = f"{server.url}v1/segment"
    before = sorted(p.relative_to(server.cwd.parent) for p in server.cwd.parent.rglob("*"))
    for name, (sent, status, phrase) in BAD_REQUESTS.items():
        if sent == "truncated":
            response = server.post(good[: len(good) // 2])
        elif sent == "pixels":
            buffer = io.BytesIO()
            Image.new("RGB", (400, 300)).save(buffer, "PNG")
            response = server.post(buffer.getvalue())
        elif sent == "empty body":
            response = requests.post(url, data=b"", headers={"content-type": "multipart/form-data; boundary=x"},
                                     timeout=TIMEOUT)  # fmt: skip
        elif sent == "json":
            response = requests.post(url, json={"image": "valid_0.png", "prompt": PROMPT}, timeout=TIMEOUT)
        elif sent == "malformed":
            response = requests.post(url, data=b"--x\r\nnot a part", timeout=TIMEOUT,
                                     headers={"content-type": "multipart/form-data; boundary=x"})  # fmt: skip
        else:
            response = server.post(sent.get("image", good), sent.get("prompts", (PROMPT,)))
        assert response.status_code == status, (name, response.text)
        assert phrase in response.json()["error"], (name, response.json())
        assert server.post(good).status_code == 200, f"after {name}"  # the next good request succeeds

    # A client names no file: a path as the upload's name is only a name, the page's assets a fixed set.
    assert server.post(good, filename="../../../escape.png").status_code == 200
    for path in ("..%2F..%2Fetc%2Fpasswd", "app.js%2F..%2F..%2Fconfig.json", "static/../../etc/passwd"):
        assert requests.get(f"{server.url}{path}", timeout=TIMEOUT).status_code == 404, path
    after = sorted(p.relative_to(server.cwd.parent) for p in server.cwd.parent.rglob("*"))
    assert after == before  # nothing written beside the server (its log aside, which grows)
    assert server.process.poll() is None


@pytest.mark.slow
def test_64_concurrent_requests_from_16_threads_all_succeed_in_shared_batches(server, trained):
    data, _, _ = trained
    uploads = [_png(data / "images" / f"valid_{i % 3}.png") for i in range(64)]
    before = server.health()["decoded"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(server.post, uploads))
    assert [r.status_code for r in responses] == [200] * 64
    texts = {}
    for index, response in enumerate(responses):  # the same image gets the same answer in any batch
        texts.setdefault(index % 3, set()).add(response.json()["results"][0]["text"])
    assert all(len(found) == 1 for found in texts.values()), texts
    after = server.health()["decoded"]
    jobs, batches = after["jobs"] - before["jobs"], after["batches"] - before["batches"]
    assert jobs == 64 and batches < 64 / 2, (jobs, batches)  # decoded together: more than 2 per batch on average


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.slow
def test_the_page_in_a_real_browser(server, trained, tmp_path, record_property):
    found = _chromium()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing in CI (.ci/run installs Debian's chromium)")
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver)")
    from pycocotools import mask as coco_mask
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from infer import outputs

    data, _, _ = trained
    image = data / "images" / "valid_1.png"
    expected = server.post(_png(image)).json()["results"][0]["objects"]
    assert expected, "the run predicts no object on this image: nothing to draw"
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,800", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(server.url)
        wait = WebDriverWait(driver, 90)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prompts option"))  # /v1/info answered
        assert "step 4" in driver.find_element(By.ID, "model").text
        driver.find_element(By.ID, "file").send_keys(str(image))
        driver.find_element(By.ID, "prompt").send_keys(PROMPT)
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#overlay .tag .confidence"))
        masks = driver.find_elements(By.CSS_SELECTOR, "#overlay canvas.mask")
        labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#overlay .tag .confidence")]
        assert len(masks) == sum(o["mask"] is not None for o in expected)
        assert labels == [f"{o['confidence']:.2f}" for o in expected]
        drawn = driver.execute_script(
            "return Array.from(document.querySelectorAll('#overlay canvas.mask')).map(c => {"
            "const p = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 3; i < p.length; i += 4) n += p[i] > 0; return n; })"
        )
        assert drawn == [o["area"] for o in expected if o["mask"] is not None] and sum(drawn) > 0
        path = tmp_path / "serve_page.png"
        driver.save_screenshot(str(path))
        record_property("screenshot", str(path))
        assert Image.open(path).size[0] > 0

        # The page's RLE decoder against pycocotools on masks of many runs (long counts, negative deltas).
        rng = np.random.default_rng(0)
        for shape in ((48, 64), (300, 410), (1, 7)):
            mask = np.zeros(shape, bool)
            for _ in range(12):
                y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
                mask[y : y + rng.integers(1, 90), x : x + rng.integers(1, 120)] = True
            decoded = driver.execute_script("return Array.from(paliseg.decodeRle(arguments[0]))", outputs.rle(mask))
            assert np.array_equal(np.array(decoded, bool).reshape(shape), mask)
            assert np.array_equal(
                coco_mask.decode({**outputs.rle(mask), "counts": outputs.rle(mask)["counts"].encode()}), mask
            )

        toggle = driver.find_element(By.CSS_SELECTOR, "#objects input[type=checkbox]")
        toggle.click()
        hidden = driver.find_elements(By.CSS_SELECTOR, "#overlay [data-object='0'].hidden-object")
        assert len(hidden) == 2 + (expected[0]["mask"] is not None)  # the box, tag and mask of object 0
    finally:
        driver.quit()


@pytest.mark.slow
def test_sigterm_finishes_the_requests_in_flight_then_exits_0(trained, tmp_path):
    data, run_dir, _ = trained
    # A lone request waits 6 s for a companion (--max-wait-ms) before it is decoded: SIGTERM comes meanwhile.
    slow = start_server(run_dir, tmp_path / "cwd", "--max-batch", "2", "--max-wait-ms", "6000")
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(slow.post, _png(data / "images" / "valid_0.png"))
            deadline = time.monotonic() + 30
            while slow.health()["in_flight"] < 1 and time.monotonic() < deadline and not pending.done():
                time.sleep(0.05)
            assert not pending.done(), "the request was answered before its wait was over"
            slow.process.send_signal(signal.SIGTERM)
            response = pending.result(TIMEOUT)
        assert response.status_code == 200 and response.json()["results"][0]["prompt"] == PROMPT
        assert slow.process.wait(60) == 0, slow.log.read_text()
        assert "Finished server process" in slow.log.read_text()
    finally:
        if slow.process.poll() is None:
            slow.process.kill()
