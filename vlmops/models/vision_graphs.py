"""Frozen vision towers replayed from CUDA graphs: one graph per input shape, captured the first time that shape comes.

Eagerly, the towers are hundreds of small kernels per call (SigLIP's 24 layers; the 7b's SAM with its decomposed
relative-position attention), each launched by Python; a replay launches them all at once. Only the shapes of the
pixel tensors key a graph: frozen towers do the same arithmetic for any pixel values, so a replay equals the eager call
on the same shape. Two users:

- the fast engine's prefill (`infer.vision_graphs`): a graph per number of images in a prefill batch;
- training with frozen towers (`vlmops.train.speed`): `graph_image_features` routes the model's own
  `get_image_features` through graphs of one image each, replayed once per image of a micro-batch, so one small graph
  serves every micro-batch (padded or packed, any image count) and its memory pool stays one image's working set.

The graphs of one `VisionGraphs` share a memory pool; a replay's output is copied out before anything else runs. A
capture that fails (an operation that cannot be captured, or no memory for it) turns the graphs off for the owner's
life, with a warning: the towers then run eagerly, as without them.

SAM's attention builds its relative-position tables from index tensors made on the CPU (transformers'
`SamVisionAttention.get_rel_pos`), which a capture cannot copy to the GPU; `memoise_rel_pos` computes each frozen table
once, eagerly, and hands the capture the stored result.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vlmops.models.cuda_graphs import GraphMemory, capture

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
        features: pixels (name -> tensor on the GPU, images along dim 0) -> image features [images, ...]; must do the
            same work for any values.
        enabled: False (or tensors off CUDA): always eager.
        max_graphs: shapes beyond this many run eagerly (each graph keeps its inputs and output).
        images_per_graph: replay a graph of at most this many images once per chunk of a call's images (None: one
            graph for the whole call). Smaller: one graph serves any image count and the pool holds less; larger: the
            towers' matmuls are bigger.
    """

    def __init__(
        self,
        features: Callable[[Pixels], torch.Tensor],
        enabled: bool = True,
        max_graphs: int = 32,
        images_per_graph: int | None = None,
    ):
        self.features = features
        self.enabled = enabled
        self.max_graphs = max_graphs
        self.images_per_graph = images_per_graph
        self.graphs: dict[ShapeKey, _Captured] = {}
        self.memory: GraphMemory | None = None  # once the first graph is captured

    def __call__(self, pixels: Pixels) -> torch.Tensor:
        if not self.enabled or not all(t.is_cuda for t in pixels.values()):
            return self.features(pixels)
        counts = {t.shape[0] for t in pixels.values()}  # images per tensor (one per tower)
        chunk = self.images_per_graph
        if chunk is None or len(counts) != 1 or max(counts) <= chunk:
            return self._replay(pixels)
        names = list(pixels)
        pieces = zip(*(pixels[name].split(chunk) for name in names), strict=True)
        return torch.cat([self._replay(dict(zip(names, piece, strict=True))) for piece in pieces])

    def _replay(self, pixels: Pixels) -> torch.Tensor:
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
            if self.memory is None:
                self.memory = GraphMemory()
            graph, output = capture(lambda: self.features(inputs), self.memory)
        except RuntimeError as err:  # an operation that cannot be captured, or out of memory
            self.enabled = False
            self.graphs.clear()
            log.warning("vision towers: CUDA graph capture failed (%s); running them eagerly", str(err).splitlines()[0])
            return None
        captured = _Captured(graph, inputs, output)
        self.graphs[key] = captured
        return captured


def image_features(vlm: Any, pixels: Pixels) -> torch.Tensor:
    """The aligned image embeddings [images, tokens, hidden] the VLM (`model.model`) scatters into the prompt.

    Releases differ in what `get_image_features` returns: the tensor itself, or an output object carrying it as
    `pooler_output`; both are accepted.
    """
    return _features_tensor(vlm.get_image_features(**pixels))


def _features_tensor(output: Any) -> torch.Tensor:
    features = output if isinstance(output, torch.Tensor) else getattr(output, "pooler_output", None)
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"get_image_features returned {type(output).__name__}, with no pooler_output tensor")
    return features


def memoise_rel_pos(model: Any) -> int:
    """Make each SAM attention layer of `model` compute its relative-position tables once per size and weight version
    (what a CUDA graph capture needs; see the module docstring). A table whose weights train with gradients on is
    computed afresh each call, as before. Returns the number of layers changed."""
    changed = 0
    for module in model.modules():
        get_rel_pos = getattr(module, "get_rel_pos", None)
        if get_rel_pos is None or not hasattr(module, "rel_pos_h") or getattr(get_rel_pos, "memoised", False):
            continue
        module.get_rel_pos = _memoised(get_rel_pos)
        changed += 1
    return changed


def _memoised(get_rel_pos: Callable[[int, int, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    tables: dict[tuple[Any, ...], torch.Tensor] = {}

    def memoised(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
        if rel_pos.requires_grad and torch.is_grad_enabled():
            return get_rel_pos(q_size, k_size, rel_pos)
        key = (q_size, k_size, rel_pos.data_ptr(), rel_pos._version, rel_pos.dtype, rel_pos.device)
        table = tables.get(key)
        if table is None:
            if len(tables) >= 16:  # weights moved or changed: the old tables are stale
                tables.clear()
            with torch.no_grad():
                table = tables[key] = get_rel_pos(q_size, k_size, rel_pos)
        return table

    memoised.memoised = True  # type: ignore[attr-defined]
    return memoised


def towers_frozen(vlm: Any) -> bool:
    """Whether nothing `get_image_features` reaches trains: every parameter of the VLM (`model.model`) outside the
    language model is frozen."""
    return not any(
        param.requires_grad for name, param in vlm.named_parameters() if not name.startswith("language_model.")
    )


def graph_image_features(vlm: Any, images_per_graph: int = 1) -> VisionGraphs:
    """Route the VLM's (`model.model`) own `get_image_features` through CUDA graphs, for training with frozen towers.

    Calls with only pixel tensors (what the model's forward and vlmops' trainer pass) replay graphs, under no_grad;
    the result has the type the eager call returned (the features tensor, or an output object holding only
    `pooler_output`, which is all the model's forward reads). Calls asking for more (hidden states, attentions) run
    eagerly. The caller must keep the towers frozen (`towers_frozen`).
    """
    original = vlm.get_image_features
    signature = inspect.signature(original)
    returned: list[Any] = []

    def features(pixels: Pixels) -> torch.Tensor:
        output = original(**pixels)
        returned[:] = [type(output)]
        return _features_tensor(output)

    graphs = VisionGraphs(features, images_per_graph=images_per_graph)
    memoise_rel_pos(vlm)

    def get_image_features(*args: Any, **kwargs: Any) -> Any:
        pixels: Pixels = {}
        options: dict[str, Any] = {}
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                options.update(value)
            elif isinstance(value, torch.Tensor):
                pixels[name] = value
            else:
                options[name] = value
        wants_more = any(value is not None for name, value in options.items() if name != "return_dict")
        if wants_more or options.get("return_dict") is False:
            return original(*args, **kwargs)
        with torch.no_grad():
            tensor = graphs(pixels)
        kind: Any = returned[0] if returned else torch.Tensor
        return tensor if issubclass(kind, torch.Tensor) else kind(pooler_output=tensor)

    get_image_features.graphs = graphs  # type: ignore[attr-defined]  # for a look at what was captured
    vlm.get_image_features = get_image_features
    return graphs
