import os
import pickle

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
