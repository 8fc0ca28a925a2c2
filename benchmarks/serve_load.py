"""Load test of `glancefocus-serve`: start the server on localhost, drive it with a bounded number
of concurrent clients (keep-alive HTTP/1.1 connections on asyncio streams, on uvloop where it is
installed: under half of aiohttp's client CPU per request here, which matters when clients and
server share two cores) for a bounded time or number of requests, and report throughput,
latency percentiles, mean batch size, exits per step and errors as JSON.

    python benchmarks/serve_load.py EXPORTED_DIR --images DIR [--clients 32] [--duration 20]
        [--budget-q 0.25 0.5 | --budget MACS ...] [--max-batch 64] [--max-wait-ms 5]
        [--schedule continuous|fixed] [--threads 2] [--rate R] [--bad-every K] [--check]
        [--offline-batch 32] [--rounds K] [--json FILE]

One server per invocation (its options: --max-batch, --max-wait-ms, --schedule, --threads); one
run per budget (?budget= on the requests; --budget-q picks the calibrated curve's budget of that
q, the authors' budget parameter). Closed loop by default (each client sends its next request
when the previous is answered); --rate R sends R requests per second in total instead (open
loop, at most --clients in flight), for latency at a given load.

--bad-every K: every K-th request is a bad one (non-image, truncated, empty, a 40,000 x 40,000
header, over the body limit, a bad budget, an unknown route, in turn), each must get a 4xx;
--check: every good answer must equal ExportedPredictor's on the same file at the same budget
(label and exit step; confidence within 1e-5), counted in "wrong". The server's resident memory
(VmRSS) is read at the start, after the first warm-up and after each run (--rounds K repeats
each budget's run K times on the same server: whether memory levels off). --offline-batch B also times ExportedPredictor on the same
files at batch B, decoding included (images per second), for comparison.

The server and the clients share the machine: client CPU seconds and server CPU seconds are
reported beside wall time. Needs httpx (the test extra) and the runtime (no PyTorch).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Optional

import httpx
import numpy as np

try:
    import uvloop
except ImportError:
    uvloop = None

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder, port: int, args, extra=()) -> subprocess.Popen:
    command = [sys.executable, "-m", "glancefocus_runtime.server.cli", str(folder), "--port",
               str(port), "--max-batch", str(args.max_batch), "--max-wait-ms",
               str(args.max_wait_ms), "--schedule", args.schedule, "--log-level", "warning",
               *(["--threads", str(args.threads)] if args.threads else []), *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_healthy(f"http://127.0.0.1:{port}", process)
    return process


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}): {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"the server at {url} did not come up within {timeout:g} s")


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(url: str) -> dict:
    """The server's metrics this benchmark reads: batch size sum and count, exits per step."""
    values = {"batch_sum": 0.0, "batch_count": 0.0, "exits": {}}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("glancefocus_batch_size_sum"):
            values["batch_sum"] = float(line.split()[-1])
        elif line.startswith("glancefocus_batch_size_count"):
            values["batch_count"] = float(line.split()[-1])
        elif line.startswith("glancefocus_exits_total{"):
            step = line.split('step="')[1].split('"')[0]
            values["exits"][step] = float(line.split()[-1])
    return values


# ----------------------------------------------------------------------------------------------
# bad requests, in turn

