"""Image preprocessing split at the uint8 boundary: geometry on the host, rescale and normalise on the GPU.

The image processor's resize and padding stay on the host (PIL, in the engine's worker threads). Its rescale
and normalise, float arithmetic over every pixel (about a third of the processor's time for the 7b's 1024 px SAM
input), become one table lookup on the device, and the host pins and copies uint8: a quarter of float32's
bytes. Each table holds exactly what the processor computes for each of the 256 values of a channel (a float64
rescale cast to float32, then float32 `(x - mean) / std`, as transformers does), and `DevicePixels.build` checks
the lookup against the processor's own output on a probe image: where they differ in a single value (another
processor, other settings), the engine keeps the processor's own path.

The geometry itself is the processor's resize and pad-to-square done on the PIL image as it comes (`PilGeometry`),
rather than through the processor's numpy round trip (PIL -> channels-first array -> PIL -> resize -> array ->
pad), whose copies and Python hold the GIL: with it, the engine's image threads run in parallel only inside PIL's
resize. Measured by `bench/preprocess_bench.py`. It is used only where it reproduces the processor's uint8 output
exactly on probe images of several shapes, and only for RGB images (others take the processor's own geometry).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

# pixel tensor name -> the processor attributes holding its mean and std
NORMALISATION = {
    "pixel_values": ("image_mean", "image_std"),
    "high_res_pixel_values": ("high_res_image_mean", "high_res_image_std"),
}
PROBE_SEED = 0


class DevicePixels:
    """uint8 pixels from the processor on the host; the processor's float values from them on the device."""

    def __init__(self, image_processor: Any, tables: dict[str, torch.Tensor], geometry: PilGeometry | None = None):
        self.image_processor = image_processor
        self.tables = tables
        self.geometry = geometry
        self._on: dict[tuple[str, torch.device], torch.Tensor] = {}

    @classmethod
    def build(cls, image_processor: Any) -> DevicePixels | None:
        """The split for this processor, or None where the lookup would not reproduce its output exactly."""
        tables = _tables(image_processor)
        if tables is None:
            return None
        split = cls(image_processor, tables, PilGeometry.build(image_processor))
        probe = [_probe_image(640, 480), _probe_image(300, 500)]
        expected = image_processor(probe, return_tensors="pt")
        raw = split.host(probe)
        for name, value in expected.items():
            if (
                name not in raw
                or raw[name].dtype != torch.uint8
                or not torch.equal(split.values(name, raw[name]), value)
            ):
                log.info("image preprocessing stays on the host: %s from uint8 does not match the processor", name)
                return None
        return split

    def host(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Resized and padded pixels as uint8 (the processor's own geometry, without rescale and normalise)."""
        if self.geometry is not None and all(image.mode == "RGB" for image in images):
            return self.geometry(images)
        return processor_geometry(self.image_processor, images)

    def values(self, name: str, pixels: torch.Tensor) -> torch.Tensor:
        """float32 pixels of `name` from its uint8 [N, C, H, W], on the tensor's device."""
        key = (name, pixels.device)
        if key not in self._on:
            self._on[key] = self.tables[name].to(pixels.device)
        table = self._on[key]
        channels = torch.arange(table.shape[0], device=pixels.device).view(1, -1, 1, 1)
        return table[channels, pixels.long()]


def processor_geometry(image_processor: Any, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """The processor's own resize and pad, as uint8: its output without rescale and normalise."""
    return dict(image_processor(images, return_tensors="pt", do_rescale=False, do_normalize=False))


@dataclass(frozen=True)
class _Fit:
    """Resize so the longer side is `side` (each side at least `min_size`), then pad to a square of `background`."""

    side: int
    min_size: int
    resample: Image.Resampling
    background: tuple[int, ...]

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        delta = self.side / max(height, width)
        new_height, new_width = max(round(height * delta), self.min_size), max(round(width * delta), self.min_size)
        resized = image.resize((new_width, new_height), resample=self.resample)
        if new_height == new_width:
            return resized
        square = max(new_height, new_width)
        padded = Image.new("RGB", (square, square), self.background)
        padded.paste(resized, ((square - new_width) // 2, (square - new_height) // 2))
        return padded


@dataclass(frozen=True)
class PilGeometry:
    """DeepSeek-VL's resize and pad-to-square on PIL images, for its two image processors (the 1.3b's one size;
    the 7b's 1024 px high-resolution image, then the 384 px image resized from that padded square).

    `build` returns it only where it reproduces the processor's uint8 output exactly on probe images of several
    shapes (wide, tall, square, smaller than `min_size`); the settings it reads are the processor's own.
    """

    fits: tuple[tuple[str, _Fit], ...]  # (tensor name, fit), each applied to the previous fit's output

    @classmethod
    def build(cls, image_processor: Any) -> PilGeometry | None:
        try:
            geometry = cls(_fits(image_processor))
        except (AttributeError, KeyError, TypeError, ValueError):
            return None  # not one of DeepSeek-VL's processors, or settings it does not read
        probe = [_probe_image(w, h) for w, h in ((640, 480), (300, 500), (37, 211), (211, 37), (64, 64), (5, 900))]
        expected = processor_geometry(image_processor, probe)
        got = geometry(probe)
        if set(got) != set(expected) or any(not torch.equal(got[name], expected[name]) for name in expected):
            log.info("image geometry takes the processor's own path: the PIL path does not reproduce it")
            return None
        return geometry

    def __call__(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        out: dict[str, list[torch.Tensor]] = {name: [] for name, _ in self.fits}
        for image in images:
            for name, fit in self.fits:
                image = fit(image)
                out[name].append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        return {name: torch.stack(values) for name, values in out.items()}


def _fits(processor: Any) -> tuple[tuple[str, _Fit], ...]:
    if not (processor.do_resize and getattr(processor, "do_pad", True)):
        raise ValueError("only resize-and-pad is reproduced")

    def fit(size: Any, resample: Any, background: Any) -> _Fit:
        height, width = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
        if height != width:
            raise ValueError("DeepSeek-VL's processors resize to a square")
        return _Fit(int(height), int(processor.min_size), Image.Resampling(int(resample)), tuple(background))

    low = fit(processor.size, processor.resample, processor.background_color)
    if hasattr(processor, "high_res_size"):
        high = fit(processor.high_res_size, processor.high_res_resample, processor.high_res_background_color)
        return (("high_res_pixel_values", high), ("pixel_values", low))
    return (("pixel_values", low),)


def _tables(image_processor: Any) -> dict[str, torch.Tensor] | None:
    if getattr(image_processor, "do_rescale", True) is False:
        return None  # the processor expects float input already scaled: nothing to gain here
    scale = float(getattr(image_processor, "rescale_factor", 1 / 255))
    normalise = bool(getattr(image_processor, "do_normalize", True))
    rescaled = (np.arange(256, dtype=np.float64) * scale).astype(np.float32)
    tables = {}
    for name, (mean_attr, std_attr) in NORMALISATION.items():
        mean, std = getattr(image_processor, mean_attr, None), getattr(image_processor, std_attr, None)
        if mean is None or std is None:
            continue
        mean_, std_ = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        rows = [(rescaled - m) / s if normalise else rescaled for m, s in zip(mean_, std_, strict=True)]
        tables[name] = torch.from_numpy(np.stack(rows).astype(np.float32))
    return tables or None


def _probe_image(width: int, height: int) -> Image.Image:
    """Noise over every value of every channel, in a shape that needs resizing and padding."""
    rng = np.random.default_rng(PROBE_SEED)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
