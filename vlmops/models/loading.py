"""Load a native DeepSeek-VL checkpoint (and optionally a LoRA adapter) with its processor."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmops.errors import UserInputError
from vlmops.models.compile_cache import use_compile_cache
from vlmops.models.layout import native_arch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The image processors' backend, on every machine. transformers picks torchvision's where it is installed (GPU
# machines, as a rule) and PIL's elsewhere; their resizes differ in rounding, so the same checkpoint saw other pixels
# on a GPU worker than in the CPU tests, and the uint8 split of vlmops.models.pixels (geometry on the host, rescale
# and normalise on the device), which reproduces the PIL processor only, never ran on the GPU.
IMAGE_BACKEND = "pil"


@dataclass
class LoadedModel:
    """A model ready for training or inference, with what the template needs to feed it."""

    model: Any
    processor: Any
    path: Path
    hybrid: bool

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def num_image_tokens(self) -> int:
        return int(self.processor.num_image_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class PickleWeightsError(UserInputError):
    """A folder holds its weights only in pickle files, and model.allow_pickle is false."""


def safe_weights(folder: str | os.PathLike[str], allow_pickle: bool = False) -> dict[str, Any]:
    """`from_pretrained` keyword arguments that load only safetensors from `folder`, unless `allow_pickle`.

    Raises PickleWeightsError (naming the files and the config key) when `folder` has pickle weights and no
    safetensors: transformers would unpickle them, and an unpickled file can run any code in it.
    """
    path = Path(folder)
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return {} if allow_pickle else {"use_safetensors": True}
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin")
    if not pickles or allow_pickle:
        return {} if allow_pickle else {"use_safetensors": True}
    raise PickleWeightsError(
        f"{path} has pickle weights only ({', '.join(pickles[:4])}{' ...' if len(pickles) > 4 else ''}), and loading "
        "a pickle file can run any code in it: convert them to safetensors, or set model.allow_pickle: true "
        "(--set model.allow_pickle=true) if you trust where they came from"
    )


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """`auto`: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU. Anything else is taken as asked."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
        return DTYPES[name]
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda":
        # Compute capability 8 (Ampere) on: bf16 in hardware. Not `is_bf16_supported()`, which by default also says
        # yes where bf16 is only emulated (V100, T4: slow, no fast attention), and asks the current device, not `dev`.
        return torch.bfloat16 if torch.cuda.get_device_capability(dev)[0] >= 8 else torch.float16
    return torch.float32


def attn_implementation(attn: str, hybrid: bool) -> str | dict[str, str]:
    """SAM (the 7b's high-res tower) runs SDPA whatever the LLM and SigLIP use."""
    if attn == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError(
                "model.attn is flash_attention_2 but flash-attn is not installed: pip install 'vlmops[flash]' or use sdpa"
            )
    if attn == "flex_attention":
        # transformers refuses flex_attention for the DeepSeek-VL classes themselves; the Llama inside takes it.
        towers = {"vision_config": "sdpa", **({"high_res_vision_config": "sdpa"} if hybrid else {})}
        return {"": "sdpa", "text_config": attn, **towers}
    if not hybrid:
        return attn
    return {"": attn, "text_config": attn, "vision_config": attn, "high_res_vision_config": "sdpa"}


def is_hybrid(path: str | os.PathLike[str]) -> bool:
    """Whether the native checkpoint at `path` is the hybrid (SigLIP + SAM) architecture."""
    return native_arch(path) == "deepseek_vl_hybrid"


def load_model(
    path: str | os.PathLike[str],
    dtype: str = "auto",
    attn: str = "sdpa",
    device: torch.device | str | None = None,
    adapter: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
    compile_cache: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load model and processor from a native checkpoint folder; apply a peft adapter folder if given.

    Only safetensors weights load unless `allow_pickle` (model.allow_pickle; see `safe_weights`). torch.compile's
    caches go to `compile_cache` (model.compile_cache; see vlmops.models.compile_cache), None: torch's default."""
    from transformers import AutoModelForImageTextToText

    use_compile_cache(compile_cache)

    folder = Path(path)
    hybrid = is_hybrid(folder)
    dev = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, dev)
    model: Any = AutoModelForImageTextToText.from_pretrained(
        folder,
        dtype=torch_dtype,
        attn_implementation=attn_implementation(attn, hybrid),
        **safe_weights(folder, allow_pickle),
    )
    processor = load_processor(folder)
    check_image_tokens(model.config, processor, folder)
    if adapter is not None:
        from peft import PeftModel

        safe_weights(adapter, allow_pickle)  # peft falls back to adapter_model.bin: refuse it the same way
        model = PeftModel.from_pretrained(model, str(adapter))
    model.to(dev)
    model.eval()
    log.info("loaded %s (%s, %s) on %s", folder, "hybrid" if hybrid else "deepseek_vl", torch_dtype, dev)
    return LoadedModel(model=model, processor=processor, path=folder, hybrid=hybrid)


def load_processor(path: str | os.PathLike[str]) -> Any:
    """The checkpoint's processor, its image processor on the `IMAGE_BACKEND`."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, backend=IMAGE_BACKEND)


def image_tokens_per_image(config: Any) -> int:
    """How many embeddings the vision side produces per image: (SigLIP image size / patch size) squared.

    The hybrid's SAM branch is resampled to the same grid, so the count is the same.
    """
    vision = config.vision_config
    return int((vision.image_size // vision.patch_size) ** 2)


def check_image_tokens(config: Any, processor: Any, where: Path) -> None:
    """The processor must expand each image to exactly as many tokens as the vision tower yields."""
    expected = image_tokens_per_image(config)
    if int(processor.num_image_tokens) != expected:
        raise ValueError(
            f"{where}: the processor expands an image to {processor.num_image_tokens} tokens but the vision tower "
            f"yields {expected} ({config.vision_config.image_size}px / {config.vision_config.patch_size}px patches); "
            "fix num_image_tokens in processor_config.json"
        )


def image_inputs(
    processor: Any, images: list[Any], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Pixel tensors for a list of PIL images (the hybrid gets a high-res tensor too); empty dict for none."""
    if not images:
        return {}
    features = processor.image_processor(images, return_tensors="pt")
    return {k: v.to(device=device, dtype=dtype) for k, v in features.items()}
