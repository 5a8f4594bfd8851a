"""Weights in and out of a conversion: the release's weight files in index order, streamed one tensor at a
time, and the shard writer that holds at most one output shard in RAM."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from vlmops.models.layout import ConversionError, read_json
from vlmops.plural import counted


def weight_files(src: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint folder, in index order; safetensors preferred over .bin, which is
    refused unless `allow_pickle` (model.allow_pickle: unpickling a file can run any code in it)."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = src / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index} has no weight_map: the index is damaged; download it again")
            files = [src / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ConversionError(
                    f"{index} lists {counted(len(missing), 'shard')} not in {src} ({', '.join(missing)}): the "
                    "download is incomplete; download the model again"
                )
            return _allowed(files, allow_pickle)
        if (src / single).is_file():
            return _allowed([src / single], allow_pickle)
    raise ConversionError(
        f"{src} has no weights: expected model.safetensors, model.safetensors.index.json with its shards, "
        "or pytorch_model.bin"
    )


def _allowed(files: list[Path], allow_pickle: bool) -> list[Path]:
    if allow_pickle or all(f.suffix == ".safetensors" for f in files):
        return files
    raise ConversionError(
        f"{files[0].parent} has pickle weights only ({files[0].name}{' ...' if len(files) > 1 else ''}), and loading a "
        "pickle file can run any code in it: set model.allow_pickle: true (vlmops convert --allow-pickle) if you "
        "trust where they came from"
    )


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open has keys(), no __iter__)
                    yield key, handle.get_tensor(key)
        else:
            # mmap: tensors are paged in as they are read, not all at once
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            for key in list(state):
                yield key, state.pop(key)


class ShardWriter:
    """Collects tensors into shards of at most `max_bytes` and writes each shard as soon as it is full."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.seen:
            raise ConversionError(f"two original tensors convert to {name!r}: the checkpoint has duplicate keys")
        self.seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"shard-{len(self.shards):05d}.safetensors.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> tuple[int, int, int]:
        """Name the shards as transformers expects; returns (tensors, shards, bytes)."""
        if self.pending:
            self._flush()
        if not self.shards:
            raise ConversionError("the checkpoint has no tensors to convert")
        count = len(self.shards)
        if count == 1:
            self.shards[0][0].rename(self.folder / "model.safetensors")
        else:
            weight_map = {}
            for index, (path, names) in enumerate(self.shards):
                final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
                path.rename(self.folder / final)
                weight_map.update(dict.fromkeys(names, final))
            index_json = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
        return len(self.seen), count, self.total_bytes
