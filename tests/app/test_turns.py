"""Bad input on the chat page becomes a message (`TurnRefused`), and the next turn is answered as usual."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from vlmops.app.models import PageModel, load_page_model
from vlmops.app.turns import Settings, TurnRefused, check_turn, stream_answers
from vlmops.models.tiny import NUM_IMAGE_TOKENS

MAX_LENGTH = 3 * NUM_IMAGE_TOKENS + 64  # room for two images and a short answer, not for four


@pytest.fixture(scope="module")
def page_model(chat_model_dir: Path) -> PageModel:
    return load_page_model(str(chat_model_dir), None, [f"data.max_length={MAX_LENGTH}", "infer.max_new_tokens=8"], None)


@pytest.fixture(scope="module")
def challenger(challenger_dir: Path) -> PageModel:
    return load_page_model(str(challenger_dir), None, [f"data.max_length={MAX_LENGTH}", "infer.max_new_tokens=8"], None)


def settings(model: PageModel, **changes: float) -> Settings:
    values = {**Settings.of(model.defaults).__dict__, **changes}
    return Settings(**values)


def answer(models: list[PageModel], query: str, images: list[str]) -> list[str]:
    *_, last = stream_answers(models, query, images, [[] for _ in models], settings(models[0]))
    return last


def test_page_model_card_and_budget(page_model: PageModel, chat_model_dir: Path) -> None:
    assert page_model.card.name == "readable"
    assert page_model.card.version is None
    assert page_model.card.lineage == {"checkpoint": str(chat_model_dir)}
    assert page_model.max_length == MAX_LENGTH
    assert page_model.defaults.max_new_tokens == 8


def test_unreadable_image_is_refused_and_the_next_turn_is_answered(
    page_model: PageModel, images: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(TurnRefused, match=r"^broken\.png cannot be read as an image: attach a PNG"):
        check_turn(page_model, "What is this?", [str(broken)], [], settings(page_model))
    check_turn(page_model, "What is this?", [str(images["red"])], [], settings(page_model))
    assert answer([page_model], "What is this?", [str(images["red"])])[0]


def test_an_unreadable_upload_among_several_is_named_by_its_place_and_a_gone_one_by_its_turn(
    page_model: PageModel, images: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    two = [str(images["red"]), str(broken)]
    with pytest.raises(TurnRefused, match=r"^broken\.png \(image 2 of 2\) cannot be read as an image: attach a PNG"):
        check_turn(page_model, "What is this?", two, [], settings(page_model))
    # an earlier turn's upload the server no longer has: the visitor cannot fix a path, only start over
    gone = tmp_path / "gone.png"
    history = [[page_model.chat.history_turn("What is this?", [str(gone)]), "A shape."]]
    with pytest.raises(
        TurnRefused, match=r"^an image of an earlier turn can no longer be read: clear the conversation"
    ):
        check_turn(page_model, "And now?", [str(images["red"])], history, settings(page_model))


def test_too_many_images_for_max_length(page_model: PageModel, images: dict[str, Path]) -> None:
    two = [str(images["red"]), str(images["blue"])]
    check_turn(page_model, "Compare them.", two, [], settings(page_model))
    with pytest.raises(
        TurnRefused, match=rf"needs \d+ tokens .* {NUM_IMAGE_TOKENS} per image.* max_length is {MAX_LENGTH}"
    ):
        check_turn(page_model, "Compare them.", two * 2, [], settings(page_model))
    # The history counts too: two more images after a turn with two do not fit either.
    history = [[page_model.chat.history_turn("Compare them.", two), "They differ."]]
    with pytest.raises(TurnRefused, match="clear the conversation"):
        check_turn(page_model, "And these?", two, history, settings(page_model))


@pytest.mark.parametrize(
    ("query", "images", "changes", "reason"),
    [
        ("", [], {}, "type a question"),
        ("<img>/etc/hosts.png</img>What is this?", [], {}, "upload button"),
        ("Is <image> like <image>?", [], {}, r"^2 <image> marks for 0 listed images: write one mark per image"),
        ("Hi", [], {"top_p": 0.0}, "top_p"),
        ("Hi", [], {"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_other_refusals(
    page_model: PageModel, query: str, images: list[str], changes: dict[str, float], reason: str
) -> None:
    with pytest.raises(TurnRefused, match=reason):
        check_turn(page_model, query, images, [], settings(page_model, **changes))


def test_side_by_side_streams_both_answers(
    page_model: PageModel, challenger: PageModel, images: dict[str, Path]
) -> None:
    updates = list(
        stream_answers([page_model, challenger], "What colour?", [str(images["blue"])], [[], []], settings(page_model))
    )
    left, right = updates[-1]
    assert left and right and left != right
    # Every update carries both answers so far; each answer only grows.
    for earlier, later in itertools.pairwise(updates):
        assert all(b.startswith(a) for a, b in zip(earlier, later))
    assert (left, right) == (
        answer([page_model], "What colour?", [str(images["blue"])])[0],
        answer([challenger], "What colour?", [str(images["blue"])])[0],
    )


def test_closing_a_side_by_side_turn_does_not_wait_for_a_busy_model_which_then_never_starts(
    page_model: PageModel, challenger: PageModel, images: dict[str, Path]
) -> None:
    """Closing the stream (the page cancelled the turn) runs on the server's event loop: it must not wait for a model
    another visitor's answer holds (every visitor's page would stall), and that model, once free, must not answer
    the cancelled turn."""
    import threading

    steps: list[int] = []
    handle = challenger.chat.loaded.model.lm_head.register_forward_hook(lambda *_: steps.append(1))
    challenger.lock.acquire()  # another visitor's answer holds the challenger
    try:
        stream = stream_answers(
            [page_model, challenger], "What colour?", [str(images["blue"])], [[], []], settings(page_model)
        )
        first = next(stream)
        assert first[0] and first[1] == ""  # the free model answers; the busy one waits
        closer = threading.Thread(target=stream.close)
        closer.start()
        closer.join(60)
        assert not closer.is_alive(), "closing the turn waited for the busy model"
    finally:
        challenger.lock.release()
    with challenger.lock:  # the waiting thread took the lock and left it at once: the turn was cancelled
        pass
    assert steps == []
    handle.remove()


def test_a_side_by_side_turn_that_fails_lets_the_failed_generations_cache_go(
    page_model: PageModel, challenger: PageModel, images: dict[str, Path]
) -> None:
    """One model's error (CUDA out of memory, say) reaches the page once both stopped, and once handled, the failed
    generation's K/V cache goes with it, without waiting for the collector."""
    import gc
    import weakref

    caches: list[weakref.ref[object]] = []

    def remember_cache(_module: object, _args: object, kwargs: dict[str, object]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.25 / 5.17
        if cache is not None:
            caches.append(weakref.ref(cache))

    def fail(*_: object) -> None:
        if len(caches) >= 3:
            raise RuntimeError("injected failure in decode step 3")

    model = challenger.chat.loaded.model
    handles = [
        model.model.language_model.register_forward_pre_hook(remember_cache, with_kwargs=True),
        model.lm_head.register_forward_hook(fail),
    ]
    gc.disable()
    try:
        try:
            answer([page_model, challenger], "What colour?", [str(images["blue"])])
        except RuntimeError as err:
            assert "injected failure" in str(err)
        else:
            raise AssertionError("the challenger's error did not reach the page")
        assert caches and caches[-1]() is None
    finally:
        gc.enable()
        for handle in handles:
            handle.remove()
    assert all(answer([page_model, challenger], "What colour?", [str(images["blue"])]))  # both answer again
