"""`glancefocus-serve EXPORTED_DIR`: serve a model written by `glancefocus export` over HTTP
(uvicorn). `glancefocus serve` runs the same code."""
from __future__ import annotations

import argparse
import gc
import logging
import sys
from typing import Optional, Sequence

DESCRIPTION = (
    "Serve an exported GFNet (a folder written by `glancefocus export`) over HTTP: POST "
    "/v1/predict (an image body or a multipart file; query budget=MACS and top_k=K), GET "
    "/v1/model, GET /healthz, GET /metrics (Prometheus) and a page to try it at GET /. Concurrent "
    "requests are batched; each image leaves its batch at the first step where it is confident "
    "by its request's budget. SIGTERM or Ctrl-C stops taking connections, answers the requests "
    "in flight and exits.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("exported_dir", metavar="EXPORTED_DIR",
                   help="a folder written by `glancefocus export` (manifest.json and graphs)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-batch", type=int, default=64, metavar="N",
                   help="most images in flight in one batch (1 turns batching off)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long the first request of an idle server waits for others to "
                        "join its batch")
    p.add_argument("--budget", type=float, default=None, metavar="MACS",
                   help="default MACs budget per image (a request's ?budget= overrides it; "
                        "default: every step for every image)")
    p.add_argument("--provider", action="append", default=None, metavar="NAME",
                   help="onnxruntime execution provider (cpu, cuda, tensorrt, coreml, openvino, "
                        "... or a full name); repeat for a preference order; one that is not "
                        "available falls back to CPU with a warning")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="onnxruntime intra-op threads (default: its own choice)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="server processes (each loads the model and batches on its own)")
    p.add_argument("--schedule", choices=("continuous", "fixed"), default="continuous",
                   help="continuous: new requests join at the glance while others are at their "
                        "focus steps; fixed: a batch runs until its last image exits")
    p.add_argument("--max-body-mb", type=float, default=20.0, metavar="MB",
                   help="largest request body accepted (413 above it)")
    p.add_argument("--max-pixels", type=int, default=50_000_000, metavar="N",
                   help="largest image accepted, as declared in its header (413 above it, "
                        "refused before decoding)")
    p.add_argument("--timeout-s", type=float, default=30.0, metavar="S",
                   help="per-request timeout, from arrival to answer (503 after it)")
    p.add_argument("--http", choices=("auto", "h11", "httptools"), default="auto",
                   help="uvicorn's HTTP parser (auto: httptools when installed, else h11)")
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="uvicorn's event loop (auto: uvloop when installed, else asyncio)")
    p.add_argument("--access-log", action="store_true",
                   help="log every request (uvicorn's access log; off: it costs throughput)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a server process.

    A request allocates hundreds of objects, nearly all freed by reference counting, so the
    default gen-0 threshold (700) ran collections that found little; gc.freeze() leaves the
    objects made so far (the imported modules, the app) out of every later collection. Under
    load (the demo model) collections cost 25-28 us a request before, 3.6 us after. Done here,
    in the command's own process, not in create_app: tests and programs that import the app
    keep their own gc settings.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as exc:
        print(f"glancefocus-serve needs the server's libraries ({exc}): pip install ./runtime "
              "or pip install 'glancefocus[serve]'", file=sys.stderr)
        return 2
    from ..manifest import ManifestError, load_manifest
    from .app import ServeConfig, config_to_environment, create_app

    try:
        load_manifest(args.exported_dir)  # a clear error now, not in a worker's traceback
        config = ServeConfig(
            exported_dir=args.exported_dir, max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms, budget=args.budget, providers=args.provider,
            threads=args.threads, schedule=args.schedule,
            max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels,
            timeout_s=args.timeout_s).check()
    except (ManifestError, ValueError) as exc:
        print(f"glancefocus-serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers > 1:  # each worker process builds its own app from the environment
        config_to_environment(config)
        app, factory = "glancefocus_runtime.server.app:app_from_environment", True
    else:
        app, factory = create_app(config), False
        tune_gc()
    uvicorn.run(app, factory=factory, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level, access_log=args.access_log, http=args.http, loop=args.loop,
                timeout_graceful_shutdown=args.timeout_s + 5)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="glancefocus-serve", description=DESCRIPTION)
    add_arguments(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
