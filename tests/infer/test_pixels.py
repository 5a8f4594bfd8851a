"""Pixels normalised on the device equal the image processor's own output, value for value."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmops.data.demo import draw_shape
from vlmops.models.loading import load_processor
from vlmops.models.pixels import DevicePixels, PilGeometry, processor_geometry
from vlmops.models.tiny import build_tokenizer, image_processor
from vlmops.testing.architectures import released_image_processor


def _released(variant: str) -> object:
    """The released models' preprocessing (384 px SigLIP; the 7b adds 1024 px SAM), as convert builds it."""
    return released_image_processor(f"deepseek-vl-{variant}-chat")


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    noise = Image.fromarray(rng.integers(0, 256, (37, 211, 3), dtype=np.uint8))  # wide: padded top and bottom
    tall = Image.fromarray(rng.integers(0, 256, (300, 20, 3), dtype=np.uint8))
    flat = Image.new("RGB", (64, 64), (0, 255, 128))
    return [noise, tall, flat, draw_shape("red", "circle", 48, random.Random(0))]


@pytest.mark.parametrize("which", ["deepseek_vl", "deepseek_vl_hybrid", "1.3b", "7b"])
def test_device_values_equal_the_processor(which: str) -> None:
    processor = image_processor(which) if which.startswith("deepseek") else _released(which)  # type: ignore[arg-type]
    split = DevicePixels.build(processor)
    assert split is not None
    images = _images()
    expected = processor(images, return_tensors="pt")
    raw = split.host(images)
    assert set(raw) == set(expected)
    for name, value in expected.items():
        assert raw[name].dtype == torch.uint8  # a quarter of float32's bytes to pin and copy
        assert torch.equal(split.values(name, raw[name]), value), name


@pytest.mark.parametrize("which", ["deepseek_vl", "deepseek_vl_hybrid", "1.3b", "7b"])
def test_pil_geometry_equals_the_processors_resize_and_pad(which: str) -> None:
    processor = image_processor(which) if which.startswith("deepseek") else _released(which)  # type: ignore[arg-type]
    geometry = PilGeometry.build(processor)
    assert geometry is not None
    split = DevicePixels.build(processor)
    assert split is not None and split.geometry == geometry  # what the engine's image threads run
    rng = np.random.default_rng(7)
    shapes = [(int(h), int(w)) for h, w in rng.integers(1, 1500, (12, 2))]
    images = _images() + [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    expected = processor_geometry(processor, images)
    got = geometry(images)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == torch.uint8
        assert torch.equal(got[name], value), name


def test_geometry_it_does_not_reproduce_stays_the_processors() -> None:
    processor = _released("1.3b")
    processor.do_pad = False  # resized, not padded: a shape the PIL path does not make
    assert PilGeometry.build(processor) is None
    processor = _released("7b")
    processor.high_res_background_color = (0, 0, 0)  # the PIL path would pad with another colour than ...
    geometry = PilGeometry.build(processor)
    assert geometry is not None  # ... read from the processor itself, so it still matches
    assert dict(geometry.fits)["high_res_pixel_values"].background == (0, 0, 0)


def test_images_other_than_rgb_take_the_processors_geometry() -> None:
    processor = _released("1.3b")
    split = DevicePixels.build(processor)
    assert split is not None and split.geometry is not None
    # Three channels the processor takes as they are, where pasting onto an RGB square would convert them.
    ycbcr = _images()[0].convert("YCbCr")
    images = [ycbcr, _images()[1]]
    assert torch.equal(
        split.values("pixel_values", split.host(images)["pixel_values"]),
        processor(images, return_tensors="pt")["pixel_values"],
    )


def test_other_settings_are_reproduced_or_left_on_the_host() -> None:
    processor = image_processor("deepseek_vl")
    processor.do_normalize = False  # rescale only: still a table
    split = DevicePixels.build(processor)
    assert split is not None
    images = _images()
    assert torch.equal(
        split.values("pixel_values", split.host(images)["pixel_values"]),
        processor(images, return_tensors="pt")["pixel_values"],
    )
    processor.do_rescale = False  # float input expected: nothing to split
    assert DevicePixels.build(processor) is None


@pytest.mark.parametrize("variant", ["1.3b", "7b"])
def test_loaded_processors_take_the_split_where_torchvision_is_installed(variant: str, tmp_path: Path) -> None:
    """transformers picks torchvision's image processor where it is installed (GPU machines): vlmops loads PIL's on
    every machine, the same pixels as the CPU tests and the one the uint8 split reproduces. Without torchvision (CI)
    both choices are PIL's; the GPU machine's image has torchvision, and there this test tells them apart."""
    from transformers import AutoProcessor, AutoTokenizer, DeepseekVLHybridProcessor, DeepseekVLProcessor

    tokenizer_folder = tmp_path / "tokenizer"
    build_tokenizer(tokenizer_folder)
    processor_cls = DeepseekVLHybridProcessor if variant == "7b" else DeepseekVLProcessor
    processor_cls(
        _released(variant), AutoTokenizer.from_pretrained(tokenizer_folder), num_image_tokens=576
    ).save_pretrained(tmp_path / "checkpoint")
    loaded = load_processor(tmp_path / "checkpoint").image_processor
    assert type(loaded).__name__.endswith("ImageProcessorPil")
    assert DevicePixels.build(loaded) is not None
    if importlib.util.find_spec("torchvision") is not None:  # what vlmops overrides
        default = AutoProcessor.from_pretrained(tmp_path / "checkpoint").image_processor
        assert not type(default).__name__.endswith("ImageProcessorPil")
