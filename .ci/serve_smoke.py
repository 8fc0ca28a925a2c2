"""CI: serve an exported model with the runtime distribution's glancefocus-serve and predict.

    python .ci/serve_smoke.py EXPORTED_DIR     (run by the runtime-only venv's python)

Standard library, numpy and Pillow only (what glancefocus-runtime installs)."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

for name in ("torch", "torchvision", "timm", "matplotlib", "mlxtend"):
    try:
        __import__(name)
    except ImportError:
        continue
    sys.exit(f"{name} is importable in the runtime-only venv: the runtime must not need it")

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
url = f"http://127.0.0.1:{port}"
serve = Path(sys.executable).with_name("glancefocus-serve")
server = subprocess.Popen([str(serve), sys.argv[1], "--port", str(port), "--threads", "1"])
try:
    for _ in range(300):
        try:
            if urllib.request.urlopen(f"{url}/healthz", timeout=1).status == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    else:
        sys.exit("glancefocus-serve did not come up")
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((120, 90)) * 255).astype(np.uint8)).save(
        buffer, "PNG")
    request = urllib.request.Request(f"{url}/v1/predict?top_k=3", data=buffer.getvalue(),
                                     headers={"Content-Type": "image/png"})
    answer = json.load(urllib.request.urlopen(request, timeout=30))
    assert {"label", "confidence", "exit_step", "macs", "boxes", "top_k"} <= set(answer), answer
    assert len(answer["top_k"]) == 3 and len(answer["boxes"]) == answer["exit_step"]
    page = urllib.request.urlopen(f"{url}/", timeout=10).read().decode()
    assert "v1/predict" in page  # the page ships with the package
    print(f"runtime-only serve: label {answer['label']}, exit step {answer['exit_step']}, "
          f"{answer['macs']} MACs")
finally:
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
os._exit(0)
