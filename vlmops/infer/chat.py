"""Chat with a DeepSeek-VL model from Python: load once, then `chat` or `chat_stream`, turn after turn.

    >>> model = ChatModel.load("outputs/runs/demo")   # a checkpoint, a run folder or models:/NAME@ALIAS
    >>> response, history = model.chat("<img>cat.png</img>What is this?")
    >>> for text in model.chat_stream("And its colour?", history):
    ...     print(text)                                # the answer so far, growing

As the seed's `inference(model, template, query, history)`: a query may hold `<img>path-or-URL</img>` tags
anywhere (local path, http(s), s3:// or data: URI), and `history` is a list of `[query, response]` pairs.
A ChatModel is not thread-safe: one conversation step at a time.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria

from vlmops.config import InferConfig, PipelineConfig, StorageConfig
from vlmops.conversation import IMAGE_MARK, ImageRef, ImageTagError, Message, Part, parse_img_tags
from vlmops.data.image_paths import REMOTE_PREFIXES
from vlmops.data.images import ImageLoadError, load_image
from vlmops.infer.generation import answer_tokens, decode_answer, generate, generation_config, model_inputs
from vlmops.infer.resolve import ModelSource, ResolveModel, model_source, resolve_model_ref, with_saved_generation
from vlmops.models.loading import LoadedModel, load_model
from vlmops.models.template import encode
from vlmops.plural import counted

log = logging.getLogger(__name__)

History = list[list[str]]
IMAGE_CACHE_SIZE = 32  # remote images kept between turns: each turn re-encodes the whole history


class ChatModel:
    """A loaded model with its chat settings: system prompt, generation settings, image storage."""

    def __init__(
        self,
        loaded: LoadedModel,
        system_prompt: str | None = None,
        infer_cfg: InferConfig | None = None,
        storage: StorageConfig | None = None,
        source: ModelSource | None = None,
    ):
        self.loaded = loaded
        self.system_prompt = system_prompt
        self.infer_cfg = infer_cfg if infer_cfg is not None else InferConfig.model_validate({})
        self.storage = storage
        self.source = source or ModelSource(loaded.path)
        self._images: OrderedDict[str, Image.Image] = OrderedDict()

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str],
        adapter: str | os.PathLike[str] | None = None,
        dtype: str = "auto",
        attn: str = "sdpa",
        device: torch.device | str | None = None,
        system_prompt: str | None = None,
        infer_cfg: InferConfig | None = None,
        *,
        storage: StorageConfig | None = None,
        tracking_uri: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        resolve_model: ResolveModel | None = None,
        allow_pickle: bool = False,
    ) -> ChatModel:
        """Load a model for chat.

        Args:
            model: a checkpoint folder, a `vlmops sft` run folder (its adapter on its base model, or its full
                weights), or `models:/NAME@ALIAS` / `models:/NAME/VERSION` from the MLflow registry.
            adapter: a peft adapter folder or LoRA run folder to apply to `model`.
            system_prompt: None: the run's `model.system_prompt` when `model` is a run, else the released
                default; "": none.
            infer_cfg: generation settings. Those it was given (`InferConfig(max_new_tokens=8)`, a config file's)
                win; where `model` is a run (a registered version of one too) the others are its saved `infer`
                settings, as `vlmops infer --set` takes them (`with_saved_settings`); else the defaults.
            tracking_uri: the MLflow registry for `models:/` (None: MLflow's current tracking URI).
            cache_dir: where registered versions are downloaded (None: ~/.cache/vlmops/models/registry).
            resolve_model: turns a model reference into a local folder (default: `resolve_model_ref`).
            allow_pickle: load pickle weights too (model.allow_pickle); by default only safetensors.
        """
        resolve = resolve_model or functools.partial(resolve_model_ref, tracking_uri=tracking_uri, cache_dir=cache_dir)
        source = model_source(str(model), None if adapter is None else str(adapter), resolve)
        if source.run is not None:
            saved = source.run.config
            system_prompt = saved.model.system_prompt if system_prompt is None else system_prompt
            given = infer_cfg if infer_cfg is not None else InferConfig.model_validate({})
            infer_cfg = with_saved_generation(given, saved.infer)
        loaded = load_model(
            source.checkpoint, dtype=dtype, attn=attn, device=device, adapter=source.adapter, allow_pickle=allow_pickle
        )
        return cls(loaded, system_prompt, infer_cfg, storage, source)

    @classmethod
    def from_config(
        cls,
        model: str | os.PathLike[str],
        config: PipelineConfig,
        adapter: str | os.PathLike[str] | None = None,
        system: str | None = None,
    ) -> ChatModel:
        """`load` with the settings of a pipeline config (dtype, attention, system prompt, generation,
        storage, registry, catalog); `system` overrides the config's system prompt ("" for none). A model that
        comes with a saved config (a run, a registered version of one) brings its generation settings and system
        prompt where `config` does not set them (`with_saved_settings`)."""
        from vlmops.infer.resolve import catalog_resolver, with_saved_settings

        source = model_source(str(model), None if adapter is None else str(adapter), catalog_resolver(config))
        config = with_saved_settings(config, source)
        loaded = load_model(
            source.checkpoint,
            dtype=config.model.dtype,
            attn=config.model.attn,
            adapter=source.adapter,
            allow_pickle=config.model.allow_pickle,
        )
        system_prompt = config.model.system_prompt if system is None else system
        return cls(loaded, system_prompt, config.infer, config.storage, source)

    def chat(
        self,
        query: str,
        history: History | None = None,
        images: Sequence[str] | None = None,
        system: str | None = None,
    ) -> tuple[str, History]:
        """Answer `query` after `history`; return the answer and the history with this turn appended.

        Args:
            query: the user's text; `<img>path-or-URL</img>` tags anywhere in it add images at that place.
            history: earlier `[query, response]` pairs (not modified).
            images: more images (paths or URIs): they fill the query's `<image>` marks in order, or, where it has
                none, come before its text, as in a batch job's simple record (`query` + `images`) and ms-swift.
            system: this call's system prompt instead of the model's ("" for none).

        Raises:
            ImageLoadError: an image cannot be read; the message names it and the argument that holds it (`images[1]`,
                `query`, `history[0][0]`; also its `field`), as a batch job's reject names the record's field.
            ImageTagError: an `<img>` tag that is not closed or is nested, named the same way; `<image>` marks in the
                query that are not one per listed image.
        """
        turn, prompt, pil_images = self._prompt(query, history, images, system)
        inputs = model_inputs(self.loaded, [prompt], pil_images)
        output = generate(self.loaded, inputs, generation_config(self.loaded, self.infer_cfg))
        generated = output[0, inputs["input_ids"].shape[1] :].tolist()
        response = decode_answer(self.loaded, answer_tokens(generated, self.loaded.tokenizer.eos_token_id))
        return response, [*(history or []), [turn, response]]

    def chat_stream(
        self,
        query: str,
        history: History | None = None,
        images: Sequence[str] | None = None,
        system: str | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[str]:
        """As `chat`, but yield the answer so far each time it grows; the last value is the whole answer.

        Every value is a prefix of the next (whitespace at the ends is held back until it is followed by
        text). The new history is `history + [[query + image tags, last value]]`. Closing the iterator
        early stops generation, and so does setting `stop` (from a signal handler, say): the answer then
        ends after the token being generated, and the iterator ends normally (with no value at all where `stop`
        was set before generation began). An error in generation is raised here.
        """
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        _turn, prompt, pil_images = self._prompt(query, history, images, system)
        if stop is not None and stop.is_set():
            return  # stopped while the images were read: nothing is generated, nothing yielded
        inputs = model_inputs(self.loaded, [prompt], pil_images)
        streamer = TextIteratorStreamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        closed = threading.Event()
        errors: list[BaseException] = []

        def answer() -> None:
            try:
                generate(
                    self.loaded,
                    inputs,
                    generation_config(self.loaded, self.infer_cfg),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopWhenSet(closed, *([stop] if stop else []))]),
                )
            except BaseException as err:  # handed to the consumer, which re-raises it
                errors.append(err)
                streamer.end()  # wakes the consumer, which would otherwise wait for text forever

        thread = threading.Thread(target=answer, name="vlmops-generate", daemon=True)
        thread.start()
        text = ""
        shown: str | None = None
        try:
            for piece in streamer:
                text += piece
                if text.strip() != shown and text.strip():
                    shown = text.strip()
                    yield shown
        finally:
            closed.set()
            thread.join()
        if errors:
            raise errors.pop()  # not errors[0]: the frame would hold it, and its traceback the frame (a cycle)
        if shown is None:
            yield ""

    def prompt_length(
        self,
        query: str,
        history: History | None = None,
        images: Sequence[str] | None = None,
        system: str | None = None,
    ) -> int:
        """How many tokens the prompt of this turn has, image tokens included, before anything is generated.

        Reads the images as `chat` would, so an unreadable one raises `ImageLoadError` here, up front.
        """
        return len(self._prompt(query, history, images, system)[1])

    def history_turn(self, query: str, images: Sequence[str] | None = None) -> str:
        """The query as stored in the history: `images` as `<img>` tags where the prompt has them (`_placed`).

        Raises:
            ImageTagError: `<image>` marks in the query that are not one per image.
        """
        listed = list(images or [])
        return "".join(
            piece if isinstance(piece, str) else f"<img>{listed[piece]}</img>" for piece in _placed(query, listed)
        )

    def _prompt(
        self, query: str, history: History | None, images: Sequence[str] | None, system: str | None
    ) -> tuple[str, list[int], list[Image.Image]]:
        """The history entry for this turn, the prompt's token ids and its images in prompt order. Each image is named
        by the argument that holds it (`query`, `images[1]`, `history[0][0]`), in an error, as a batch job's reject names
        a record's field."""
        turn = self.history_turn(query, images)
        if not turn.strip():
            raise ValueError("empty query: type a question, optionally with <img>path-or-URL</img> tags")
        messages: list[Message] = []
        for index, pair in enumerate(history or []):
            if not isinstance(pair, list | tuple) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                raise ValueError(f"history[{index}] must be a [query, response] pair of strings, got {pair!r}")
            messages.append(Message("user", _named_parts(pair[0], f"history[{index}][0]")))
            messages.append(Message("assistant", [pair[1]]))
        given = [ImageRef(str(uri).strip(), f"images[{i}]") for i, uri in enumerate(images or [])]
        parts: list[Part] = []
        for piece in _placed(query, given):
            parts += _named_parts(piece, "query") if isinstance(piece, str) else [given[piece]]
        messages.append(Message("user", parts))
        encoded = encode(
            messages,
            self.loaded.tokenizer,
            self.loaded.num_image_tokens,
            self.system_prompt if system is None else system,
            add_generation_prompt=True,
        )
        return turn, encoded.input_ids, [self._named_image(ref) for ref in encoded.images]

    def _named_image(self, ref: ImageRef) -> Image.Image:
        """`_image`, its error named by the argument that holds the image: `images[1]: image x.png: file not found`."""
        try:
            return self._image(ref.uri, tagged=not ref.field.startswith("images["))
        except ImageLoadError as err:
            raise err.at(ref.field) from err

    def _image(self, uri: str, tagged: bool) -> Image.Image:
        """The image `uri` names; `tagged`: it was written in an <img> tag (the fix to a bad one is the tag's)."""
        if not uri:
            fix = "put a path or URL between the tags" if tagged else "give an image path or URL"
            raise ImageLoadError(f"empty image {'tag <img></img>' if tagged else 'reference'}: {fix}")
        if not uri.startswith(REMOTE_PREFIXES):
            path = Path(uri).expanduser()
            if not path.is_file():
                where = "the <img> tag's path" if tagged else "the path"
                raise ImageLoadError(
                    f"image {uri}: file not found ({path.resolve()}); check {where}", kind="missing_image"
                )
            # Not cached: a local file is cheap to read, and may have been edited since the last turn.
            return load_image(str(path), self.storage)
        if uri in self._images:
            self._images.move_to_end(uri)
            return self._images[uri]
        image = load_image(uri, self.storage)
        self._images[uri] = image
        if len(self._images) > IMAGE_CACHE_SIZE:
            self._images.popitem(last=False)
        return image


def _placed(query: str, images: Sequence[object]) -> list[str | int]:
    """The query's text pieces and, by index, the listed `images` where they go: in its `<image>` marks, in order, or,
    with no mark, all before the text (a batch job's simple record places them so: vlmops.infer.records).

    Raises:
        ImageTagError: marks in the query, but not one per image.
    """
    pieces = IMAGE_MARK.split(query)
    if len(pieces) == 1:
        return [*range(len(images)), query]
    if len(pieces) - 1 != len(images):
        raise ImageTagError(
            f"query: {counted(len(pieces) - 1, '<image> mark')} for {counted(len(images), 'listed image')}: write one "
            "mark per image in images, or none (the images then come before the text)"
        )
    placed: list[str | int] = [pieces[0]]
    for index, piece in enumerate(pieces[1:]):
        placed += [index, piece]
    return placed


def _named_parts(text: str, field: str) -> list[Part]:
    """`text`'s text and `<img>` images (`parse_img_tags`), each image and a broken tag named by `field`."""
    try:
        parts = parse_img_tags(text)
    except ImageTagError as err:
        raise ImageTagError(f"{field}: {err}") from None
    return [ImageRef(part.uri, field) if isinstance(part, ImageRef) else part for part in parts]


class _StopWhenSet(StoppingCriteria):
    """A stopping criterion that ends generation for every row once any of `events` is set."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stopped = any(event.is_set() for event in self.events)
        return torch.full((input_ids.shape[0],), stopped, dtype=torch.bool, device=input_ids.device)