def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none (a decompression bomb's head)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def bad_requests(good: bytes, body_limit: int) -> list:
    """[(name, method, path, body, content type)] of requests the server must refuse with a 4xx."""
    return [
        ("non_image", "POST", "/v1/predict", b"this is not an image" * 10, "image/png"),
        ("truncated", "POST", "/v1/predict", good[: max(len(good) // 3, 40)], "image/png"),
        ("empty", "POST", "/v1/predict", b"", "image/png"),
        ("declared_40000x40000", "POST", "/v1/predict", png_header(40000, 40000), "image/png"),
        ("over_body_limit", "POST", "/v1/predict", b"\0" * (body_limit + 1), "image/png"),
        ("budget_not_a_number", "POST", "/v1/predict?budget=lots", good, "image/png"),
        ("budget_below_curve", "POST", "/v1/predict?budget=1", good, "image/png"),
        ("unknown_route", "GET", "/v2/nothing", b"", None),
    ]


# ----------------------------------------------------------------------------------------------
# the client

class Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: each request written whole, its
    answer read by Content-Length (what the server sends). A connection the server closes
    (Connection: close) is opened again next time."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      content_type: Optional[str] = None) -> tuple[int, bytes]:
        """(status, body) of one request; OSError or asyncio.IncompleteReadError if the
        connection breaks."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        self.writer.writelines((head.encode("latin-1"), b"\r\n", body))
        try:
            lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            fields = dict(line.lower().split(":", 1) for line in lines[1:] if ":" in line)
            answer = await self.reader.readexactly(int(fields.get("content-length", 0)))
        except BaseException:
            self.close()
            raise
        if fields.get("connection", "").strip() == "close":
            self.close()
        return int(lines[0].split()[1]), answer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


# ----------------------------------------------------------------------------------------------
# the load

def percentiles(latencies: list) -> dict:
    if not latencies:
        return {}
    a = np.asarray(latencies) * 1000
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "max": float(a.max())}


async def drive(url: str, images: list, budget, args, expected=None, body_limit=None) -> dict:
    """Send requests until --duration or --requests runs out; returns the counts."""
    query = f"?budget={budget!r}" if budget is not None else ""
    bad = bad_requests(images[0][1], body_limit) if args.bad_every else []
    stats = {"ok": 0, "errors": {}, "bad_answered_4xx": 0, "bad_not_4xx": {}, "wrong": 0,
             "latencies": []}
    counter = iter(range(10**12))
    deadline = time.perf_counter() + args.duration
    host, port = url.split("//")[1].split(":")
    idle = [Connection(host, int(port)) for _ in range(args.clients)]  # one per client

    def error(key: str) -> None:
        stats["errors"][key] = stats["errors"].get(key, 0) + 1

    async def one(n: int) -> None:
        connection = idle.pop()
        try:
            await asyncio.wait_for(send(connection, n), 60.0)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            error(type(exc).__name__)
        finally:
            idle.append(connection)

    async def send(connection: Connection, n: int) -> None:
        if args.bad_every and n % args.bad_every == args.bad_every - 1:
            name, method, path, body, kind = bad[(n // args.bad_every) % len(bad)]
            status, data = await connection.request(method, path, body, kind)
            if 400 <= status < 500 and "error" in json.loads(data):
                stats["bad_answered_4xx"] += 1
            else:
                stats["bad_not_4xx"][name] = status
            return
        name, body, kind = images[n % len(images)]
        started = time.perf_counter()
        status, data = await connection.request("POST", f"/v1/predict{query}", body, kind)
        if status != 200:
            error(str(status))
            return
        answer = json.loads(data)
        stats["latencies"].append(time.perf_counter() - started)
        stats["ok"] += 1
        if expected is not None:
            want = expected[name]
            if (answer["label"], answer["exit_step"]) != (want["label"], want["exit_step"]) or \
                    abs(answer["confidence"] - want["confidence"]) > 1e-5:
                stats["wrong"] += 1

    def more() -> bool:
        return time.perf_counter() < deadline and (args.requests is None
                                                   or stats["sent"] < args.requests)

    stats["sent"] = 0
    if args.rate:  # open loop: arrivals at a fixed rate, at most --clients in flight
        in_flight = asyncio.Semaphore(args.clients)
        tasks = set()
        start = time.perf_counter()
        while more():
            n = next(counter)
            stats["sent"] += 1
            await in_flight.acquire()
            task = asyncio.create_task(one(n))
            task.add_done_callback(lambda t: in_flight.release())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            delay = start + stats["sent"] / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.gather(*tasks)
    else:
        async def client_loop():
            while more():
                stats["sent"] += 1
                await one(next(counter))
        await asyncio.gather(*(client_loop() for _ in range(args.clients)))
    for connection in idle:
        connection.close()
    return stats


def run_load(*arguments) -> dict:
    """drive() on uvloop where it is installed (less client CPU per request), else asyncio's."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
        return runner.run(drive(*arguments))


def read_images(folder, limit: int) -> list:
    """[(name, bytes, content type)] of the image files in `folder`, sorted, at most `limit`."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"--images {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    kinds = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
             ".webp": "image/webp", ".bmp": "image/bmp"}
    return [(str(p), p.read_bytes(), kinds[p.suffix.lower()]) for p in paths[:limit]]


def expected_answers(folder, images: list, budget, threads) -> dict:
    from glancefocus_runtime import ExportedPredictor

    predictor = ExportedPredictor(folder, budget=budget, threads=threads)
    answers = predictor.predict_images([name for name, _, _ in images])
    return {name: a.to_dict() for (name, _, _), a in zip(images, answers)}


def offline_images_per_second(folder, images: list, batch: int, budget, threads,
                              seconds: float = 5.0) -> float:
    """ExportedPredictor on the same files at batch `batch`, decoding included."""
    from glancefocus_runtime import ExportedPredictor

    predictor = ExportedPredictor(folder, budget=budget, threads=threads)
    names = [name for name, _, _ in images]
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for i in range(0, len(names), batch):
            done += len(predictor.predict_images(names[i:i + batch]))
    return done / (time.perf_counter() - started)


def budget_list(folder, args) -> list:
    if args.budget:
        return [(None, b) for b in args.budget]
    if args.budget_q:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
        curve = manifest.get("exit_curve") or {}
        if not curve.get("budgets"):
            raise SystemExit(f"{folder} has no calibrated exit curve: --budget-q needs one")
        return [(q, curve["macs"][curve["budgets"].index(q)]) for q in args.budget_q]
    return [(None, None)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exported_dir")
    p.add_argument("--images", required=True, help="a folder of image files to send")
    p.add_argument("--max-images", type=int, default=256)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per run (at most)")
    p.add_argument("--requests", type=int, default=None, help="requests per run (at most)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--budget", type=float, nargs="*", default=None)
    p.add_argument("--budget-q", type=float, nargs="*", default=None)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--schedule", choices=("continuous", "fixed"), default="continuous")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rate", type=float, default=None, help="open loop: requests per second")
    p.add_argument("--bad-every", type=int, default=0)
    p.add_argument("--check", action="store_true")
    p.add_argument("--offline-batch", type=int, default=None)
    p.add_argument("--rounds", type=int, default=1,
                   help="runs per budget on the same server (memory read after each)")
    p.add_argument("--json", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    images = read_images(args.images, args.max_images)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    body_limit = 2**20
    server = start_server(args.exported_dir, port, args, ["--max-body-mb", "1"])
    report = {"exported_dir": str(args.exported_dir), "images": len(images),
              "clients": args.clients, "rate": args.rate, "max_batch": args.max_batch,
              "max_wait_ms": args.max_wait_ms, "schedule": args.schedule,
              "threads": args.threads, "cpu_count": os.cpu_count(),
              "load_average_before": os.getloadavg(), "runs": []}
    try:
        rss_start = resident_mb(server.pid)
        for q, budget in [b for b in budget_list(args.exported_dir, args)
                          for _ in range(args.rounds)]:
            expected = (expected_answers(args.exported_dir, images, budget, args.threads)
                        if args.check else None)
            if args.warmup:
                warm = argparse.Namespace(**{**vars(args), "duration": args.warmup,
                                             "requests": None, "bad_every": 0})
                run_load(url, images, budget, warm)
                report.setdefault("server_rss_mb_after_warmup", resident_mb(server.pid))
            before, server_cpu = scrape(url), process_cpu_seconds(server.pid)
            client_cpu, started = time.process_time(), time.perf_counter()
            stats = run_load(url, images, budget, args, expected, body_limit)
            wall = time.perf_counter() - started
            after = scrape(url)
            batches = after["batch_count"] - before["batch_count"]
            exits = {step: int(after["exits"].get(step, 0) - before["exits"].get(step, 0))
                     for step in sorted(after["exits"], key=int)}
            run = {"budget_q": q, "budget_macs": budget, "requests": stats["sent"],
                   "ok": stats["ok"], "errors": stats["errors"], "wall_s": wall,
                   "throughput_rps": stats["ok"] / wall, "latency_ms": percentiles(stats["latencies"]),
                   "mean_batch_size": ((after["batch_sum"] - before["batch_sum"]) / batches
                                       if batches else None),
                   "exits_per_step": exits,
                   "server_cpu_s": process_cpu_seconds(server.pid) - server_cpu,
                   "client_cpu_s": time.process_time() - client_cpu}
            if args.bad_every:
                run.update(bad_answered_4xx=stats["bad_answered_4xx"],
                           bad_not_4xx=stats["bad_not_4xx"])
            if expected is not None:
                run["wrong"] = stats["wrong"]
            run["server_rss_mb"] = resident_mb(server.pid)
            if args.offline_batch:
                run["offline_images_per_second"] = offline_images_per_second(
                    args.exported_dir, images, args.offline_batch, budget, args.threads)
            report["runs"].append(run)
        report["server_rss_mb"] = {"start": rss_start, "end": resident_mb(server.pid)}
        report["server_alive"] = httpx.get(f"{url}/healthz").status_code == 200
    finally:
        report["server_exit_code"] = stop_server(server)
    report["load_average_after"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
