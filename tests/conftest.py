import os
import pickle
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


class _Exploit:
    """Unpickling this creates the folder `marker`: proof that a loader ran pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def write_crafted_pickle():
    """write(path, marker, key): a pickle whose entry `key` runs code when unpickled."""

    def write(path, marker, key="state_dict", **extra):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            pickle.dump({**extra, key: _Exploit(str(marker))}, handle)

    return write


@pytest.fixture
def torchrun_train():
    """run(*overrides) -> output: `glancefocus train --preset demo` under torchrun with 2 CPU
    processes (--standalone: a free port, so parallel runs do not collide); fails the test with
    the output's end unless it exits 0."""

    def run(*overrides):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", "-m", "glancefocus.cli", "train", "--preset", "demo",
                   "--no-progress", *overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-3000:]
        return output

    return run


def calibrated_demo(n_calibration=96):
    """A demo model with spread confidences (engine_parity.spread_demo) and an exit curve
    calibrated on its own outputs for images of varied brightness and contrast."""
    from engine_parity import spread_demo, varied_images

    from glancefocus import exits

    model = spread_demo()
    images = varied_images(n_calibration, seed=0, side=100)
    with torch.inference_mode():
        conf, pred = exits.confidences_from_logits(model(images).logits)
    labels = torch.zeros(n_calibration, dtype=torch.long)
    model.exit_curve = exits.budgeted_curve(conf, conf, pred, labels, model.macs()["per_step"])
    model.class_names = [f"class-{i}" for i in range(10)]
    return model


@pytest.fixture(scope="session")
def exported_demo(tmp_path_factory):
    """(model, folder): calibrated_demo() exported to ONNX once for the session (the runtime's
    and the server's tests share it: an export takes several seconds)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from glancefocus.export import export_onnx

    model = calibrated_demo()
    folder = tmp_path_factory.mktemp("exported-demo")
    export_onnx(model, folder)
    return model, folder
