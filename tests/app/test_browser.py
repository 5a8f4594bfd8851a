"""The chat page in a real browser: Debian's chromium, headless, driven by Playwright, against `vlmops app`.

One server per mode (single model, side by side), shared by the tests of that mode. The tiny model answers
with random words, which is all these tests need: text that streams in and stays. Screenshots go to each
test's tmp_path and to outputs/browser-screenshots/ to look at.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.app.conftest import AppProcess

pytestmark = pytest.mark.browser

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
)

CHROMIUM_NAMES = ("chromium", "chromium-browser")
SCREENSHOTS = Path("outputs/browser-screenshots")
ANSWER_TIMEOUT_MS = 120_000
# Stream long answers so that several partial updates reach the browser before the last one.
SERVER_SETTINGS = ["--set", "infer.max_new_tokens=48", "--set", "infer.temperature=0"]
LOGIN = "tester:not-a-secret"


def chromium_binary() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium; `make setup` installs it)")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = chromium_binary()
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def servers(
    chat_model_dir: Path, challenger_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, AppProcess]]:
    """Both servers of this module, started together: one model, and two side by side behind a login."""
    chromium_binary()  # no browser: skip before starting anything
    logs = tmp_path_factory.mktemp("app-servers")
    started: dict[str, AppProcess] = {}
    try:
        started["single"] = AppProcess(["--model", str(chat_model_dir), *SERVER_SETTINGS], logs / "single.log")
        started["compare"] = AppProcess(
            ["--model", str(chat_model_dir), "--compare", str(challenger_dir), *SERVER_SETTINGS, "--auth", LOGIN],
            logs / "compare.log",
        )
        yield started
    finally:
        for process in started.values():
            process.stop()


@pytest.fixture(scope="module")
def single_url(servers: dict[str, AppProcess]) -> str:
    return servers["single"].wait_ready()


@pytest.fixture(scope="module")
def compare_url(servers: dict[str, AppProcess]) -> str:
    return servers["compare"].wait_ready()


@pytest.fixture
def page(browser, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    opened = context.new_page()
    yield opened
    context.close()


def screenshot(page, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENSHOTS / path.name)


WATCH_ANSWERS = """(chatId) => {
    // Record every distinct text the last answer of a chat panel shows, as it streams in.
    window.seen = window.seen || {};
    window.seen[chatId] = [];
    const panel = document.getElementById(chatId);
    const placeholders = ['…', 'Loading content'];
    const record = () => {
        const bots = panel.querySelectorAll('.bot');
        const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
        const seen = window.seen[chatId];
        // Skip the placeholders shown before the first words arrive.
        if (text && !placeholders.includes(text) && seen[seen.length - 1] !== text) seen.push(text);
    };
    new MutationObserver(record).observe(panel, {subtree: true, childList: true, characterData: true});
}"""


def ask(page, question: str, images: list[Path] | None = None) -> None:  # type: ignore[no-untyped-def]
    """Attach `images` to the prompt box, type `question` and send it with Enter."""
    box = page.locator("#prompt")
    if images:
        box.locator("input[type=file]").set_input_files([str(p) for p in images])
        # Uploads finish before the text goes in: the thumbnails appear in the box.
        page.wait_for_function(
            "n => document.querySelectorAll('#prompt img').length >= n", arg=len(images), timeout=30_000
        )
    box.locator("textarea").fill(question)
    box.locator("textarea").press("Enter")


def wait_for_answers(page, chat_id: str, count: int) -> list[str]:  # type: ignore[no-untyped-def]
    """Wait until `chat_id` shows `count` finished answers (the prompt box is usable again); return their texts."""
    page.wait_for_function(
        """([id, n]) => {
            const bots = document.getElementById(id).querySelectorAll('.bot');
            const box = document.querySelector('#prompt textarea');
            return bots.length >= n && box && !box.disabled
                && !['', '…', 'Loading content'].includes(bots[bots.length - 1].innerText.trim());
        }""",
        arg=[chat_id, count],
        timeout=ANSWER_TIMEOUT_MS,
    )
    return [b.inner_text().strip() for b in page.locator(f"#{chat_id} .bot").all()]


def streamed_texts(page, chat_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    return list(page.evaluate("id => window.seen[id]", chat_id))


def assert_streamed(texts: list[str], final: str) -> None:
    """The answer appeared in several growing steps, each a prefix of the next, ending in the final answer."""
    assert len(texts) >= 2, f"the answer arrived in one piece, not streamed: {texts}"
    for earlier, later in itertools.pairwise(texts):
        assert later.startswith(earlier), (earlier, later)
    assert texts[-1] == final


def test_upload_ask_stream_and_follow_up(page, single_url: str, images: dict[str, Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    page.goto(single_url)
    page.wait_for_selector("#prompt textarea")
    assert "readable" in page.locator("#card-0").inner_text()  # the model card: name, version line, max_length
    page.evaluate(WATCH_ANSWERS, "chat-0")

    ask(page, "What colour is the shape?", [images["red"], images["blue"]])
    first = wait_for_answers(page, "chat-0", 1)
    assert first[0], "no answer text"
    assert_streamed(streamed_texts(page, "chat-0"), first[0])
    assert page.locator("#chat-0 .user img").count() == 2  # both uploaded images are in the conversation
    screenshot(page, tmp_path, "single-first-answer")

    # The settings on the page apply to the next turn: each token of this model is one word.
    max_new_tokens = page.locator("#settings input[type=number]").first
    max_new_tokens.fill("6")
    max_new_tokens.press("Enter")
    page.evaluate(WATCH_ANSWERS, "chat-0")
    ask(page, "And what shape is it?")
    answers = wait_for_answers(page, "chat-0", 2)
    assert len(answers) == 2 and answers[0] == first[0]
    assert len(answers[1].split()) == 6, answers[1]
    assert_streamed(streamed_texts(page, "chat-0"), answers[1])
    assert "What colour is the shape?" in page.locator("#chat-0").inner_text()
    assert "And what shape is it?" in page.locator("#chat-0").inner_text()
    screenshot(page, tmp_path, "single-follow-up")

    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelectorAll('#chat-0 .bot').length === 0", timeout=30_000)


def test_unreadable_image_gets_a_message_and_the_page_keeps_working(
    page, single_url: str, images: dict[str, Path], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG")
    page.goto(single_url)
    page.wait_for_selector("#prompt textarea")

    ask(page, "What is in this picture?", [broken])
    page.wait_for_function(
        "() => document.getElementById('status').innerText.includes('broken.png')", timeout=ANSWER_TIMEOUT_MS
    )
    status = page.locator("#status").inner_text()
    assert "broken.png cannot be read as an image" in status
    assert "Traceback" not in status and "/gradio/" not in status  # no stack trace, no server paths
    assert page.locator("#chat-0 .bot").count() == 0  # nothing was answered or kept
    screenshot(page, tmp_path, "single-unreadable-image")

    page.locator("#clear").click()  # drops the broken upload from the box too
    ask(page, "What colour is the shape?", [images["red"]])
    assert wait_for_answers(page, "chat-0", 1)[0]
    assert page.locator("#status").inner_text().strip() == ""


def test_compare_answers_side_by_side_behind_a_login(
    page, compare_url: str, images: dict[str, Path], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    assert requests.get(f"{compare_url}/config", timeout=10).status_code == 401  # nothing without the login
    page.goto(compare_url)
    user, password = LOGIN.split(":")
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill("wrong")
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("text=Incorrect Credentials", timeout=30_000)
    screenshot(page, tmp_path, "compare-login")
    page.get_by_label("username").fill(user)  # a failed login empties both fields
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#prompt textarea")
    assert "readable" in page.locator("#card-0").inner_text()
    assert "challenger" in page.locator("#card-1").inner_text()
    page.evaluate(WATCH_ANSWERS, "chat-0")
    page.evaluate(WATCH_ANSWERS, "chat-1")

    ask(page, "What colour is the shape?", [images["blue"]])
    left = wait_for_answers(page, "chat-0", 1)
    right = wait_for_answers(page, "chat-1", 1)
    assert left[0] and right[0]
    assert left[0] != right[0]  # two different models answered
    assert_streamed(streamed_texts(page, "chat-0"), left[0])
    assert_streamed(streamed_texts(page, "chat-1"), right[0])
    for chat_id in ("chat-0", "chat-1"):  # the same question and image went to both
        assert page.locator(f"#{chat_id} .user img").count() == 1
        assert "What colour is the shape?" in page.locator(f"#{chat_id}").inner_text()
    screenshot(page, tmp_path, "compare-answers")
