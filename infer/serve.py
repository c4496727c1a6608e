"""`paliseg serve`: one loaded model behind a web page and a JSON API; concurrent requests decoded together.

    GET  /             the page (`infer/web/`: plain HTML, JS and CSS from the package, nothing from the internet)
    GET  /v1/health    {"status": "ok", "in_flight": requests being answered, "decoded": {"batches", "jobs"}}
    GET  /v1/info      the model, its step, the prompts to suggest, the VAE, the batch sizes and the limits
    POST /v1/segment   a multipart form: `image` (the file) and `prompt` (text, repeatable) ->
        {"image": {"width", "height"}, "results": [{"prompt", "text", "valid", "invalid": N, "objects": [
            {"label", "confidence", "box": [x1, y1, x2, y2] (pixels), "mask": COCO RLE (full resolution),
             "area", "locs", "seg"}]}]}
      the objects of `paliseg predict --json` (`infer.prediction`), masks as RLE (`infer.outputs.rle`) instead
      of files. Bad input is a 4xx {"error": "..."}: not an image or truncated (400), no image or no prompt
      (400), too many or too long prompts (400), a body over the limit or an image of too many pixels (413),
      not a multipart form (415).

Dynamic batching (`Batcher`): one worker thread owns the language model. Each (image, prompt) pair is a job
on a queue; the worker takes the first job, waits up to `max_wait_ms` after its arrival for more (up to
`max_batch`), and decodes them in one call padded to the next of a fixed set of batch sizes (1, 2, 4, ...,
max_batch): the compiled programs are few, known, and compiled once at start-up (per prompt-length bucket, as
`Predictor`). The grammar is chosen per batch (`paliseg.decoding.predict_texts`), so jobs with and without it
are never mixed: each answer is what `paliseg predict` gives for the same image and prompt. Reading the
upload, preprocessing, the masks (VAE decode and paste-back) and their RLE run in the server's thread pool,
off the event loop and beside the worker.

Nothing a client sends names a file: uploads are decoded from memory (PIL's raster decoders only), the body is
held in memory up to its limit, and the page's assets are a fixed set of package files.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import importlib.resources
import queue
import signal
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from infer import outputs
from infer.config import ServeConfig
from infer.prediction import Prediction, from_text
from paliseg import console, decoding, images

# The upload decoders: raster formats only (PIL would hand EPS files to Ghostscript, for one).
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")  # JPEG covers MPO (phones)
# The page: the only files the server reads on a client's behalf, by these fixed names.
_ASSETS = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript"),
           "/style.css": ("style.css", "text/css")}  # fmt: skip
_FORM_OVERHEAD = 64 * 1024  # bytes of a request beyond the image: headers of the parts, the prompts


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The padded batch sizes: powers of two below `max_batch`, then `max_batch` (8 -> 1, 2, 4, 8)."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return tuple(sorted({*sizes, max_batch}))


@dataclasses.dataclass
class _Job:
    pixels: np.ndarray
    prompt: str
    grammar: bool  # decoded under the segmentation grammar (jobs of one batch agree)
    arrived: float  # time.monotonic() when submitted
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


_STOP = object()  # the queue's last item: the worker ends after the jobs before it


class Batcher:
    """The worker thread that owns the predictor's language model: `submit` jobs, get `Decoded` futures."""

    def __init__(self, predictor, max_batch: int = 8, max_wait_ms: float = 10.0):
        self.predictor = predictor
        self.sizes = batch_sizes(max_batch)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.batches = 0  # decoded batches and jobs so far: jobs / batches is the mean batch
        self.jobs = 0
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="paliseg-decode", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._worker.start()

    def grammar(self, prompt: str) -> bool:
        constrain = self.predictor.constrain
        return decoding.is_segment_prompt(prompt) if constrain is None else constrain

    def warm_up(self, prompt: str) -> None:
        """Compile the program of every batch size for `prompt`'s length bucket and grammar (before serving)."""
        size = self.predictor.config.img.image_size
        blank = np.zeros((size, size, 3), np.float32)
        for batch in self.sizes:
            self.predictor.decode_texts([blank] * batch, [prompt] * batch, batch_size=batch)

    def submit(self, pixels: np.ndarray, prompt: str) -> concurrent.futures.Future:
        """Queue one preprocessed image and prompt; the future's result is its `paliseg.decoding.Decoded`."""
        if self._closed:
            raise RuntimeError("the server is shutting down")
        job = _Job(pixels, prompt, self.grammar(prompt), time.monotonic())
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Decode the jobs already queued, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            if self._worker.is_alive():
                self._worker.join()

    def _work(self) -> None:
        waiting: collections.deque[_Job] = collections.deque()  # taken off the queue, not decoded yet
        stopping = False
        while waiting or not stopping:
            if not waiting:
                item = self._queue.get()
                if item is _STOP:
                    stopping = True
                    continue
                waiting.append(item)
            first = waiting[0]
            batch = [job for job in waiting if job.grammar == first.grammar][: self.max_batch]
            while len(batch) < self.max_batch and not stopping:
                remaining = first.arrived + self.max_wait_s - time.monotonic()
                try:  # past the deadline, take only what is already queued
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                waiting.append(item)
                if item.grammar == first.grammar:
                    batch.append(item)
            for job in batch:
                waiting.remove(job)
            self._decode(batch)

    def _decode(self, batch: list[_Job]) -> None:
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]  # not the cancelled ones
        if not batch:
            return
        size = next(size for size in self.sizes if size >= len(batch))
        try:
            decoded = self.predictor.decode_texts([j.pixels for j in batch], [j.prompt for j in batch], size)
        except Exception as error:  # the requests of this batch fail (500); the server goes on
            for job in batch:
                job.future.set_exception(error)
            return
        self.batches += 1
        self.jobs += len(batch)
        for job, item in zip(batch, decoded):
            job.future.set_result(item)


