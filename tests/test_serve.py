"""glancefocus-serve: one real server (uvicorn on a free localhost port) for the module, driven
by a real HTTP client: each endpoint, answers equal to ExportedPredictor's, per-request budgets
in one batch, every bad request, a static model exported and served the same way, SIGTERM with
requests in flight, and a smoke run of benchmarks/serve_load.py."""
import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("onnxruntime")

from glancefocus_runtime import ExportedPredictor, Preprocess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import serve_load  # noqa: E402

MAX_BODY_MB = 0.25
MAX_PIXELS = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder, *options) -> tuple:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    process = subprocess.Popen(
        [sys.executable, "-m", "glancefocus_runtime.server.cli", str(folder), "--port", str(port),
         "--threads", "1", "--log-level", "info", *options],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    serve_load.wait_healthy(url, process, timeout=60)
    return process, url


def stop(process) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    return output


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """12 files of other sizes than the model's input (the boxes are mapped back to them)."""
    folder = tmp_path_factory.mktemp("serve-images")
    rng = np.random.default_rng(3)
    paths = []
    for i in range(12):
        size = (100 + 7 * i, 130 - 3 * i)
        path = folder / f"{i}.png"
        Image.fromarray((rng.random(size[::-1]) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def server(exported_demo):
    _, folder = exported_demo
    process, url = start(folder, "--max-wait-ms", "30", "--max-body-mb", str(MAX_BODY_MB),
                         "--max-pixels", str(MAX_PIXELS))
    yield folder, url
    stop(process)


def budgets(folder) -> list:
    curve = json.loads((Path(folder) / "manifest.json").read_text())["exit_curve"]
    return [curve["macs"][i] for i in (0, 9, 19)]


async def post_all(url, requests) -> list:
    """[(query, body, content type or files)] sent at once -> responses, in order."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async def one(query, body, kind):
            if kind == "multipart":
                return await client.post(f"/v1/predict{query}", files={"image": ("x.png", body)})
            return await client.post(f"/v1/predict{query}", content=body,
                                     headers={"content-type": kind})
        return await asyncio.gather(*(one(*r) for r in requests))


def near_threshold(confidence, thresholds, step) -> bool:
    return any(abs(confidence - t) < 1e-5 for t in thresholds[:step])


def test_answers_equal_the_predictors_with_budgets_mixed_in_one_batch(server, images):
    folder, url = server
    sent, want = [], []
    for budget in [None, *budgets(folder)]:
        predictor = ExportedPredictor(folder, budget=budget, top_k=3)
        for path, answer in zip(images, predictor.predict_images(images)):
            query = f"?top_k=3&budget={budget!r}" if budget else "?top_k=3"
            kind = "multipart" if len(sent) % 3 == 0 else "image/png"
            sent.append((query, path.read_bytes(), kind))
            want.append((answer, predictor.thresholds, Image.open(path).size))
    before = serve_load.scrape(url)
    responses = asyncio.run(post_all(url, sent))
    after = serve_load.scrape(url)
    # 48 requests at once, budgets mixed: they ran in shared batches
    calls = after["batch_count"] - before["batch_count"]
    assert (after["batch_sum"] - before["batch_sum"]) / calls > 2
    transform = Preprocess(json.loads((Path(folder) / "manifest.json").read_text())["preprocessing"])
    ties = 0
    for response, (answer, thresholds, size) in zip(responses, want):
        assert response.status_code == 200, response.text
        got = response.json()
        if (got["label"], got["exit_step"]) != (answer.label, answer.exit_step):
            assert near_threshold(answer.confidence, thresholds, answer.exit_step)
            ties += 1
            continue
        assert got["confidence"] == pytest.approx(answer.confidence, abs=1e-5)
        assert got["macs"] == answer.macs and got["class_name"] == answer.class_name
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in answer.top_k]
        assert got["boxes"] == transform.boxes_to_original(answer.boxes, size)
        assert got["image_size"] == list(size)
    assert ties <= 1
    steps = {r.json()["exit_step"] for r in responses}
    assert len(steps) > 1  # the budgets really differ: some exit early, some run every step


def test_model_health_metrics_and_page(server):
    folder, url = server
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    model = httpx.get(f"{url}/v1/model").json()
    assert model["classes"] == manifest["class_names"]
    assert model["macs_per_step"] == manifest["macs_per_step"]
    assert model["budget_range"] == [min(manifest["exit_curve"]["macs"]),
                                     max(manifest["exit_curve"]["macs"])]
    assert model["max_steps"] == manifest["max_steps"]
    assert model["patch_size"] == manifest["patch_size"]
    assert model["preprocessing"] == manifest["preprocessing"]
    assert model["providers"] == ["CPUExecutionProvider"]
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    metrics = httpx.get(f"{url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("glancefocus_requests_total", "glancefocus_request_seconds_bucket",
                 "glancefocus_batch_size_bucket", "glancefocus_exits_total",
                 "glancefocus_images_per_second", "glancefocus_requests_in_flight"):
        assert re.search(rf"^{name}[{{ ]", metrics.text, re.M), name
    assert re.search(r'^glancefocus_requests_total\{route="/healthz",status="200"\} [1-9]',
                     metrics.text, re.M)
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "v1/predict" in page.text and "<canvas" in page.text


@pytest.mark.parametrize("name, method, path, body, kind, status, code", [
    ("non-image", "POST", "/v1/predict", b"not an image at all", "image/png", 422, "not_an_image"),
    ("truncated", "POST", "/v1/predict", "TRUNCATED", "image/png", 422, "not_an_image"),
    ("empty", "POST", "/v1/predict", b"", "image/png", 400, "empty_body"),
    ("empty multipart", "POST", "/v1/predict", b"", "multipart", 400, "empty_body"),
    ("40000x40000 declared", "POST", "/v1/predict", serve_load.png_header(40000, 40000),
     "image/png", 413, "image_too_large"),
    ("1001x1001 declared, over --max-pixels", "POST", "/v1/predict",
     serve_load.png_header(1001, 1001), "image/png", 413, "image_too_large"),
    ("body over the limit", "POST", "/v1/predict", b"\0" * int(MAX_BODY_MB * 2**20 + 1),
     "application/octet-stream", 413, "body_too_large"),
    ("chunked body over the limit", "POST", "/v1/predict", "CHUNKED", "image/png", 413,
     "body_too_large"),
    ("text body", "POST", "/v1/predict", b"hello", "text/plain", 415, "unsupported_media_type"),
    ("budget not a number", "POST", "/v1/predict?budget=cheap", "GOOD", "image/png", 400,
     "bad_budget"),
    ("budget below the curve", "POST", "/v1/predict?budget=1000", "GOOD", "image/png", 422,
     "budget_out_of_range"),
    ("negative budget", "POST", "/v1/predict?budget=-5", "GOOD", "image/png", 400, "bad_budget"),
    ("top_k not a number", "POST", "/v1/predict?top_k=x", "GOOD", "image/png", 400, "bad_top_k"),
    ("unknown route", "GET", "/v2/predict", b"", None, 404, "not_found"),
    ("wrong method", "GET", "/v1/predict", b"", None, 405, "method_not_allowed"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(server, images, name, method, path, body,
                                                   kind, status, code):
    _, url = server
    good = images[0].read_bytes()
    if body == "GOOD":
        body = good
    elif body == "TRUNCATED":
        body = good[: len(good) // 2]
    elif body == "CHUNKED":  # no Content-Length: counted as it arrives
        body = iter([b"\0" * 65536] * int(MAX_BODY_MB * 16 + 2))
    with httpx.Client(base_url=url, timeout=30) as client:
        if kind == "multipart":
            response = client.post(path, files={"image": ("x.png", b"")})
        else:
            response = client.request(method, path, content=body or None,
                                      headers={"content-type": kind} if kind else {})
        assert response.status_code == status, response.text
        answer = response.json()
        assert answer["error"] == code and len(answer["detail"]) > 10
        if code == "budget_out_of_range":
            assert "calibrated curve spans" in answer["detail"]
        if code == "image_too_large":  # refused from the header, before decoding
            assert "declares" in answer["detail"] and "pixels" in answer["detail"]
        # the server goes on serving
        assert client.post("/v1/predict", content=good,
                           headers={"content-type": "image/png"}).status_code == 200


def test_small_images_decoded_on_the_loop_large_ones_in_the_pool(exported_demo, monkeypatch):
    from glancefocus_runtime.images import load_image
    from glancefocus_runtime.server import app

    _, folder = exported_demo
    pooled = []

    async def in_pool(function, *args):  # Starlette's run_in_threadpool, counted
        pooled.append(function.__name__)
        return function(*args)

    monkeypatch.setattr(app, "run_in_threadpool", in_pool)
    monkeypatch.setattr(app, "SMALL_BODY_BYTES", 300_000)  # 2**20: more than the test needs
    service = app.Service(app.ServeConfig(str(folder), max_pixels=MAX_PIXELS))
    try:
        rng = np.random.default_rng(5)
        for size, where in [((100, 100), []), ((256, 256), []), ((257, 256), ["decode"]),
                            ((700, 600), ["read_now"])]:  # a body over SMALL_BODY_BYTES
            pixels = (rng.random(size[::-1]) * 255).astype(np.uint8)
            body = png(Image.fromarray(pixels))
            assert (len(body) > app.SMALL_BODY_BYTES) == (where == ["read_now"])
            pooled.clear()
            image, original = asyncio.run(service.read(body))
            assert pooled == where, size
            want = service.transform(load_image(io.BytesIO(body), service.transform.mode))
            assert original == size and np.array_equal(image, want)
        # refused from the header on the loop, before anything is decoded
        for size, error in [((40000, 40000), "ImageTooLargeError"),
                            ((1001, 1000), "ImageTooLargeError")]:
            pooled.clear()
            with pytest.raises(Exception) as caught:
                asyncio.run(service.read(serve_load.png_header(*size)))
            assert type(caught.value).__name__ == error and pooled == []
        # a truncated large image fails in the pool with the same error as a small one
        for size in [(100, 100), (300, 300)]:
            body = png(Image.fromarray((rng.random(size) * 255).astype(np.uint8)))
            with pytest.raises(Exception) as caught:
                asyncio.run(service.read(body[: len(body) // 2]))
            assert type(caught.value).__name__ == "ImageReadError"
    finally:
        service.batcher.close()


def test_batcher_answers_skips_given_up_requests_and_drains_on_close(exported_demo, images):
    from glancefocus_runtime.server import app
    from glancefocus_runtime.server.batcher import Batcher, BatcherClosedError

    _, folder = exported_demo
    predictor = ExportedPredictor(folder)
    pixels = np.stack([predictor.model.transform()(path) for path in images])
    want = predictor.run(pixels)
    ran = []
    batcher = Batcher(predictor.model, max_batch=64, max_wait_s=0.2,
                      on_step=lambda sizes, finished: ran.extend(finished))

    async def main():
        futures = [batcher.submit(image, predictor.thresholds) for image in pixels]
        futures[1].cancel()  # its request gave up while the batch was forming
        app._time_out(futures[2])  # and this one's timed out
        answers = await asyncio.gather(*futures[:1], *futures[3:])
        queued = batcher.submit(pixels[0], predictor.thresholds)
        await asyncio.to_thread(batcher.close)  # answers what was queued, then stops
        with pytest.raises(BatcherClosedError):
            batcher.submit(pixels[0], predictor.thresholds)
        return answers, queued.result(), batcher.jobs

    answers, last, left = asyncio.run(main())
    for i, answer in zip([0, *range(3, len(images))], answers):
        assert (answer.label, answer.exit_step) == (want.labels[i], want.exit_steps[i])
        assert answer.confidence == pytest.approx(want.confidences[i], abs=1e-6)
    assert last.label == want.labels[0] and not left and not batcher.thread.is_alive()
    assert len(ran) == len(images) - 1  # all but the two given up, and the one queued at close


def test_batcher_answers_leave_no_reference_cycle(exported_demo, images):
    """future -> answer -> job -> future was a cycle: each request's image stayed in memory
    until the collector found it (100 MB more under load with gen-0 at 10,000)."""
    import gc
    import weakref

    from glancefocus_runtime.server.batcher import Batcher

    _, folder = exported_demo
    predictor = ExportedPredictor(folder)
    image = predictor.model.transform()(images[0])
    batcher = Batcher(predictor.model, max_wait_s=0)

    async def one():
        future = batcher.submit(image, predictor.thresholds)
        await future
        return weakref.ref(future)

    gc.collect()
    gc.disable()
    try:
        future = asyncio.run(one())
        batcher.close()  # its worker's locals held the last round's jobs
        assert future() is None  # freed by reference counting alone
    finally:
        gc.enable()


def test_gc_tuned_by_the_command_not_by_the_app(exported_demo, monkeypatch):
    import gc

    import uvicorn

    from glancefocus_runtime.server import app, cli

    _, folder = exported_demo
    before = gc.get_threshold()
    app.create_app(app.ServeConfig(str(folder)))
    assert gc.get_threshold() == before  # importing and building the app leaves gc alone
    tuned, ran = [], []
    monkeypatch.setattr(cli, "tune_gc", lambda: tuned.append(True))
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: ran.append(app))
    assert cli.main([str(folder)]) == 0 and tuned == [True] and len(ran) == 1


def test_static_baseline_exported_and_served_the_same_way(tmp_path, images):
    from glancefocus.cli import main
    from glancefocus.encoder import create_backbone
    from glancefocus.presets import get_preset

    preset = get_preset("demo")
    torch.manual_seed(0)
    backbone = create_backbone(preset["model"]["arch"], num_classes=10, in_chans=1,
                               pretrained=False).eval()
    checkpoint = tmp_path / "static.pt"
    torch.save({"format": "glancefocus-static", "model_config": preset["model"],
                "data_config": preset["data"], "state_dict": backbone.state_dict(),
                "num_classes": 10, "class_names": list("abcdefghij")}, checkpoint)
    assert main(["export", str(checkpoint), str(tmp_path / "static")]) == 0
    manifest = json.loads((tmp_path / "static" / "manifest.json").read_text())
    assert manifest["max_steps"] == 1 and manifest["exit_curve"] is None
    predictor = ExportedPredictor(tmp_path / "static")
    answers = predictor.predict_images(images[:4])
    transform = predictor.model.transform()
    with torch.no_grad():
        logits = backbone(torch.from_numpy(np.stack([transform(p) for p in images[:4]])))
    assert [a.label for a in answers] == logits.argmax(1).tolist()
    assert manifest["macs_per_step"][0] > 0 and {a.exit_step for a in answers} == {1}
    process, url = start(tmp_path / "static")
    try:
        got = httpx.post(f"{url}/v1/predict", content=images[0].read_bytes(),
                         headers={"content-type": "image/png"}).json()
        assert (got["label"], got["exit_step"]) == (answers[0].label, 1)
        # the box looked at is the whole input: the centre crop, in the file's pixels
        size = Image.open(images[0]).size
        assert got["boxes"] == transform.boxes_to_original([[0, 0, 100, 100]], size)
        assert got["boxes"][0][2] - got["boxes"][0][0] == min(size)
        assert httpx.get(f"{url}/v1/model").json()["budget_range"] is None
    finally:
        stop(process)


def test_serve_load_smoke(exported_demo, images, tmp_path):
    _, folder = exported_demo
    out = tmp_path / "load.json"
    report = serve_load.main([str(folder), "--images", str(images[0].parent), "--clients", "4",
                              "--duration", "1.5", "--warmup", "0", "--threads", "1",
                              "--budget-q", "0.5", "--bad-every", "5", "--check",
                              "--json", str(out)])
    run = report["runs"][0]
    assert json.loads(out.read_text())["runs"][0]["ok"] == run["ok"] > 0
    assert run["errors"] == {} and run["wrong"] == 0 and run["bad_not_4xx"] == {}
    assert run["bad_answered_4xx"] > 0 and report["server_alive"]
    assert run["latency_ms"]["p50"] <= run["latency_ms"]["p99"]
    assert sum(run["exits_per_step"].values()) == run["ok"] and run["mean_batch_size"] >= 1


def test_a_request_past_its_timeout_gets_503_and_the_server_serves_on(exported_demo, images):
    _, folder = exported_demo
    # an idle server waits up to 3 s for a second image: the lone request times out first
    process, url = start(folder, "--max-wait-ms", "3000", "--timeout-s", "0.3")
    try:
        began = time.perf_counter()
        lone = httpx.post(f"{url}/v1/predict", content=images[0].read_bytes(),
                          headers={"content-type": "image/png"}, timeout=30)
        waited = time.perf_counter() - began
        health = httpx.get(f"{url}/healthz", timeout=5)
    finally:
        stop(process)
    assert lone.status_code == 503 and lone.json()["error"] == "timeout"
    assert "timeout of 0.3 s" in lone.json()["detail"] and 0.3 <= waited < 2.5
    assert health.status_code == 200


def test_sigterm_answers_requests_in_flight_then_exits(exported_demo, images):
    _, folder = exported_demo
    # a long batching window holds the requests inside the server when SIGTERM comes
    process, url = start(folder, "--max-wait-ms", "1500")
    body = images[0].read_bytes()

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            tasks = [asyncio.create_task(client.post("/v1/predict", content=body,
                                                     headers={"content-type": "image/png"}))
                     for _ in range(6)]
            deadline = time.time() + 10
            while time.time() < deadline:  # until the server holds all six
                text = (await client.get("/metrics")).text
                if re.search(r"^glancefocus_requests_in_flight 6\.0", text, re.M):
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the requests never reached the server")
            process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 6
    output = stop(process)
    assert process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    assert "Application shutdown complete" in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=2)


def test_providers_fall_back_to_cpu_with_a_warning():
    import onnxruntime as ort

    from glancefocus_runtime import ProviderFallbackWarning
    from glancefocus_runtime.providers import check_session_providers, session_providers

    available = ort.get_available_providers()
    assert session_providers(ort, None) == ["CPUExecutionProvider"]
    assert session_providers(ort, ["cpu"]) == ["CPUExecutionProvider"]
    missing = "MIGraphXExecutionProvider"
    assert missing not in available
    with pytest.warns(ProviderFallbackWarning, match="MIGraphXExecutionProvider.*not available"):
        assert session_providers(ort, ["migraphx"]) == ["CPUExecutionProvider"]

    class Session:  # a provider onnxruntime accepted but could not start (e.g. CUDA libraries)
        def get_providers(self):
            return ["CPUExecutionProvider"]

    with pytest.warns(ProviderFallbackWarning, match="could not start"):
        assert check_session_providers(Session(), ["CUDAExecutionProvider", "CPUExecutionProvider"]) \
            == ["CPUExecutionProvider"]
