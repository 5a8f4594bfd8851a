"""The processor of a converted checkpoint: the release tokenizer, the image processor, the chat template."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vlmops.config import DEFAULT_SYSTEM_PROMPT
from vlmops.models.layout import Arch, ConversionError, read_json
from vlmops.models.original_layout import CLIP_MEAN, CLIP_STD, sam_spec, siglip_spec
from vlmops.models.template import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN

log = logging.getLogger(__name__)


def build_tokenizer(src: Path, original: dict[str, Any]) -> Any:
    """The release tokenizer with BOS, EOS, pad and `<image_placeholder>` as the processor's image token."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer_file = src / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ConversionError(f"{src} has no tokenizer.json; the release ships one. Copy the complete original folder.")
    settings = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    bos = _token_text(settings.get("bos_token")) or BOS_TOKEN
    eos = _token_text(settings.get("eos_token")) or EOS_TOKEN
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    for name, token in (("BOS", bos), ("EOS", eos)):
        if token not in vocab:
            raise ConversionError(f"{tokenizer_file}: the {name} token {token!r} is not in the vocabulary")
    pad = _token_text(settings.get("pad_token"))
    if pad is None:
        # The release pads with EOS when its tokenizer names no pad token (VLChatProcessor.pad_id).
        pad = PAD_TOKEN if PAD_TOKEN in vocab else eos
    if IMAGE_TOKEN not in vocab:
        log.info("adding %s to the tokenizer, as the release's processor does", IMAGE_TOKEN)
    # A plain fast tokenizer over tokenizer.json: the class named in tokenizer_config.json
    # (LlamaTokenizerFast) would let transformers rebuild the pipeline as for a SentencePiece Llama.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=int(settings.get("model_max_length", 16384)),
        padding_side="left",  # generation pads on the left, as the release's batchify does
        clean_up_tokenization_spaces=False,
    )
    if settings.get("add_bos_token", True) and tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id]:
        bos_id = tokenizer.bos_token_id
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tokenizer


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return str(value.get("content")) if value.get("content") else None
    return str(value) if value else None


def build_processor(src: Path, original: dict[str, Any], tokenizer: Any, arch: Arch) -> Any:
    from transformers import (
        DeepseekVLHybridImageProcessorPil,
        DeepseekVLHybridProcessor,
        DeepseekVLImageProcessorPil,
        DeepseekVLProcessor,
    )
    from transformers.image_utils import PILImageResampling

    params = original["vision_config"].get("params", {})
    released = read_json(src / "preprocessor_config.json") if (src / "preprocessor_config.json").is_file() else {}
    min_size = int(released.get("min_size", 14))
    released_mean = released.get("image_mean") if released.get("do_normalize", True) else None
    released_std = released.get("image_std") if released.get("do_normalize", True) else None
    if arch == "deepseek_vl":
        siglip = siglip_spec(params)
        mean = params.get("pixel_mean") or released_mean or [0.5, 0.5, 0.5]
        std = params.get("pixel_std") or released_std or [0.5, 0.5, 0.5]
        image_processor: Any = DeepseekVLImageProcessorPil(
            size={"height": siglip.image_size, "width": siglip.image_size},
            image_mean=list(mean),  # explicit: the class default is CLIP's mean/std
            image_std=list(std),
            min_size=min_size,
            resample=PILImageResampling.BICUBIC,
        )
        processor_cls: Any = DeepseekVLProcessor
    else:
        low, high = params["low_res_cfg"], params["high_res_cfg"]
        siglip, sam = siglip_spec(low), sam_spec(high)
        image_processor = DeepseekVLHybridImageProcessorPil(
            size={"height": siglip.image_size, "width": siglip.image_size},
            image_mean=list(low.get("pixel_mean") or [0.5, 0.5, 0.5]),
            image_std=list(low.get("pixel_std") or [0.5, 0.5, 0.5]),
            high_res_size={"height": sam.image_size, "width": sam.image_size},
            high_res_image_mean=list(high.get("pixel_mean") or CLIP_MEAN),
            high_res_image_std=list(high.get("pixel_std") or CLIP_STD),
            min_size=min_size,
            # The release resizes to 1024 with bicubic, then the low-res input is torchvision's bilinear,
            # antialiased Resize of that.
            high_res_resample=PILImageResampling.BICUBIC,
            resample=PILImageResampling.BILINEAR,
        )
        processor_cls = DeepseekVLHybridProcessor
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=siglip.num_patches,
    )


def _jinja_literal(text: str) -> str:
    if "'" in text or "\\" in text:
        raise ValueError(f"cannot embed {text!r} in the chat template")
    return f"'{text}'"


# The `deepseek` format exactly as vlmops.models.template.render writes it (a test compares the two):
# system + "\n\n" unless empty, "User: " + text + "\n\n", "Assistant:" + (" " + text) + EOS, each message's
# text stripped, images as <image_placeholder> where they stand, the whole string stripped. The system
# prompt is a leading system message, else the `system_prompt` template variable, else the released default.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(out='', system=" + _jinja_literal(DEFAULT_SYSTEM_PROMPT) + ", text='') -%}"
    "{%- if system_prompt is defined and system_prompt is not none -%}"
    "{%- set ns.system = system_prompt -%}"
    "{%- endif -%}"
    "{%- set turns = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.text = '' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set ns.text = messages[0]['content'] -%}"
    "{%- else -%}{%- for part in messages[0]['content'] if part['type'] == 'text' -%}"
    "{%- set ns.text = ns.text ~ part['text'] -%}{%- endfor -%}{%- endif -%}"
    "{%- set ns.system = ns.text | trim -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- endif -%}"
    "{%- if ns.system -%}{%- set ns.out = ns.system ~ '\n\n' -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set ns.text = '' -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{%- if message['role'] != 'user' -%}"
    "{{- raise_exception('images are only supported in user turns') -}}"
    "{%- endif -%}"
    "{%- set ns.text = ns.text ~ " + _jinja_literal(IMAGE_TOKEN) + " -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text ~ part['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set ns.out = ns.out ~ 'User: ' ~ (ns.text | trim) ~ '\n\n' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set ns.out = ns.out ~ 'Assistant:' ~ ((' ' ~ (ns.text | trim)) if (ns.text | trim) else '') ~ "
    + _jinja_literal(EOS_TOKEN)
    + " -%}"
    "{%- else -%}{{- raise_exception('a system message may only come first') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{%- set ns.out = ns.out ~ 'Assistant:' -%}{%- endif -%}"
    "{{- ns.out | trim -}}"
)
