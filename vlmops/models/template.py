"""The `deepseek` chat format of DeepSeek-VL: one implementation for training, inference and evaluation.

Prompt layout (DESIGN.md §5), for a system prompt S and turns u1, a1, u2:

    S\\n\\nUser: u1\\n\\nAssistant: a1<eos>User: u2\\n\\nAssistant:

Each message's text is stripped; an image sits exactly where its placeholder is; the whole string is
stripped. The tokenizer prepends BOS and each image placeholder becomes `num_image_tokens` image tokens.
Labels cover each assistant answer and its EOS; everything else is -100.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from vlmops.config import DEFAULT_SYSTEM_PROMPT
from vlmops.conversation import ImageRef, Message

IMAGE_TOKEN = "<image_placeholder>"
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IGNORE_INDEX = -100
ROLE_NAMES = {"user": "User", "assistant": "Assistant"}


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def convert_tokens_to_ids(self, tokens: str) -> int: ...


@dataclass(frozen=True)
class Segment:
    """A piece of the prompt: text (trained or not) or one image."""

    text: str = ""
    image: ImageRef | None = None
    trained: bool = False
    eos: bool = False


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    images: list[ImageRef]

    def __len__(self) -> int:
        return len(self.input_ids)


def resolve_system_prompt(system_prompt: str | None) -> str:
    """None means the released default; an empty string means no system prompt."""
    return DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt


def segments(
    messages: Sequence[Message], system_prompt: str | None = None, add_generation_prompt: bool = False
) -> list[Segment]:
    """The prompt as segments. A `system` message in `messages` overrides `system_prompt`."""
    system = resolve_system_prompt(system_prompt)
    turns = list(messages)
    if turns and turns[0].role == "system":
        system = turns[0].text("").strip()
        turns = turns[1:]
    out: list[Segment] = []
    if system:
        out.append(Segment(system + "\n\n"))
    for message in turns:
        if message.role == "system":
            raise ValueError("a system message may only come first")
        role = ROLE_NAMES[message.role]
        if message.role == "user":
            out.append(Segment(f"{role}: "))
            out.extend(_stripped_parts(message))
            out.append(Segment("\n\n"))
        else:
            text = message.text("").strip()
            if message.images:
                raise ValueError("images are only supported in user turns")
            out.append(Segment(f"{role}:"))
            if text:
                out.append(Segment(" " + text, trained=True))
            out.append(Segment(eos=True, trained=True))
    if add_generation_prompt:
        out.append(Segment(f"{ROLE_NAMES['assistant']}:"))
    return out


def render(
    messages: Sequence[Message],
    system_prompt: str | None = None,
    add_generation_prompt: bool = False,
    image_token: str = IMAGE_TOKEN,
    eos_token: str = EOS_TOKEN,
) -> str:
    """The prompt string, one `image_token` per image (before expansion), BOS not included."""
    pieces = []
    for seg in segments(messages, system_prompt, add_generation_prompt):
        if seg.image is not None:
            pieces.append(image_token)
        elif seg.eos:
            pieces.append(eos_token)
        else:
            pieces.append(seg.text)
    return "".join(pieces).strip()


def encode(
    messages: Sequence[Message],
    tokenizer: Tokenizer,
    num_image_tokens: int,
    system_prompt: str | None = None,
    add_generation_prompt: bool = False,
    image_token: str = IMAGE_TOKEN,
) -> Encoded:
    """Token ids and labels for a conversation; the same ids `render` + the tokenizer would give."""
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    text_ids = text_encoder(tokenizer)
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no BOS or EOS token; it is not a DeepSeek-VL tokenizer")
    segs = _strip_edges(segments(messages, system_prompt, add_generation_prompt))
    input_ids = [tokenizer.bos_token_id]
    labels = [IGNORE_INDEX]
    images: list[ImageRef] = []
    pending = ""  # untrained text is tokenized in one piece, as the reference tokenizes the whole prompt

    def flush() -> None:
        nonlocal pending
        if pending:
            ids = text_ids(pending)
            input_ids.extend(ids)
            labels.extend([IGNORE_INDEX] * len(ids))
            pending = ""

    for seg in segs:
        if seg.image is not None:
            flush()
            images.append(seg.image)
            input_ids.extend([image_token_id] * num_image_tokens)
            labels.extend([IGNORE_INDEX] * num_image_tokens)
        elif seg.eos:
            flush()
            input_ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        elif seg.trained:
            flush()
            ids = text_ids(seg.text)
            input_ids.extend(ids)
            labels.extend(ids)
        else:
            pending += seg.text
    flush()
    return Encoded(input_ids, labels, images)


def text_encoder(tokenizer: Tokenizer) -> Callable[[str], list[int]]:
    """`tokenizer.encode(text, add_special_tokens=False)`, through the Rust tokenizer itself where there is one.

    The same ids without transformers' Python work around each call (~1 ms: a batch job's main thread spent more
    time there than launching the GPU's work). transformers sets truncation and padding on the Rust tokenizer
    before each call and leaves them behind; where any is set, or special tokens are split, its own path runs.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "split_special_tokens", False):
        return lambda text: list(tokenizer.encode(text, add_special_tokens=False))

    def encode_text(text: str) -> list[int]:
        if backend.truncation is not None or backend.padding is not None:
            return list(tokenizer.encode(text, add_special_tokens=False))
        return list(backend.encode(text, add_special_tokens=False).ids)

    return encode_text


def _stripped_parts(message: Message) -> list[Segment]:
    """A user message's parts as segments, its text stripped at both ends (images stay in place)."""
    parts = list(message.parts)
    out = [Segment(image=p) if isinstance(p, ImageRef) else Segment(p) for p in parts]
    return _strip_edges(out)


def _strip_edges(segs: list[Segment]) -> list[Segment]:
    """Strip whitespace at the very start and end of the text, skipping over nothing but empty text."""
    segs = list(segs)
    for index in range(len(segs)):
        seg = segs[index]
        if seg.image is not None or seg.eos:
            break
        stripped = seg.text.lstrip()
        segs[index] = Segment(stripped, trained=seg.trained)
        if stripped:
            break
    for index in range(len(segs) - 1, -1, -1):
        seg = segs[index]
        if seg.image is not None or seg.eos:
            break
        stripped = seg.text.rstrip()
        segs[index] = Segment(stripped, trained=seg.trained)
        if stripped:
            break
    return [s for s in segs if s.image is not None or s.eos or s.text]
