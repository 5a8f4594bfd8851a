"""One turn of the chat page: check what the visitor sent, then stream each model's answer.

Everything a visitor can get wrong (an unreadable image, more images than `max_length` holds, settings out of
range) is found before generation starts and raised as `TurnRefused`, whose message the page shows in place
of an answer; the conversation so far is kept and the server goes on serving.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from vlmops.app.models import PageModel
from vlmops.config import InferConfig
from vlmops.conversation import ImageTagError
from vlmops.data.images import ImageLoadError
from vlmops.errors import UserInputError
from vlmops.infer.chat import History


class TurnRefused(UserInputError):  # noqa: N818 (reads as "the turn was refused")
    """The page cannot answer this turn; the message says why and what to change."""


@dataclass(frozen=True)
class Settings:
    """The generation settings on the page (those of `vlmops infer`'s `infer` section)."""

    max_new_tokens: int
    temperature: float
    top_p: float

    @classmethod
    def of(cls, infer_cfg: InferConfig) -> Settings:
        return cls(infer_cfg.max_new_tokens, infer_cfg.temperature, infer_cfg.top_p)

    def apply(self, base: InferConfig) -> InferConfig:
        """`base` with these settings, range-checked by the config schema."""
        update = {"max_new_tokens": int(self.max_new_tokens), "temperature": self.temperature, "top_p": self.top_p}
        try:
            return InferConfig.model_validate({**base.model_dump(), **update})
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise TurnRefused(f"generation settings: {problems}") from err


def check_turn(model: PageModel, query: str, images: Sequence[str], history: History, settings: Settings) -> None:
    """Refuse a turn this model cannot answer, with the reason (reads the images once to be sure they open).

    Raises:
        TurnRefused: no question, `<img>` tags in the text, `<image>` marks not one per attached image, an unreadable
            image, settings out of range, or a
            conversation longer than `max_length` tokens once the answer is added.
    """
    if not query.strip() and not images:
        raise TurnRefused("type a question, or attach an image, before sending")
    if "<img" in query.lower():
        # On the page images come from the visitor's machine; a tag would make the server read its own files.
        raise TurnRefused(
            "attach images with the upload button (or drop them on the box): <img> tags are not read here"
        )
    settings.apply(model.defaults)
    try:
        with model.lock:  # a ChatModel is not thread-safe (its tokenizer may be streaming another answer)
            length = model.chat.prompt_length(query, history, images)
    except ImageLoadError as err:
        raise TurnRefused(_unreadable(images, err)) from err
    except ImageTagError as err:  # `<image>` marks typed in the box, not one per attached image
        raise TurnRefused(str(err).removeprefix("query: ")) from err
    needed = length + int(settings.max_new_tokens)
    if needed > model.max_length:
        per_image = model.chat.loaded.num_image_tokens
        raise TurnRefused(
            f"{model.card.label}: this turn needs {needed} tokens ({length} of prompt, {per_image} per image, "
            f"+ {int(settings.max_new_tokens)} new tokens) but max_length is {model.max_length}: send fewer "
            "images, lower max new tokens, or clear the conversation"
        )


def _unreadable(images: Sequence[str], err: ImageLoadError) -> str:
    """Which upload failed (the error's `images[i]`), named as the visitor knows it: its file name and place among
    this turn's uploads, not the path the server saved it under. An earlier turn's image that is gone (the server's
    upload folder cleaned) is the conversation's to clear."""
    if err.field.startswith("history["):
        return "an image of an earlier turn can no longer be read: clear the conversation to go on"
    match = re.fullmatch(r"images\[(\d+)\]", err.field)
    if match is None:
        return str(err)
    index = int(match.group(1))
    place = f" (image {index + 1} of {len(images)})" if len(images) > 1 else ""
    return (
        f"{Path(images[index]).name}{place} cannot be read as an image: attach a PNG, JPEG, WebP or another format "
        "Pillow opens"
    )


def stream_answer(
    model: PageModel,
    query: str,
    images: Sequence[str],
    history: History,
    settings: Settings,
    stop: threading.Event | None = None,
) -> Generator[str, None, None]:
    """The answer so far, growing (as `ChatModel.chat_stream`), generated with the page's settings; `stop` set ends
    it after the token being generated, or before it starts when it is set while waiting for the model."""
    with model.lock:
        if stop is not None and stop.is_set():
            return
        model.chat.infer_cfg = settings.apply(model.defaults)
        yield from model.chat.chat_stream(query, history, images, stop=stop)


def stream_answers(
    models: Sequence[PageModel],
    query: str,
    images: Sequence[str],
    histories: Sequence[History],
    settings: Settings,
) -> Iterator[list[str]]:
    """Every model's answer so far, each time one of them grows: the models generate at the same time.

    Raises the first error a model raised, once every model has stopped.
    """
    if len(models) == 1:
        for text in stream_answer(models[0], query, images, histories[0], settings):
            yield [text]
        return
    answers = [""] * len(models)
    updates: queue.Queue[tuple[int, str | None]] = queue.Queue()
    errors: list[BaseException] = []
    stop = threading.Event()

    def run(index: int) -> None:
        stream = stream_answer(models[index], query, images, histories[index], settings, stop)
        try:
            for text in stream:
                updates.put((index, text))
        except Exception as err:  # handed to the consumer, which raises it
            errors.append(err)
        finally:
            stream.close()
            updates.put((index, None))

    threads = [threading.Thread(target=run, args=(i,), name=f"vlmops-app-{i}", daemon=True) for i in range(len(models))]
    for thread in threads:
        thread.start()
    running = len(models)
    try:
        while running:
            index, update = updates.get()
            if update is None:
                running -= 1
                continue
            answers[index] = update
            yield list(answers)
    finally:
        # The page closed the stream (the turn cancelled): every model's generation ends after its next token, and a
        # model still waiting for its lock (another visitor's answer) never starts. Not joined: this runs on the
        # server's event loop, which a wait for another visitor's answer would stall for every visitor. Run to the
        # end, every thread has already said it is done.
        stop.set()
    if errors:
        raise errors.pop(0)  # not errors[0]: the frame would hold it, and its traceback the frame (a cycle)
