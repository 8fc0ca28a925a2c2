"""Where a training run executes: the device, the torchrun process group, mixed precision and
the seeds of every random stream.

One process per device. Under `torchrun --nproc_per_node N` the environment names this process's
rank; the process group uses NCCL on GPUs and gloo on CPUs. Without torchrun the run is a single
process and nothing distributed is touched.
"""
from __future__ import annotations

import contextlib
import gc
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..data.cluttered_mnist import derive_seed

# Random streams, kept apart so that adding draws to one never shifts another.
STREAM_GLOBAL, STREAM_LOCATIONS, STREAM_PPO, STREAM_EVAL, STREAM_BATCHNORM, STREAM_INIT = (
    11, 12, 13, 14, 15, 16)
STREAM_WORKERS, STREAM_STATIC, STREAM_AUGMENT = 21, 31, 41


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: Optional[torch.dtype] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and shows progress."""
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        """fp16 needs loss scaling against underflow; bf16 and float32 do not."""
        if self.amp_dtype == torch.float16:
            return torch.amp.GradScaler(self.device.type)
        return None

    def seed_process(self, *parts: int) -> None:
        """Seed this process's global RNGs (dropout, drop-path) from `parts` and its rank: under
        torchrun every process draws its own, and a resumed run the same ones again."""
        seed_everything(derive_seed(*parts, self.rank))

    def generator(self, *parts: int) -> torch.Generator:
        """A generator on this run's device, seeded from `parts` and this process's rank."""
        return torch.Generator(self.device).manual_seed(derive_seed(*parts, self.rank))

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel around `module` when distributed: its forward must compute
        everything whose gradients are synced (the model's own entry point is step, not forward)."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def share_buffers(self, module: torch.nn.Module) -> None:
        """Copy the main process's buffers (BatchNorm statistics) to every process: each
        process's last forward pass updated its own."""
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def check_ranks_agree(self, module: torch.nn.Module) -> None:
        """Raise if the processes hold different weights (gradients were not synced)."""
        if not self.distributed:
            return
        local = torch.stack([t.detach().double().sum() for t in module.state_dict().values()])
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
            raise RuntimeError("the processes' weights differ after training: gradients were not "
                               "synchronised")

    def counters(self, size: int) -> torch.Tensor:
        """Zeroed running totals on the device: a step adds to them without waiting for the
        device; they are read when logged (float64 where the device has it)."""
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        return torch.zeros(size, dtype=dtype, device=self.device)

    def sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over all processes (a copy; the input is left alone)."""
        values = values.detach().to(self.device, torch.float64).clone()
        if self.distributed:
            dist.all_reduce(values)
        return values.cpu()


def start_runtime(device: str = "auto", amp: str = "none") -> Runtime:
    """Join the torchrun process group if there is one, pick the device, check the AMP mode."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Runtime(chosen, rank, world_size, amp_dtype(amp, chosen))


def stop_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        # free DistributedDataParallel wrappers left in reference cycles (and the group's work
        # they hold) while the interpreter is whole, not during its shutdown: a mitigation for
        # a rare abort at exit after a finished 2-process CPU run ("terminate called without
        # an active exception"; not reproduced since, cause unconfirmed)
        gc.collect()
        dist.destroy_process_group()


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; use train.device=cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware: CPUs without AVX512-BF16 or AMX (e.g.
    AVX2-only ones) emulate it, many times slower than float32."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4 does not count emulation
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def resolve_amp(requested: str, device: torch.device) -> tuple[str, str, Optional[str]]:
    """(mode, why, warning or None) of train.amp on `device`. 'auto': bf16 where the device
    computes it natively; fp16 (with a GradScaler) on CUDA devices without native bf16 (T4,
    V100, P100); float32 elsewhere. bf16 asked for where it is emulated gets a warning."""
    native = native_bf16(device)
    kind = device.type.upper()
    if requested == "auto":
        if native:
            return "bf16", "native bf16", None
        if device.type == "cuda":
            return "fp16", "no native bf16 on this GPU: fp16 with a GradScaler", None
        return "none", f"no native bf16 on this {kind}: float32", None
    if requested == "bf16" and not native and device.type in ("cuda", "cpu"):
        faster = ("train.amp=fp16 (with a GradScaler)" if device.type == "cuda"
                  else "train.amp=none (float32)")
        return "bf16", "asked for", (f"train.amp=bf16 on a {kind} without native bf16: it is "
                                     f"emulated, far slower than {faster}, which train.amp=auto "
                                     "picks here")
    return requested, "asked for", None


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == "auto":
        amp = resolve_amp(amp, device)[0]
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("train.amp=fp16 needs a CUDA device (fp16 autocast with a GradScaler); "
                             "on CPU use train.amp=bf16 or train.amp=none")
        return torch.float16
    raise ValueError(f"train.amp must be 'none', 'bf16', 'fp16' or 'auto', got {amp!r}")


# ----------------------------------------------------------------------------------------------
# global random state

def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's random (e.g. at each epoch: resume is then exact)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def capture_rng() -> dict:
    """The global random states, in types a weights-only checkpoint can hold."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
