"""The chat page: Gradio Blocks over one model, or two answering side by side, and the server that runs it.

    ┌ model card ───────────┐ ┌ model card (--compare) ┐
    │ chat (streamed)       │ │ chat (streamed)        │
    └───────────────────────┘ └────────────────────────┘
    [ question + images (upload or drop)          ] [Send]
    [Clear]   status: why a turn was refused
    ▸ Generation settings: max new tokens, temperature, top-p

A visitor's conversation lives in the page's state (one `[query, response]` history per model, images as
`<img>` tags of the files Gradio saved on upload), so visitors never see each other's chats.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import gradio as gr

from vlmops.app.models import ModelCard, PageModel
from vlmops.app.turns import Settings, TurnRefused, check_turn, stream_answers
from vlmops.conversation import ImageRef, parse_img_tags
from vlmops.errors import UserInputError
from vlmops.infer.chat import History

log = logging.getLogger(__name__)

TITLE = "vlmops chat"
MAX_NEW_TOKENS_LIMIT = 4096
MAX_UPLOAD = "50mb"  # per file: photos are a few MB; anything far larger is a mistake or abuse
# Lineage first, in this order; any other tag of the version (metrics, ...) follows alphabetically.
LINEAGE_FIRST = (
    "git_commit",
    "mlflow_run_id",
    "prefect_flow_run_id",
    "dataset.hash",
    "dvc.dataset.md5",
    "dvc.model.md5",
)

Message = dict[str, Any]


def card_markdown(card: ModelCard, model: PageModel) -> str:
    """The model card above a chat: the reference, its version and aliases, then its lineage."""
    lines = [f"### {card.label}", f"`{card.ref}`" + (f" → `{card.load_ref}`" if card.load_ref != card.ref else "")]
    facts = [f"version **{card.version}**" if card.version else "not a registered version"]
    if card.aliases:
        facts.append("aliases " + ", ".join(f"**@{alias}**" for alias in card.aliases))
    facts.append(f"max_length {model.max_length}")
    lines.append(" · ".join(facts))
    keys = [key for key in LINEAGE_FIRST if key in card.lineage] + sorted(set(card.lineage) - set(LINEAGE_FIRST))
    if keys:
        lines.append(
            "<details><summary>lineage</summary>\n\n"
            + "\n".join(f"- {key}: `{card.lineage[key]}`" for key in keys)
            + "\n</details>"
        )
    return "\n\n".join(lines)


def chat_messages(history: History) -> list[Message]:
    """The chat panel's messages for a history: each turn's images, then its text, then the answer."""
    messages: list[Message] = []
    for query, response in history:
        messages.extend(user_messages(query))
        messages.append({"role": "assistant", "content": response})
    return messages


def user_messages(turn: str) -> list[Message]:
    images = [part.uri for part in parse_img_tags(turn) if isinstance(part, ImageRef)]
    text = "".join(part for part in parse_img_tags(turn) if isinstance(part, str)).strip()
    return [{"role": "user", "content": {"path": path}} for path in images] + (
        [{"role": "user", "content": text}] if text else []
    )


def build_page(models: Sequence[PageModel]) -> gr.Blocks:
    """The page for `models` (one, or two side by side answering the same turns)."""
    defaults = Settings.of(models[0].defaults)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as page:
        gr.Markdown(f"## {TITLE}" + (" — side by side" if len(models) > 1 else ""))
        chats: list[gr.Chatbot] = []
        with gr.Row(equal_height=True):
            for index, model in enumerate(models):
                with gr.Column():
                    gr.Markdown(card_markdown(model.card, model), elem_id=f"card-{index}")
                    chats.append(
                        gr.Chatbot(label=model.card.label, elem_id=f"chat-{index}", height=520, feedback_options=None)
                    )
        prompt = gr.MultimodalTextbox(
            file_types=["image"],
            file_count="multiple",
            sources=["upload"],
            placeholder="Ask about your images: attach several with the button or drop them here",
            show_label=False,
            elem_id="prompt",
        )
        with gr.Row():
            clear = gr.Button("Clear", elem_id="clear", variant="secondary", scale=0, min_width=120)
            status = gr.Markdown("", elem_id="status")
        # Each range reaches the model's own setting (a run saved with top-p 0.01): Gradio refuses a value outside a
        # slider's range, so a setting beyond it made every turn fail.
        with gr.Accordion("Generation settings", open=True, elem_id="settings"), gr.Row():
            max_new_tokens = gr.Slider(
                1,
                max(MAX_NEW_TOKENS_LIMIT, defaults.max_new_tokens),
                value=defaults.max_new_tokens,
                step=1,
                label="max new tokens",
            )
            temperature = gr.Slider(
                0.0,
                max(2.0, defaults.temperature),
                value=defaults.temperature,
                step=0.05,
                label="temperature (0: greedy)",
            )
            top_p = gr.Slider(
                min(0.05, defaults.top_p), 1.0, value=defaults.top_p, step=0.05, label="top-p (sampling only)"
            )
        histories = gr.State([[] for _ in models])

        def respond(
            message: dict[str, Any] | None, states: list[History], *settings: float
        ) -> Iterator[tuple[Any, ...]]:
            yield from _respond(models, message, states, Settings(int(settings[0]), settings[1], settings[2]))

        prompt.submit(
            respond,
            [prompt, histories, max_new_tokens, temperature, top_p],
            [prompt, histories, status, *chats],
            concurrency_limit=None,  # each model's lock serialises generation; refusals need not wait for it
        )

        def clear_all() -> tuple[Any, ...]:
            return (None, [[] for _ in models], "", *([[]] * len(models)))

        clear.click(clear_all, None, [prompt, histories, status, *chats], queue=False)
    return page


def _respond(
    models: Sequence[PageModel], message: dict[str, Any] | None, states: list[History], settings: Settings
) -> Iterator[tuple[Any, ...]]:
    """Yields (prompt box, histories, status, *chat panels) as the answers stream in."""
    query = (message or {}).get("text", "") or ""
    images = [str(path) for path in (message or {}).get("files", []) or []]
    shown = [chat_messages(history) for history in states]
    try:
        for model, history in zip(models, states):
            check_turn(model, query, images, history, settings)
    except TurnRefused as err:
        # The box keeps what the visitor sent, so they can fix it and send again.
        yield (gr.update(), states, f"⚠️ {err}", *shown)
        return
    turn = models[0].chat.history_turn(query, images)
    asked = [[*messages, *user_messages(turn)] for messages in shown]
    yield (gr.update(value=None, interactive=False), states, "", *[[*m, _answer("…")] for m in asked])
    answers = [""] * len(models)
    try:
        for answers in stream_answers(models, query, images, states, settings):
            yield (gr.update(), states, "", *[[*m, _answer(a or "…")] for m, a in zip(asked, answers)])
    except (ValueError, OSError, RuntimeError) as err:
        # Generation failed (e.g. out of memory on a long history): say so, keep the conversation as it was.
        log.exception("turn failed")
        yield (gr.update(interactive=True), states, f"⚠️ the answer failed: {err}", *shown)
        return
    new_states = [[*history, [turn, answer]] for history, answer in zip(states, answers)]
    yield (gr.update(interactive=True), new_states, "", *[[*m, _answer(a)] for m, a in zip(asked, answers)])


def _answer(text: str) -> Message:
    return {"role": "assistant", "content": text}


def serve(models: Sequence[PageModel], host: str, port: int, login: tuple[str, str] | None) -> None:
    """Serve the page on `host:port` until interrupted (`login`: the user and password it asks for)."""
    page = build_page(models)
    page.queue(default_concurrency_limit=None)
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    try:
        page.launch(
            server_name=host,
            server_port=port,
            auth=login,
            auth_message="Log in to chat with the model" if login else None,
            share=False,
            inbrowser=False,
            show_error=False,  # errors the page did not turn into a message are logged here, not shown to visitors
            footer_links=[],
            max_file_size=MAX_UPLOAD,
            theme=theme,  # system fonts: the page loads nothing from other sites
        )
    except OSError as err:  # the port is taken, or the host is not an address of this machine
        raise UserInputError(
            f"cannot serve the chat page on {host}:{port}: {err}; pick another --port or --host"
        ) from err
