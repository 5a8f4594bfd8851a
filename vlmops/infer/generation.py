"""What chat and batch inference share: model inputs from encoded prompts, the generation settings, and `generate`.

Prompts are left-padded so that every row's last prompt token sits in the last column and generation
continues all rows from the same step. Images are passed in row order, then in prompt order within a
row: the model scatters image features into the image-token positions in exactly that order.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image

from vlmops.config import InferConfig
from vlmops.models.loading import LoadedModel, image_inputs


def generation_config(loaded: LoadedModel, infer_cfg: InferConfig) -> Any:
    """A complete GenerationConfig from `infer.*`: temperature 0 is greedy, above 0 samples with top_k and top_p.

    Built from scratch rather than merged into the checkpoint's own generation_config, so a released
    checkpoint's sampling defaults never change what the config file asked for.
    """
    from transformers import GenerationConfig

    tokenizer = loaded.tokenizer
    sampling = infer_cfg.temperature > 0
    return GenerationConfig(
        max_new_tokens=infer_cfg.max_new_tokens,
        do_sample=sampling,
        temperature=infer_cfg.temperature if sampling else None,
        top_p=infer_cfg.top_p if sampling else None,
        # 0 turns top-k off: unset (None), `generate` fills in transformers' default of 50.
        top_k=infer_cfg.top_k if sampling else None,
        repetition_penalty=infer_cfg.repetition_penalty,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )


class _CudnnAttentionOff:
    """Keeps SDPA off cuDNN's backend while at least one `with` block holds it (threads included).

    Torch's backend switches are process-wide, so overlapping blocks (two chat answers streamed from two threads) are
    counted: the first to enter turns cuDNN off, the last to leave restores what was set before.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._before = True

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._before = torch.backends.cuda.cudnn_sdp_enabled()
                torch.backends.cuda.enable_cudnn_sdp(False)
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    torch.backends.cuda.enable_cudnn_sdp(self._before)


_CUDNN_ATTENTION_OFF = _CudnnAttentionOff()


def generate(loaded: LoadedModel, inputs: Mapping[str, torch.Tensor], config: Any, **kwargs: Any) -> torch.Tensor:
    """`model.generate` in inference mode with SDPA kept off cuDNN's backend (FlashAttention or the memory-efficient
    kernel instead), for chat and the plain engine.

    On Hopper torch tries cuDNN's attention first, and cuDNN builds and compiles a kernel graph for each attention
    shape it has not seen: over `generate`'s growing cache every step is a new key length, so every answer longer
    than those before it, and every new batch size, paid ~35-60 ms a step. On an H200 (`bench/chat_latency_bench.py`,
    bench/RESULTS.md session 28): a process's first 64-token chat answer 9.0-9.4 s with cuDNN against 1.7-2.3 s
    without (1.3b; 7b 5.4-7.9 against 1.7-2.8), a follow-up turn 1.4-2.3x faster, a first batch of 32 x 128 tokens
    1.9-3.9x; with every shape seen before 0.94-1.44x. The fast engine keeps cuDNN: its shapes are few
    and fixed (CUDA graphs), and there its masked decode attention is the fastest kernel (bench/RESULTS.md session 19).
    """
    with torch.inference_mode(), _CUDNN_ATTENTION_OFF.held():
        return loaded.model.generate(**inputs, generation_config=config, **kwargs)


def model_inputs(
    loaded: LoadedModel, prompts: Sequence[Sequence[int]], images: Sequence[Image.Image]
) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask` for a batch of prompts, plus the pixel tensors.

    `images` are all the batch's images, row by row and, within a row, in prompt order.
    """
    if not prompts:
        raise ValueError("no prompts to generate from")
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    device = loaded.device
    inputs: dict[str, torch.Tensor] = {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
    }
    inputs.update(image_inputs(loaded.processor, list(images), model_dtype(loaded), device))
    return inputs


def model_dtype(loaded: LoadedModel) -> torch.dtype:
    """The dtype pixel values must have: the (first) floating-point parameter's dtype."""
    for param in loaded.model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def answer_tokens(generated: Sequence[int], eos_token_id: int | None) -> list[int]:
    """The tokens of one generated answer, up to and including the first EOS.

    `generate` fills a row that finished early with padding until the longest row is done; that padding
    comes after the EOS and is cut here.
    """
    tokens = list(generated)
    if eos_token_id is not None and eos_token_id in tokens:
        return tokens[: tokens.index(eos_token_id) + 1]
    return tokens


def decode_answer(loaded: LoadedModel, tokens: Sequence[int]) -> str:
    """The answer text: special tokens (EOS, padding) dropped, surrounding whitespace stripped.

    The `deepseek` generation prompt ends in `Assistant:` without a space, so every answer starts with one.
    """
    return str(loaded.tokenizer.decode(list(tokens), skip_special_tokens=True)).strip()
