"""The HTTP API (Starlette on uvicorn): POST /v1/predict, GET /v1/model, /healthz, /metrics and
the page at /.

Starlette rather than FastAPI: the API takes an image body and two query parameters, so
FastAPI's pydantic validation and OpenAPI generation would add a compiled dependency and work per
request for nothing; Starlette is the ASGI toolkit FastAPI itself is built on.

Every refused request gets a 4xx with JSON {"error": CODE, "detail": what was wrong}; the model
runs in the batcher's worker thread and image decoding (but for small images) in Starlette's
thread pool, so one slow or bad request never blocks the others.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Optional

import numpy as np
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .. import exit_rule, images
from ..images import ImageReadError, ImageTooLargeError, ImageTooSmallError
from ..predictor import ExportedPredictor, top_classes
from .batcher import SCHEDULES, Batcher, BatcherClosedError
from .metrics import ServerMetrics

log = logging.getLogger("glancefocus_runtime.server")

SMALL_IMAGE_PIXELS = 256 * 256
"""Images declaring at most this many pixels are decoded on the event loop (Service.read)."""
SMALL_BODY_BYTES = 2**20
"""Larger bodies are opened in the thread pool, whatever size they declare."""
BODY = "the request body"

CONFIG_ENVIRONMENT = "GLANCEFOCUS_SERVE_CONFIG"
"""uvicorn's worker processes read their ServeConfig (JSON) from this variable."""


