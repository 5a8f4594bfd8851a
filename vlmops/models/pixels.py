"""Image preprocessing split at the uint8 boundary: geometry on the host, rescale and normalise on the GPU.

The image processor's resize and padding stay on the host (PIL, in the engine's worker threads). Its rescale
and normalise, float arithmetic over every pixel (about a third of the processor's time for the 7b's 1024 px SAM
input), become one table lookup on the device, and the host pins and copies uint8: a quarter of float32's
bytes. Each table holds exactly what the processor computes for each of the 256 values of a channel (a float64
rescale cast to float32, then float32 `(x - mean) / std`, as transformers does), and `DevicePixels.build` checks
the lookup against the processor's own output on a probe image: where they differ in a single value (another
processor, other settings), the engine keeps the processor's own path.
"""

from __future__ import annotations

import logging
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

    def __init__(self, image_processor: Any, tables: dict[str, torch.Tensor]):
        self.image_processor = image_processor
        self.tables = tables
        self._on: dict[tuple[str, torch.device], torch.Tensor] = {}

    @classmethod
    def build(cls, image_processor: Any) -> DevicePixels | None:
        """The split for this processor, or None where the lookup would not reproduce its output exactly."""
        tables = _tables(image_processor)
        if tables is None:
            return None
        split = cls(image_processor, tables)
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
        return dict(self.image_processor(images, return_tensors="pt", do_rescale=False, do_normalize=False))

    def values(self, name: str, pixels: torch.Tensor) -> torch.Tensor:
        """float32 pixels of `name` from its uint8 [N, C, H, W], on the tensor's device."""
        key = (name, pixels.device)
        if key not in self._on:
            self._on[key] = self.tables[name].to(pixels.device)
        table = self._on[key]
        channels = torch.arange(table.shape[0], device=pixels.device).view(1, -1, 1, 1)
        return table[channels, pixels.long()]


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
