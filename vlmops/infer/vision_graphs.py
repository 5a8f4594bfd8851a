"""The frozen vision towers of a prefill batch, replayed from CUDA graphs: one graph per input shape (images per
batch), captured the first time that shape comes.

Eagerly, the towers are hundreds of small kernels per batch (SigLIP's 24 layers; the 7b's SAM with its decomposed
relative-position attention), each launched by Python on the thread that also drives the decode steps; a replay
launches them all at once. Only the shapes of the pixel tensors key a graph: the towers do the same arithmetic for
any pixel values, so a replay equals the eager call on the same shape.

The graphs share one memory pool; a replay's output is copied out before anything else runs, so a later replay of
another graph may reuse the memory. A capture that fails (an operation that cannot be captured, or no memory for
it) turns the graphs off for the engine's life, with a warning: the towers then run eagerly, as without them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vlmops.infer.cuda_graphs import capture

log = logging.getLogger(__name__)

Pixels = dict[str, torch.Tensor]
ShapeKey = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: Pixels
    output: torch.Tensor


class VisionGraphs:
    """`features(pixels)`, from a CUDA graph per pixel shape where it can be, else eagerly.

    Args:
        features: pixels (name -> tensor on the GPU) -> image features; must do the same work for any values.
        enabled: False (or tensors off CUDA): always eager.
        max_graphs: shapes beyond this many run eagerly (each graph keeps its inputs and output).
    """

    def __init__(self, features: Callable[[Pixels], torch.Tensor], enabled: bool = True, max_graphs: int = 32):
        self.features = features
        self.enabled = enabled
        self.max_graphs = max_graphs
        self.graphs: dict[ShapeKey, _Captured] = {}
        self.pool: Any = None  # torch.cuda.graph_pool_handle(), once the first graph is captured

    def __call__(self, pixels: Pixels) -> torch.Tensor:
        if not self.enabled or not all(t.is_cuda for t in pixels.values()):
            return self.features(pixels)
        key = tuple(sorted((name, tuple(t.shape), t.dtype) for name, t in pixels.items()))
        captured = self.graphs.get(key)
        if captured is None:
            if len(self.graphs) >= self.max_graphs:
                return self.features(pixels)
            captured = self._capture(key, pixels)
            if captured is None:
                return self.features(pixels)
        for name, tensor in pixels.items():
            captured.inputs[name].copy_(tensor)
        captured.graph.replay()
        return captured.output.clone()

    def _capture(self, key: ShapeKey, pixels: Pixels) -> _Captured | None:
        inputs = {name: tensor.clone() for name, tensor in pixels.items()}
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph, output = capture(lambda: self.features(inputs), self.pool)
        except RuntimeError as err:  # an operation that cannot be captured, or out of memory
            self.enabled = False
            self.graphs.clear()
            log.warning("vision towers: CUDA graph capture failed (%s); running them eagerly", str(err).splitlines()[0])
            return None
        captured = _Captured(graph, inputs, output)
        self.graphs[key] = captured
        return captured