@dataclass
class ServeConfig:
    """What `glancefocus-serve` takes (see its --help)."""

    exported_dir: str
    max_batch: int = 64
    max_wait_ms: float = 5.0
    budget: Optional[float] = None      # default MACs budget (None: every step, unless asked)
    providers: Optional[list] = None    # onnxruntime execution providers, best first
    threads: Optional[int] = None       # onnxruntime intra-op threads
    schedule: str = "continuous"
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000        # declared in the header; checked before decoding
    timeout_s: float = 30.0             # per request, from arrival to answer

    def check(self) -> "ServeConfig":
        problems = []
        if self.max_batch < 1:
            problems.append(f"max_batch must be >= 1, got {self.max_batch}")
        if not self.max_wait_ms >= 0:
            problems.append(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}")
        for name in ("max_body_bytes", "max_pixels", "timeout_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RequestError(HTTPException):
    """A refused request: status, a short code and a sentence naming the problem."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(status, detail)
        self.code = code


# ----------------------------------------------------------------------------------------------
# the service: the model, its batcher and what the routes share

class Service:
    def __init__(self, config: ServeConfig):
        self.config = config.check()
        self.predictor = ExportedPredictor(config.exported_dir, budget=config.budget,
                                           threads=config.threads, providers=config.providers)
        self.model = self.predictor.model
        self.transform = self.model.transform()
        self.metrics = ServerMetrics()
        self.batcher = Batcher(self.model, config.max_batch, config.max_wait_ms / 1000.0,
                               config.schedule, on_step=self.metrics.on_step)
        self.thresholds_cache: dict = {}
        log.info("serving %s (%d steps, %d classes) on %s, batches of up to %d, %s schedule",
                 config.exported_dir, self.model.max_steps, self.model.num_classes,
                 ", ".join(self.model.providers), config.max_batch, config.schedule)

    def thresholds(self, budget: Optional[float]) -> tuple[np.ndarray, Optional[str]]:
        """[T] thresholds at a budget (None: the server's default) and a warning, if any."""
        if budget not in self.thresholds_cache:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", exit_rule.BudgetAboveCurveWarning)
                thresholds = self.predictor.thresholds_for_budget(budget)
            warning = str(caught[0].message) if caught else None
            self.thresholds_cache[budget] = (thresholds, warning)
        return self.thresholds_cache[budget]

    async def read(self, body: bytes) -> tuple[np.ndarray, tuple]:
        """Request body -> (model input [C, H, W], original (width, height)).

        A small image is decoded right here on the event loop: for one of up to 256 x 256
        pixels the hop to a worker thread and back cost more CPU than the decode itself. A
        larger one, or a large body (whose header alone may take a while to parse), is read in
        Starlette's thread pool, so it never holds up the other requests.
        """
        if len(body) > SMALL_BODY_BYTES:
            return await run_in_threadpool(self.read_now, body)
        image = self.open(body)
        if image.width * image.height > SMALL_IMAGE_PIXELS:
            return await run_in_threadpool(self.decode, image)
        return self.decode(image)

    def read_now(self, body: bytes) -> tuple[np.ndarray, tuple]:
        return self.decode(self.open(body))

    def open(self, body: bytes) -> Image.Image:
        """The header read and the size checked (ImageTooLargeError), no pixels decoded."""
        return images.open_image(io.BytesIO(body), self.config.max_pixels, name=BODY)

    def decode(self, image: Image.Image) -> tuple[np.ndarray, tuple]:
        image = images.decode_image(image, self.transform.mode, name=BODY)
        return self.transform(image), image.size

    def describe(self) -> dict:
        model, manifest = self.model, self.model.manifest
        curve = model.exit_curve if exit_rule.has_curve(model.exit_curve) else None
        return {
            "classes": model.class_names, "num_classes": model.num_classes,
            "patch_size": manifest["patch_size"], "max_steps": model.max_steps,
            "macs_per_step": [int(m) for m in model.step_macs],
            "budget_range": [min(curve["macs"]), max(curve["macs"])] if curve else None,
            "exit_curve": ({"macs": curve["macs"], "accuracy": curve.get("accuracy")}
                           if curve else None),
            "default_budget": self.config.budget, "input": manifest["input"],
            "preprocessing": manifest["preprocessing"], "arch": manifest.get("arch"),
            "providers": model.providers,
            "serving": {"max_batch": self.config.max_batch,
                        "max_wait_ms": self.config.max_wait_ms,
                        "schedule": self.config.schedule,
                        "max_body_bytes": self.config.max_body_bytes,
                        "max_pixels": self.config.max_pixels,
                        "timeout_s": self.config.timeout_s},
        }


# ----------------------------------------------------------------------------------------------
# reading a request

def parse_budget(text: Optional[str]) -> Optional[float]:
    if text is None or text == "":
        return None
    try:
        budget = float(text)
    except ValueError:
        raise RequestError(400, "bad_budget", f"query 'budget' must be a number of MACs per "
                           f"image (e.g. 1.2e9), got {text!r}") from None
    if not math.isfinite(budget) or budget <= 0:
        raise RequestError(400, "bad_budget", f"query 'budget' must be a positive, finite "
                           f"number of MACs per image, got {text!r}")
    return budget


def parse_top_k(text: Optional[str], num_classes: int) -> int:
    if text is None or text == "":
        return 1
    try:
        top_k = int(text)
    except ValueError:
        top_k = 0
    if top_k < 1:
        raise RequestError(400, "bad_top_k", f"query 'top_k' must be an integer >= 1, got {text!r}")
    return min(top_k, num_classes)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit` bytes: Content-Length is checked
    first, and a chunked body is counted as it arrives."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(413, "body_too_large", f"the request body of {size:,}+ bytes is over "
                        f"the limit of {limit:,} bytes")


async def image_bytes(request: Request, limit: int) -> bytes:
    """The image in the body: raw (image/*, application/octet-stream or no type) or the first
    file of a multipart/form-data body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = content_type == "" or content_type.startswith("image/") or content_type in (
        "application/octet-stream", "binary/octet-stream")
    if not raw and content_type != "multipart/form-data":
        raise RequestError(415, "unsupported_media_type", "the body must be an image file "
                           "(Content-Type image/* or application/octet-stream) or "
                           f"multipart/form-data with one file, got Content-Type {content_type!r}")
    body = await read_body(request, limit)
    if raw:
        if not body:
            raise RequestError(400, "empty_body", "the request body is empty: send an image file")
        return body

    async def replay():  # the body, already read within the limit, for the form parser
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(max_files=1, max_fields=16) as form:
            files = [v for v in form.values() if hasattr(v, "read")]
            if not files:
                raise RequestError(400, "empty_body", "the multipart/form-data body holds no file:"
                                   " send the image as a file field (e.g. -F image=@photo.jpg)")
            data = await files[0].read()
    except HTTPException as exc:
        if isinstance(exc, RequestError):
            raise
        raise RequestError(400, "bad_multipart", f"cannot parse the multipart body: {exc.detail}")
    if not data:
        raise RequestError(400, "empty_body", "the uploaded file is empty")
    return data


# ----------------------------------------------------------------------------------------------
# routes

async def predict(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    service.metrics.in_flight.inc()
    try:
        return await _predict(request, service)
    finally:
        service.metrics.in_flight.dec()


async def _predict(request: Request, service: "Service") -> JSONResponse:
    started = time.perf_counter()
    budget = parse_budget(request.query_params.get("budget"))
    top_k = parse_top_k(request.query_params.get("top_k"), service.model.num_classes)
    try:
        thresholds, warning = service.thresholds(budget)
    except exit_rule.BudgetOutOfRangeError as exc:
        raise RequestError(422, "budget_out_of_range", str(exc)) from None
    body = await image_bytes(request, service.config.max_body_bytes)
    try:
        image, size = await service.read(body)
    except ImageTooLargeError as exc:
        raise RequestError(413, "image_too_large", str(exc)) from None
    except ImageTooSmallError as exc:
        raise RequestError(422, "image_too_small", str(exc)) from None
    except ImageReadError as exc:
        raise RequestError(422, "not_an_image", f"{exc} (send a file Pillow reads: JPEG, PNG, "
                           "WebP, ...)") from None
    try:
        future = service.batcher.submit(image, thresholds)
    except BatcherClosedError as exc:
        raise RequestError(503, "shutting_down", str(exc)) from None
    remaining = service.config.timeout_s - (time.perf_counter() - started)
    try:
        answer = await answer_within(future, max(remaining, 0.001))
    except asyncio.TimeoutError:  # the future is done: the batcher skips its job
        raise RequestError(503, "timeout", f"no answer within the server's per-request timeout "
                           f"of {service.config.timeout_s:g} s (the server is overloaded)") from None
    probabilities, labels = top_classes(answer.probabilities, top_k)
    names = service.model.class_names

    def name(label):
        return names[label] if names and label < len(names) else None

    result = {
        "label": answer.label, "class_name": name(answer.label),
        "confidence": answer.confidence, "exit_step": answer.exit_step, "macs": answer.macs,
        "macs_all_steps": int(service.model.step_macs[-1]),
        "top_k": [{"label": int(c), "class_name": name(int(c)), "probability": float(p)}
                  for p, c in zip(probabilities, labels)],
        "boxes": service.transform.boxes_to_original(answer.boxes, size),
        "image_size": list(size), "budget": budget if budget is not None else service.config.budget,
    }
    if warning:
        result["warning"] = warning
    return JSONResponse(result)


async def answer_within(future: asyncio.Future, seconds: float):
    """The batcher's answer, or asyncio.TimeoutError after `seconds`: a timer that fails the
    future costs less per request than asyncio.wait_for's wrapper."""
    timer = asyncio.get_running_loop().call_later(seconds, _time_out, future)
    try:
        return await future
    finally:
        timer.cancel()


def _time_out(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


async def model_info(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.service.describe())


async def healthz(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    alive = service.batcher.thread.is_alive() and not service.batcher.closed
    return JSONResponse({"status": "ok" if alive else "stopping"}, status_code=200 if alive else 503)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.service.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)


@functools.lru_cache(maxsize=1)
def _page() -> str:
    return resources.files(__package__).joinpath("static/index.html").read_text("utf-8")


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(_page())


# ----------------------------------------------------------------------------------------------
# errors and metrics around every request

async def request_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = getattr(exc, "code", None) or {404: "not_found", 405: "method_not_allowed"}.get(
        exc.status_code, "http_error")
    detail = exc.detail
    if exc.status_code == 404:
        detail = (f"no route {request.method} {request.url.path}: the API is POST /v1/predict, "
                  "GET /v1/model, GET /healthz, GET /metrics and the page at GET /")
    elif exc.status_code == 405:
        detail = f"{request.url.path} does not take {request.method}"
    return JSONResponse({"error": code, "detail": detail}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed: %s %s", request.method, request.url.path)
    return JSONResponse({"error": "internal_error", "detail": f"{type(exc).__name__}: {exc}"},
                        status_code=500)


class CountRequests:
    """ASGI middleware: each answer counted by route and status, with its latency."""

    ROUTES = ("/", "/v1/predict", "/v1/model", "/healthz", "/metrics")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            service = getattr(scope["app"].state, "service", None) if "app" in scope else None
            if service is not None:
                route = scope["path"] if scope["path"] in self.ROUTES else "other"
                service.metrics.answered(route, status[0], time.perf_counter() - started)


def create_app(config: ServeConfig) -> Starlette:
    """The Starlette app serving one exported model (loaded at startup)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.service = Service(config)
        yield
        # uvicorn has stopped taking connections and answered those in flight
        log.info("shutting down: finishing the requests in flight")
        await run_in_threadpool(app.state.service.batcher.close)

    # the router tries the routes in order: the one nearly every request takes comes first
    routes = [Route("/v1/predict", predict, methods=["POST"]), Route("/", page),
              Route("/v1/model", model_info), Route("/healthz", healthz),
              Route("/metrics", metrics)]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: request_error, Exception: server_error})
    app.add_middleware(CountRequests)
    return app


def app_from_environment() -> Starlette:
    """uvicorn's factory for `glancefocus-serve --workers N`'s processes: the config from
    $GLANCEFOCUS_SERVE_CONFIG, and the command's gc settings (cli.tune_gc)."""
    from .cli import tune_gc

    app = create_app(ServeConfig(**json.loads(os.environ[CONFIG_ENVIRONMENT])))
    tune_gc()
    return app


def config_to_environment(config: ServeConfig) -> None:
    os.environ[CONFIG_ENVIRONMENT] = json.dumps(asdict(config))
