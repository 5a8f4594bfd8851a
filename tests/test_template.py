"""The `deepseek` chat format: exact strings and exact label masks."""

from __future__ import annotations

from typing import Any

import pytest

from vlmops.config import DEFAULT_SYSTEM_PROMPT
from vlmops.conversation import ImageRef, ImageTagError, Message, parse_img_tags
from vlmops.models.template import EOS_TOKEN, IGNORE_INDEX, IMAGE_TOKEN, encode, render, text_encoder

SYS = DEFAULT_SYSTEM_PROMPT


def user(text: str) -> Message:
    return Message("user", parse_img_tags(text))


def assistant(text: str) -> Message:
    return Message("assistant", [text])


def test_single_turn_with_image() -> None:
    msgs = [user("<img>cat.png</img>What is this?"), assistant("A cat.")]
    assert render(msgs) == f"{SYS}\n\nUser: {IMAGE_TOKEN}What is this?\n\nAssistant: A cat.{EOS_TOKEN}"


def test_generation_prompt_ends_with_assistant_colon() -> None:
    msgs = [user("  Hi there  ")]
    assert render(msgs, add_generation_prompt=True) == f"{SYS}\n\nUser: Hi there\n\nAssistant:"


def test_multi_turn() -> None:
    msgs = [user("<img>a.png</img>Colour?"), assistant(" red "), user("Shape?"), assistant("circle")]
    assert render(msgs, system_prompt="") == (
        f"User: {IMAGE_TOKEN}Colour?\n\nAssistant: red{EOS_TOKEN}User: Shape?\n\nAssistant: circle{EOS_TOKEN}"
    )


def test_two_images_in_one_turn_stay_in_place() -> None:
    msgs = [user("Compare <img>a.png</img> with<img>b.png</img>: which is red?"), assistant("the first")]
    assert render(msgs, system_prompt="S") == (
        f"S\n\nUser: Compare {IMAGE_TOKEN} with{IMAGE_TOKEN}: which is red?\n\nAssistant: the first{EOS_TOKEN}"
    )


def test_system_prompt_override_and_system_message() -> None:
    msgs = [user("Hi"), assistant("Hello")]
    assert render(msgs, system_prompt="Be brief.") == f"Be brief.\n\nUser: Hi\n\nAssistant: Hello{EOS_TOKEN}"
    with_system = [Message("system", ["  Only colours. "]), *msgs]
    assert render(with_system) == f"Only colours.\n\nUser: Hi\n\nAssistant: Hello{EOS_TOKEN}"


def test_text_only_conversation() -> None:
    msgs = [user("AAAAA"), assistant("BBBBB"), user("CCCCC"), assistant("DDDDD")]
    assert render(msgs, system_prompt="") == (
        f"User: AAAAA\n\nAssistant: BBBBB{EOS_TOKEN}User: CCCCC\n\nAssistant: DDDDD{EOS_TOKEN}"
    )


def test_images_only_in_user_turns() -> None:
    with pytest.raises(ValueError, match="user turns"):
        render([user("hi"), Message("assistant", [ImageRef("x.png")])])


def test_encode_matches_render_and_expands_images(tiny_processor: Any) -> None:
    tok = tiny_processor.tokenizer
    n = tiny_processor.num_image_tokens
    msgs = [
        user("<img>a.png</img>What colour is the shape?"),
        assistant("red"),
        user("<img>b.png</img><img>c.png</img>And these?"),
        assistant("blue"),
    ]
    enc = encode(msgs, tok, n)
    assert enc.input_ids[0] == tok.bos_token_id
    expected = tok.bos_token + render(msgs).replace(IMAGE_TOKEN, IMAGE_TOKEN * n)
    assert tok.decode(enc.input_ids) == expected
    assert enc.input_ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 3 * n
    assert [i.uri for i in enc.images] == ["a.png", "b.png", "c.png"]


def test_labels_cover_only_answers_and_eos(tiny_processor: Any) -> None:
    tok = tiny_processor.tokenizer
    n = tiny_processor.num_image_tokens
    msgs = [user("<img>a.png</img>What colour is the shape?"), assistant("red"), user("Shape?"), assistant("circle")]
    enc = encode(msgs, tok, n, system_prompt="")
    labelled = [(i, t) for i, (t, lab) in enumerate(zip(enc.input_ids, enc.labels)) if lab != IGNORE_INDEX]
    # Every labelled position carries its own token as the label.
    assert all(enc.labels[i] == t for i, t in labelled)
    assert tok.decode([t for _, t in labelled]) == f" red{EOS_TOKEN} circle{EOS_TOKEN}"
    # Exactly: the answer tokens of " red" and " circle" and the two EOS, nothing else.
    red = tok.encode(" red", add_special_tokens=False)
    circle = tok.encode(" circle", add_special_tokens=False)
    assert [t for _, t in labelled] == [*red, tok.eos_token_id, *circle, tok.eos_token_id]
    # The prompt up to "Assistant:" is unlabelled, including every image token.
    prompt = encode(msgs[:1], tok, n, system_prompt="", add_generation_prompt=True)
    assert enc.input_ids[: len(prompt)] == prompt.input_ids
    assert set(enc.labels[: len(prompt)]) == {IGNORE_INDEX}


def test_generation_prompt_has_no_labels(tiny_processor: Any) -> None:
    enc = encode(
        [user("<img>a.png</img>Colour?")],
        tiny_processor.tokenizer,
        tiny_processor.num_image_tokens,
        add_generation_prompt=True,
    )
    assert set(enc.labels) == {IGNORE_INDEX}
    assert tiny_processor.tokenizer.decode(enc.input_ids).endswith("\n\nAssistant:")


TEXTS = [
    "",
    " ",
    "What colour is the shape?",
    "  leading and trailing  \n\n",
    "User: hi\n\nAssistant:",
    "naïve café — 日本語のテキスト, emoji 🙂, tabs\tand\r\nnewlines",
    f"text around {IMAGE_TOKEN} a placeholder and {EOS_TOKEN} an EOS written out",
    "x" * 3000,
]


def test_text_encoder_gives_the_tokenizers_own_ids(tiny_processor: Any) -> None:
    tok = tiny_processor.tokenizer
    fast = text_encoder(tok)
    for text in TEXTS:
        assert fast(text) == tok.encode(text, add_special_tokens=False), text[:40]


def test_text_encoder_respects_truncation_left_on_the_rust_tokenizer(tiny_processor: Any) -> None:
    tok = tiny_processor.tokenizer
    fast = text_encoder(tok)
    try:
        for text in TEXTS:
            tok(["a b c d e f g"], truncation=True, max_length=3)  # transformers leaves truncation set on the backend
            assert tok.backend_tokenizer.truncation is not None
            got = fast(text)
            assert got == tok.encode(text, add_special_tokens=False), text[:40]
        assert len(fast("x" * 3000)) > 3
    finally:
        tok.backend_tokenizer.no_truncation()


def test_text_without_a_tag_is_one_part_and_a_lone_closing_tag_is_refused() -> None:
    assert parse_img_tags("") == []
    assert parse_img_tags("What is <im g> this?") == ["What is <im g> this?"]
    assert parse_img_tags("<img> a.png </img>") == [ImageRef("a.png")]
    with pytest.raises(ImageTagError, match="closes no <img> tag"):
        parse_img_tags("What is this?</img>")