class RequestError(Exception):
    """A request the server refuses: answered `status` {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def result_json(prediction: Prediction) -> dict[str, Any]:
    """One prompt's answer: `Prediction.to_json`'s text and objects, each box as "box" and each mask as COCO
    RLE at the image's full resolution (None for a box-only object); `invalid` counts the rejected chunks."""
    objects = []
    for obj in prediction.objects:
        entry = obj.to_json()
        box = entry.pop("box_xyxy")
        objects.append({"label": entry.pop("label"), "confidence": entry.pop("confidence"), "box": box,
                        "mask": None if obj.mask is None else outputs.rle(obj.mask), **entry})  # fmt: skip
    return {"prompt": prediction.prompt, "text": prediction.text, "valid": prediction.valid,
            "objects": objects, "invalid": prediction.invalid_count}  # fmt: skip


class _MemoryForm(MultiPartParser):
    """Starlette's multipart parser with file parts kept in memory (the body is there already, bounded)."""

    def __init__(self, *args, spool_max_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.spool_max_size = spool_max_size


async def _body(request: Request, limit: int) -> bytes:
    """The whole request body; 413 as soon as it is known to exceed `limit` bytes."""
    too_large = RequestError(413, f"the request is over the limit of {limit:,} bytes (an image of at most "
                             f"{(limit - _FORM_OVERHEAD) / 2**20:g} MB; the server's --max-image-mb)")  # fmt: skip
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _form(request: Request, config: ServeConfig) -> tuple[bytes, str, list[str]]:
    """(image bytes, its file name, prompts) of a /v1/segment request, or a RequestError saying what is wrong."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise RequestError(415, "send a multipart/form-data form: image=@FILE and prompt=TEXT (repeatable)")
    body = await _body(request, config.max_image_bytes + _FORM_OVERHEAD)
    if not body:
        raise RequestError(400, "empty request body: send a form with image=@FILE and prompt=TEXT")

    async def replay() -> AsyncIterator[bytes]:
        yield body

    parser = _MemoryForm(request.headers, replay(), max_files=1, max_fields=config.max_prompts + 8,
                         max_part_size=_FORM_OVERHEAD, spool_max_size=len(body))  # fmt: skip
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise RequestError(400, f"malformed form ({error.message}); at most one image and "
                           f"{config.max_prompts} prompts of {config.max_prompt_chars} characters") from None  # fmt: skip
    try:
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise RequestError(400, "no image: send the picture as the file field 'image' (image=@FILE)")
        data = await image.read()
        if not data:
            raise RequestError(400, f"the image {_shown(image.filename)} is empty (0 bytes)")
        prompts = form.getlist("prompt")
        if not prompts:
            raise RequestError(400, "no prompt: add the text field 'prompt' (e.g. prompt='segment crack')")
        if len(prompts) > config.max_prompts:
            raise RequestError(400, f"{len(prompts)} prompts; at most {config.max_prompts} per request")
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise RequestError(400, "each prompt must be non-empty text (a field, not a file)")
            if len(prompt) > config.max_prompt_chars:
                raise RequestError(400, f"a prompt of {len(prompt)} characters; at most {config.max_prompt_chars}")
        return data, _shown(image.filename), prompts
    finally:
        await form.close()


def _shown(filename: str | None) -> str:
    """An upload's file name for messages only (it never names a file here)."""
    return repr((filename or "upload")[-80:])


def _read_upload(data: bytes, name: str, image_size: int) -> tuple[Image.Image, np.ndarray]:
    try:
        image = images.decode_image(data, name, formats=UPLOAD_FORMATS)
    except images.ImageTooLargeError as error:
        raise RequestError(413, str(error)) from None
    except images.ImageReadError as error:
        raise RequestError(400, f"{error} (accepted: {', '.join(UPLOAD_FORMATS)})") from None
    return image, images.preprocess(image, image_size)


def create_app(predictor, config: ServeConfig, info: dict[str, Any] | None = None) -> FastAPI:
    """The web app around a loaded `infer.Predictor`. `info`: what /v1/info tells beyond the model's source
    and step (e.g. "prompts": suggestions for the page, "vae": the VAE's identity). Its lifespan starts the
    batching worker (and compiles every batch size) and stops it after the last request."""
    batcher = Batcher(predictor, config.max_batch, config.max_wait_ms)
    info = dict(info or {})
    prompts = list(info.pop("prompts", []))
    in_flight = 0

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        started = time.perf_counter()
        batcher.start()
        await run_in_threadpool(batcher.warm_up, prompts[0] if prompts else "segment object")
        console.info(f"serve: batch sizes {', '.join(map(str, batcher.sizes))} compiled in "
                     f"{time.perf_counter() - started:.1f} s")  # fmt: skip
        yield
        batcher.close()

    app = FastAPI(title="paliseg serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        console.info(f"serve: {request.url.path} failed: {type(error).__name__}: {error}")
        return JSONResponse({"error": f"internal error: {type(error).__name__}: {error}"}, status_code=500)

    for route, (name, media_type) in _ASSETS.items():

        def asset(name: str = name, media_type: str = media_type) -> Response:
            content = importlib.resources.files("infer").joinpath("web", name).read_bytes()
            return Response(content, media_type=media_type, headers={"cache-control": "no-cache"})

        app.add_api_route(route, asset, methods=["GET"], include_in_schema=False)

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "in_flight": in_flight, "decoded": {"batches": batcher.batches, "jobs": batcher.jobs}}

    @app.get("/v1/info")
    def about() -> dict[str, Any]:
        return {
            "model": predictor.source,
            "step": predictor.step,
            "prompts": prompts,
            **info,
            "image_size": predictor.config.img.image_size,
            "max_new_tokens": predictor.max_new_tokens,
            "batch_sizes": list(batcher.sizes),
            "max_wait_ms": config.max_wait_ms,
            "limits": {"max_image_bytes": config.max_image_bytes, "max_image_pixels": images.max_image_pixels(),
                       "max_prompts": config.max_prompts, "max_prompt_chars": config.max_prompt_chars},
        }  # fmt: skip

    @app.post("/v1/segment")
    async def segment(request: Request) -> dict[str, Any]:
        nonlocal in_flight
        in_flight += 1
        try:
            data, name, prompts = await _form(request, config)
            image, pixels = await run_in_threadpool(_read_upload, data, name, predictor.config.img.image_size)
            futures = [asyncio.wrap_future(batcher.submit(pixels, prompt)) for prompt in prompts]
            decoded = await asyncio.gather(*futures)

            def answers() -> list[dict[str, Any]]:
                return [
                    result_json(from_text(d.text, p, image.width, image.height, predictor.vae, None, d.chunk_scores))
                    for d, p in zip(decoded, prompts)
                ]

            return {
                "image": {"width": image.width, "height": image.height},
                "results": await run_in_threadpool(answers),
            }
        finally:
            in_flight -= 1

    return app


class _Server(uvicorn.Server):
    """uvicorn's server that says where it listens, and ends with exit status 0 on SIGINT/SIGTERM: uvicorn
    finishes the requests in flight, then raises the signal again (to die of it); here it is consumed."""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = next(s.getsockname() for server in self.servers for s in server.sockets)[:2]
            console.info(f"serve: listening on http://{host if ':' not in host else f'[{host}]'}:{port}/")

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True) -> None:
    """Serve `app` until SIGINT or SIGTERM, then finish the requests in flight and return."""
    config = uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level="info",
                            timeout_graceful_shutdown=None)  # fmt: skip
    _Server(config).run()


def run_prompts(run) -> list[str]:
    """The distinct prompts of a run's training data (every split), in their first order: the page's suggestions."""
    from paliseg import dataset

    found: dict[str, None] = {}
    for folder in run.train_config.data:
        try:
            for split in dataset.find_splits(folder):  # a JSONL or a TFDS folder
                found |= dict.fromkeys(r.prefix for r in dataset.read_records(folder, split))
        except (OSError, ValueError):  # data moved or changed since training: no suggestions from it
            continue
    return list(found)
