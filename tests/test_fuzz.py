"""Fuzzing: the config parser and the image loader meet random input and never fail with
anything but their own clear error types."""
import io
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from glancefocus.config import ConfigError, RunConfig, apply_overrides, from_dict, load_config
from glancefocus.data.folders import ImageReadError, load_image

SECTIONS = {"model": ["arch", "num_classes", "patch_size", "max_steps", "pretrained", "encoder_kwargs"],
            "data": ["dataset", "root", "mean", "image_size", "small_images"],
            "train": ["batch_size", "amp", "stage1", "stage2", "device"]}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
keys = st.one_of(st.sampled_from([k for ks in SECTIONS.values() for k in ks]), st.text(max_size=8))
section = st.dictionaries(keys, values, max_size=4)
configs = st.one_of(
    st.dictionaries(st.sampled_from(list(SECTIONS)), st.one_of(section, values), max_size=3),
    st.dictionaries(st.text(max_size=6), values, max_size=3),
    values,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_config_parser_accepts_or_names_the_problem(data):
    try:
        config = from_dict(RunConfig, data)
    except ConfigError as exc:
        assert "'" in str(exc) or "root" in str(exc)  # names a key or the section
    else:
        assert isinstance(config, RunConfig)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=24), max_size=4))
def test_overrides_accept_or_explain(items):
    try:
        load_config(overrides=items)
    except ConfigError as exc:
        assert str(exc)


def test_override_of_a_section_by_a_scalar_is_named():
    with pytest.raises(ConfigError, match="'train.stage1'"):
        load_config(overrides=["train.stage1=3"])
    with pytest.raises(ConfigError, match="'model' is not a section"):
        apply_overrides({"model": 3}, ["model.arch=x"])


def _png_bytes(mode="RGB", size=(12, 9)):
    buffer = io.BytesIO()
    array = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes():
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


VALID = [_png_bytes(), _png_bytes("L"), _png_bytes("P"), _png_bytes("RGBA"), _jpeg_bytes()]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    base=st.sampled_from(range(len(VALID))),
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6),
    channels=st.sampled_from([1, 3]),
)
def test_image_loader_never_crashes_on_damaged_files(tmp_path, base, cut, flips, channels):
    data = bytearray(VALID[base])
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    data = bytes(data[: max(1, int(cut * len(data)))]) if cut < 1 else bytes(data)
    path = tmp_path / "fuzz.img"
    path.write_bytes(data)
    try:
        image = load_image(path, channels=channels)
    except ImageReadError as exc:
        assert "fuzz.img" in str(exc)
    else:
        assert image.mode == ("RGB" if channels == 3 else "L")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=512))
def test_image_loader_on_random_bytes(tmp_path, blob):
    path = tmp_path / "random.png"
    path.write_bytes(blob)
    try:
        load_image(path)
    except ImageReadError as exc:
        assert "random.png" in str(exc)


def test_decompression_bomb_and_folders_are_clear_errors(tmp_path):
    # a PNG header claiming 100k x 100k pixels: Pillow's bomb guard must surface as our error
    header = (b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR"
              + (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0]))
    header += zlib.crc32(header[12:29]).to_bytes(4, "big")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(header)
    with pytest.raises(ImageReadError, match="bomb.png"):
        load_image(bomb)
    with pytest.raises(ImageReadError, match="tmp"):
        load_image(tmp_path)
