"""`vlmops infer` in a real terminal (pexpect): streamed answers, multi-turn history, clear, errors, quit."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import pexpect
import pytest

from vlmops.cli.infer import PROMPT, SEPARATOR
from vlmops.config import InferConfig, dump_config, load_config
from vlmops.infer.chat import ChatModel
from vlmops.infer.resolve import RETRAIN_MODEL_DIR
from vlmops.train.rundir import CONFIG_FILE, RunInfo

REPO = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")
MAX_NEW_TOKENS = 160
STREAM_ATTEMPTS = 3


def spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TERM": "dumb"}
    return pexpect.spawn(
        sys.executable,
        ["-m", "vlmops.cli", "infer", *args],
        cwd=str(REPO),
        env=env,
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 4000),  # wide enough that the terminal never wraps a long query
    )


def ask(child: pexpect.spawn, query: str) -> tuple[str, int]:
    """Send one turn; return the answer text and how many separate reads carried it."""
    child.expect_exact(PROMPT)
    child.sendline(query)
    seen = child.buffer  # anything expect() already read past the prompt
    child.buffer = ""
    reads_with_answer = 0
    while SEPARATOR not in seen:
        chunk = child.read_nonblocking(size=65536, timeout=120)
        before = _answer_part(seen, query)
        seen += chunk
        if len(_answer_part(seen, query)) > len(before) and SEPARATOR not in chunk:
            reads_with_answer += 1
    child.buffer = seen.split(SEPARATOR, 1)[1]  # the next prompt may have come in the same read
    return _answer_part(seen, query).strip(), reads_with_answer


def answer_once(query: str, *args: str) -> str:
    """`vlmops infer ARGS`: one question, its answer, then `quit` (the session must end cleanly)."""
    child = spawn(*args)
    try:
        answer, _ = ask(child, query)
        child.expect_exact(PROMPT)
        child.sendline("quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    return answer


def _answer_part(output: str, query: str) -> str:
    """What the program printed after echoing the query line, up to the separator."""
    text = ANSI.sub("", output).replace("\r", "")
    _, _, after = text.partition(query + "\n")
    return after.split(SEPARATOR)[0]


@pytest.fixture(scope="module")
def expected(readable_model: Path, images: dict[str, Path]) -> dict[str, str]:
    """The answers the same model gives in-process (greedy, so the terminal must show exactly these)."""
    model = ChatModel.load(readable_model, infer_cfg=InferConfig.model_validate({"max_new_tokens": MAX_NEW_TOKENS}))
    q1 = f"<img>{images['red']}</img>What colour is the shape?"
    r1, h1 = model.chat(q1)
    r2, _ = model.chat("And what shape is it?", h1)
    fresh, _ = model.chat("And what shape is it?")
    return {"q1": q1, "r1": r1, "r2": r2, "fresh": fresh}


def test_interactive_chat_streams_keeps_history_clears_and_quits(
    readable_model: Path, expected: dict[str, str], tmp_path: Path
) -> None:
    child = spawn("--model", str(readable_model), "--set", f"infer.max_new_tokens={MAX_NEW_TOKENS}")
    try:
        # Streamed: the answer arrives over several reads. A test process starved of CPU while the child answers (a
        # busy CI machine) can find it all buffered at once, so a turn that came in one piece is asked again, after
        # clearing the history; an answer that is not streamed comes in one piece every time.
        for attempt in range(STREAM_ATTEMPTS):
            if attempt:
                child.expect_exact(PROMPT)
                child.sendline("clear")
                child.expect_exact("history cleared: 1 earlier turn forgotten")
            answer, reads = ask(child, expected["q1"])
            assert answer == expected["r1"]
            if reads >= 5:
                break
        assert reads >= 5, (
            f"the answer came in {reads} read(s) in the last of {STREAM_ATTEMPTS} tries: it was not streamed"
        )

        answer, _ = ask(child, "And what shape is it?")
        assert answer == expected["r2"]  # the second turn saw the first

        # A bad image fails that turn only; the session and its history go on.
        missing = tmp_path / "missing.png"
        child.expect_exact(PROMPT)
        child.sendline(f"<img>{missing}</img>What is this?")
        child.expect(r"error: query: image \S*missing\.png: file not found")

        child.expect_exact(PROMPT)
        child.sendline("clear")
        child.expect_exact("history cleared: 2 earlier turns forgotten")  # the failed turn was not kept
        answer, _ = ask(child, "And what shape is it?")
        assert answer == expected["fresh"] != expected["r2"]  # no earlier turns in the prompt any more

        child.expect_exact(PROMPT)
        child.sendline("quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_interactive_ckpt_chats_with_the_trained_run_and_ctrl_d_quits(lora_run: Path, images: dict[str, Path]) -> None:
    query = f"<img>{images['blue']}</img>What colour is the shape?"
    tuned, _ = ChatModel.load(lora_run).chat(query)  # max_new_tokens etc. from the run's saved config
    child = spawn("--ckpt", str(lora_run))
    try:
        start = time.monotonic()
        answer, _ = ask(child, query)
        assert answer == tuned
        child.expect_exact(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
        assert time.monotonic() - start < 120
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_interactive_model_given_a_run_folder_takes_its_saved_config(lora_run: Path, images: dict[str, Path]) -> None:
    """`--model RUN` is the run's model with its saved config (generation settings, system prompt), as `--ckpt RUN`,
    `vlmops app --model RUN` and `ChatModel.load(RUN)` take it; it answered with the defaults (64 new tokens, not the
    run's 8)."""
    query = f"<img>{images['blue']}</img>What colour is the shape?"
    tuned, _ = ChatModel.load(lora_run).chat(query)
    assert answer_once(query, "--model", str(lora_run)) == tuned


def test_interactive_model_given_a_retrain_flow_run_folder_takes_its_merged_models_saved_config(
    readable_model: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    """`--model outputs/runs/<run>` (a retrain flow run folder: its model is merged/, with the run's config beside it)
    answers with that config, as `ChatModel.load` and `vlmops app --model` take it; it used the built-in defaults
    (the released system prompt and 64 new tokens where the run said 3)."""
    run = tmp_path / "runs" / "r1"
    merged = run / RETRAIN_MODEL_DIR
    shutil.copytree(readable_model, merged)
    saved = ["model.system_prompt=You answer in colours.", "infer.max_new_tokens=3"]
    (merged / CONFIG_FILE).write_text(dump_config(load_config(None, saved)))
    RunInfo(str(readable_model), str(tmp_path), "test", "full", merged_from=str(tmp_path / "final")).write(merged)
    query = f"<img>{images['blue']}</img>What colour is the shape?"
    expected, _ = ChatModel.load(str(run)).chat(query)
    default, _ = ChatModel.load(str(readable_model)).chat(query)
    assert expected != default  # the saved config makes a difference to see
    assert answer_once(query, "--model", str(run)) == expected


def test_ctrl_c_stops_an_answer_and_keeps_the_session(readable_model: Path) -> None:
    child = spawn("--model", str(readable_model), "--set", "infer.max_new_tokens=1000000")
    try:
        child.expect_exact(PROMPT)
        child.sendline("Say hello.")
        child.expect(r"\w+ \w+ \w+")  # the endless answer is streaming
        child.sendintr()
        child.expect_exact("[stopped: this turn is not kept in the history]", timeout=90)
        child.expect_exact(PROMPT)
        child.sendline("clear")
        child.expect_exact("history cleared: 0 earlier turns forgotten")  # the stopped turn was not kept
        child.expect_exact(PROMPT)
        child.sendintr()  # at the prompt, Ctrl-C leaves
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_interactive_reports_a_missing_model_and_exits_2(tmp_path: Path) -> None:
    child = spawn("--model", str(tmp_path / "no-such-model"))
    child.expect(r"error: model folder \S*no-such-model does not exist")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
