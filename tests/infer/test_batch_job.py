"""Batch inference jobs as jobs: resumed after a kill, exactly once, never mixed with another job; the CLI,
MLflow tracking, S3 input and output, and the retrain step's child process."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import pytest

from tests.image_server import serving_images
from tests.infer.test_batch_infer import rejects, results
from vlmops.cli.main import main
from vlmops.config import PipelineConfig, load_config
from vlmops.errors import UserInputError
from vlmops.evaluate.metrics import evaluate_predictions
from vlmops.infer.batch_job import run_batch_job
from vlmops.infer.job_output import JobMismatchError, write_eval_predictions
from vlmops.infer.job_plan import job_settings
from vlmops.infer.job_status import JobResult, job_status
from vlmops.infer.output import open_output
from vlmops.infer.summary import sample_rows

ROOT = Path(__file__).resolve().parents[2]


def job_config(**overrides: Any) -> PipelineConfig:
    return load_config(None, {"infer.max_new_tokens": 4, **overrides})


def simple_prompts(path: Path, count: int, image: Path | None = None) -> Path:
    """`count` simple records with ids (every third with an image, copied beside the file: inside its root)."""
    if image is not None:
        shutil.copy(image, path.parent / image.name)
    with path.open("w") as f:
        for i in range(count):
            record: dict[str, Any] = {"id": f"r{i}", "query": f"Question {i}: what is {i} plus {i}?"}
            if image is not None and i % 3 == 0:
                record["images"] = [image.name]
            f.write(json.dumps(record) + "\n")
    return path


def keys_across_parts(out: Path) -> list[Any]:
    return [
        json.loads(line)["key"] for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()
    ]


def start_until_parts(
    cmd: list[str], env: dict[str, str], out: Path, parts: int, **popen: Any
) -> subprocess.Popen[Any]:
    """`cmd` started in a process group of its own, returned once `parts` parts are written under `out`."""
    job = subprocess.Popen(cmd, env=env, start_new_session=True, **popen)
    deadline = time.monotonic() + 300
    while len(list(out.glob("part-*.jsonl"))) < parts:
        assert job.poll() is None, "the job ended before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job


def test_killed_job_resumes_exactly_once_and_a_third_run_does_nothing(
    tiny_model: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    prompts = simple_prompts(tmp_path / "prompts.jsonl", 40, images["red"])
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "vlmops.cli", "batch-infer", "--model", str(tiny_model), "--input", str(prompts),
        "--output", str(out), "--set", "infer.shard_size=4", "--set", "infer.batch_size=2",
        "--set", "infer.max_new_tokens=4",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = start_until_parts(cmd, env, out, 2, stderr=subprocess.DEVNULL)  # kill once the job is under way
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = sorted(p.name for p in out.glob("part-*.jsonl"))
    assert 2 <= len(done_before) < 10 and not (out / "manifest.json").exists()
    status = subprocess.run([*cmd[:3], "batch-status", str(out)], env=env, capture_output=True, text=True, check=True)
    assert f"{len(done_before)} of 10 shards done" in status.stdout and "the same command resumes it" in status.stdout
    assert f"{len(done_before)} shards: {4 * len(done_before)} records" in status.stdout

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert "done" in second.stdout and "40 read: 40 answered, 0 rejected" in second.stdout
    assert f"this run          {10 - len(done_before)} shards in " in second.stdout  # only the shards not done before
    keys = keys_across_parts(out)
    assert sorted(keys) == sorted(f"r{i}" for i in range(40)) and len(keys) == 40  # every input exactly once
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in manifest["parts"]] == [f"part-{i:05d}.jsonl" for i in range(10)]
    assert all(p["sha256"] for p in manifest["parts"]) and manifest["records_read"] == 40

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json*")}
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert "finished before, nothing to do" in third.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json*")} == stamps
    # Stopped between its last part and its manifest: the rerun answers nothing, and says it finished the job.
    (out / "manifest.json").unlink()
    fourth = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert "every shard was answered before: gathered them and wrote the manifest" in fourth.stdout
    assert json.loads((out / "manifest.json").read_text())["parts"] == manifest["parts"]


def test_a_missing_part_is_redone_alone_and_another_job_is_refused(
    tiny_model: Path, full_run: Path, demo_data: tuple[Path, Path], tmp_path: Path
) -> None:
    _, eval_file = demo_data
    out = tmp_path / "out"
    config = job_config(**{"infer.shard_size": 2})
    first = run_batch_job(str(tiny_model), str(eval_file), str(out), config, progress=False)
    assert len(first.ran) == 3
    answers = (out / "part-00001.jsonl").read_text()
    (out / "part-00001.jsonl").unlink()
    (out / "manifest.json").unlink()
    again = run_batch_job(str(tiny_model), str(eval_file), str(out), config, progress=False)
    assert [s.shard for s in again.ran] == [1] and (out / "part-00001.jsonl").read_text() == answers
    assert run_batch_job(str(tiny_model), str(eval_file), str(out), config, progress=False).ran == []

    # Another model, other settings, another input: refused, and nothing in the folder changes.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(JobMismatchError, match=r"holds job \w+, not this job \w+ \(model .*tiny-deepseek-vl"):
        run_batch_job(str(full_run), str(eval_file), str(out), config, progress=False)
    with pytest.raises(JobMismatchError, match=r"settings infer.max_new_tokens: 4 -> 5"):
        run_batch_job(
            str(tiny_model), str(eval_file), str(out), job_config(**{"infer.shard_size": 2, "infer.max_new_tokens": 5})
        )
    with pytest.raises(JobMismatchError, match=r"input .*: eval.jsonl was read then, not now, train.jsonl is new"):
        run_batch_job(str(tiny_model), str(demo_data[0]), str(out), config, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # Batch size is not part of the job: the same job, done.
    assert (
        run_batch_job(
            str(tiny_model), str(eval_file), str(out), job_config(**{"infer.shard_size": 2, "infer.batch_size": 1})
        ).ran
        == []
    )
    # A plan a newer vlmops wrote, with fields this one does not know: refused, not resumed without them.
    plan = json.loads((out / "_job/job.json").read_text())
    plan["priority"], plan["files"][0]["sampled"] = 1, [0]
    (out / "_job/job.json").write_text(json.dumps(plan))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(
        UserInputError, match=r"_job/job.json has 2 fields this vlmops does not know \(files\[\]\.sampled, priority\)"
    ):
        run_batch_job(str(tiny_model), str(eval_file), str(out), config, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "part-00000.jsonl").write_text("{}\n")
    with pytest.raises(JobMismatchError, match="not a batch inference job's folder"):
        run_batch_job(str(tiny_model), str(eval_file), str(foreign), config, progress=False)


def test_another_input_into_a_job_output_is_refused_naming_the_files_that_differ(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A folder's job, rerun on one of its files or after a file changed: the refusal names the file. It named
    'records chosen: the rejects of no job vs no job' whenever the number of files differed."""
    (tmp_path / "in").mkdir()
    first = simple_prompts(tmp_path / "in" / "a.jsonl", 2)
    simple_prompts(tmp_path / "in" / "b.jsonl", 3)
    out = tmp_path / "out"
    assert run_batch_job(str(tiny_model), str(tmp_path / "in"), str(out), job_config(), progress=False).results == 5

    with pytest.raises(JobMismatchError, match=r"\(input \S+ vs \S+a.jsonl: b.jsonl was read then, not now\); a diff"):
        run_batch_job(str(tiny_model), str(first), str(out), job_config(), progress=False)
    with first.open("a") as f:
        f.write(json.dumps({"id": "r9", "query": "One more?"}) + "\n")
    with pytest.raises(JobMismatchError, match=r"\(input \S+ vs \S+: a.jsonl changed\); a different"):
        run_batch_job(str(tiny_model), str(tmp_path / "in"), str(out), job_config(), progress=False)


def test_the_limits_on_prompts_and_images_are_part_of_the_job(
    tiny_model: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    """`infer.max_context` and `data.allowed_roots` decide which records are rejects (`infer.max_context` whichever
    engine answers: the plain engine took prompts up to the model's 4,096 positions), so a rerun with another value
    into the same output is refused, naming the setting; it said 'finished before' and kept rejects (or answers) that
    the new value would not have given. The same roots written another way are the same job; the way out the
    settings' docs name, the rejects answered again into a new output, answers the record the cap rejected."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(images["blue"], elsewhere / "blue.png")
    (tmp_path / "in").mkdir()
    prompts = simple_prompts(tmp_path / "in" / "prompts.jsonl", 4, images["red"])
    with prompts.open("a") as f:
        f.write(json.dumps({"id": "long", "query": "Describe it. " + "colour " * 300}) + "\n")
        f.write(json.dumps({"id": "outside", "query": f"<img>{elsewhere / 'blue.png'}</img>What colour?"}) + "\n")
    cap, roots = {"infer.max_context": 256}, {"data.allowed_roots": [str(elsewhere)]}
    out = tmp_path / "out"
    first = run_batch_job(str(tiny_model), str(prompts), str(out), job_config(**cap, **roots), progress=False)
    assert (first.results, first.rejects) == (5, 1)
    (reject,) = rejects(out)
    assert reject["key"] == "long" and "exceed the 256 tokens a request may take" in reject["reason"]

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(JobMismatchError, match=r"\(settings infer.max_context: 256 -> unset\); a different"):
        run_batch_job(str(tiny_model), str(prompts), str(out), job_config(**roots), progress=False)
    with pytest.raises(JobMismatchError, match=r"\(settings data.allowed_roots: \['[^']*elsewhere'\] -> unset\)"):
        run_batch_job(str(tiny_model), str(prompts), str(out), job_config(**cap), progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    same_roots = {"data.allowed_roots": [f"{tmp_path}/in/../elsewhere/", str(elsewhere)]}
    done = run_batch_job(str(tiny_model), str(prompts), str(out), job_config(**cap, **same_roots), progress=False)
    assert isinstance(done, JobResult) and done.finished_before

    again = job_config(**roots, **{"infer.retry_rejects": str(out)})
    retried = run_batch_job(str(tiny_model), str(prompts), str(tmp_path / "again"), again, progress=False)
    assert (retried.results, retried.rejects) == (1, 0) and results(tmp_path / "again")[0]["key"] == "long"
    # Left at their defaults the limits are not in the job: a job planned before they were keeps its id.
    assert set(job_settings(job_config())) == {
        "max_new_tokens", "temperature", "top_p", "repetition_penalty", "shard_size", "system_prompt", "dtype"
    }  # fmt: skip


def test_a_max_context_without_room_for_a_prompt_is_refused_before_the_job_starts(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`infer.max_context` at or below `infer.max_new_tokens` holds no prompt: the plain engine rejected every record
    one by one (a finished job of rejects). The config is refused where it is read, before the model is resolved:
    `batch-infer` named a model that does not exist, and said so only after that, so a catalog 7b would have been
    downloaded (and hashed) first. Settings that reach the job without the config's check (a model's saved
    `infer.max_new_tokens`, a config copied in code) are refused before any input is read, whichever engine, naming
    both keys and the fix, as the fast engine does when it is built."""
    prompts = simple_prompts(tmp_path / "prompts.jsonl", 3)
    out = tmp_path / "out"
    missing = tmp_path / "no-such-model"
    for context in (8, 4):  # equal, and below
        settings = ["--set", f"infer.max_context={context}", "--set", "infer.max_new_tokens=8"]
        assert main(["batch-infer", "-m", str(missing), "-i", str(prompts), "-o", str(out), *settings]) == 2
        err = capsys.readouterr().err
        assert f"override infer.max_context={context}: infer.max_context {context} leaves no room" in err, err
        assert "no-such-model" not in err and not out.exists()
    # The model exists: the same refusal, and no job started.
    main(["batch-infer", "-m", str(tiny_model), "-i", str(prompts), "-o", str(out), *settings])
    assert "infer.max_context 4 leaves no room" in capsys.readouterr().err and not out.exists()

    valid = job_config(**{"infer.engine": "plain", "infer.max_new_tokens": 8})
    for context in (8, 4):
        config = valid.model_copy(update={"infer": valid.infer.model_copy(update={"max_context": context})})
        with pytest.raises(
            UserInputError,
            match=rf"infer.max_context {context} leaves no room for a prompt beside infer.max_new_tokens 8 .*every "
            r"record would be rejected. Raise infer.max_context .* or lower infer.max_new_tokens",
        ):
            run_batch_job(str(tiny_model), str(prompts), str(out), config, progress=False)
    assert not out.exists()  # no job started
    # Room for these prompts beside the answer: the job runs as before.
    config = job_config(**{"infer.engine": "plain", "infer.max_context": 128, "infer.max_new_tokens": 2})
    assert run_batch_job(str(tiny_model), str(prompts), str(out), config, progress=False).results == 3


def test_a_max_context_that_holds_none_of_the_jobs_prompts_is_refused_before_the_model_loads(
    tiny_model: Path,
    images: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`infer.max_context` a few tokens above `infer.max_new_tokens` passes the config's check but holds no real
    prompt (the chat template and system prompt alone are dozens of tokens, an image 576 on the real models): the job
    loaded the model and rejected every record one by one. The plan counts the prompts as the runner encodes them, so
    the job is refused once its inputs are read, before the weights load, naming the shortest prompt, its tokens and
    the setting that holds it; at exactly that setting the shortest record is answered (the count is the runner's to
    the token) and each longer one is a reject that gives its token count and the limit."""
    prompts = simple_prompts(tmp_path / "prompts.jsonl", 3, images["red"])  # line 1 with an image, 2 and 3 without
    out = tmp_path / "out"

    def no_weights(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model's weights were loaded")

    monkeypatch.setattr("vlmops.infer.batch_job.load_runner", no_weights)
    for engine in ("plain", "auto"):
        config = job_config(**{"infer.engine": engine, "infer.max_context": 12, "infer.max_new_tokens": 8})
        with pytest.raises(UserInputError) as info:
            run_batch_job(str(tiny_model), str(prompts), str(out), config, progress=False)
        found = re.fullmatch(
            r"infer.max_context 12 holds none of this job's prompts beside infer.max_new_tokens 8: its shortest prompt "
            r"\(prompts.jsonl:(\d)\) takes (\d+) tokens \(chat template, system prompt and image tokens included\), "
            r"so every record would be rejected \(3 records\). Raise infer.max_context to at least (\d+) \(\d+ \+ 8\), "
            r"or unset it to size it to the job's prompts",
            str(info.value),
        )
        assert found, str(info.value)
        line, shortest, needed = (int(n) for n in found.groups())
        assert line == 2 and needed == shortest + 8 and shortest > 20, str(info.value)  # the text-only record
        assert not out.exists()  # no job started
    settings = ["--set", "infer.max_context=12", "--set", "infer.max_new_tokens=8"]
    assert main(["batch-infer", "-m", str(tiny_model), "-i", str(prompts), "-o", str(out), *settings]) == 2
    assert not out.exists()

    monkeypatch.undo()
    config = job_config(**{"infer.engine": "plain", "infer.max_context": needed, "infer.max_new_tokens": 8})
    with caplog.at_level(logging.WARNING, logger="vlmops.infer.batch_job"):
        done = run_batch_job(str(tiny_model), str(prompts), str(out), config, progress=False)
    assert (done.results, done.rejects) == (2, 1) and [r["key"] for r in results(out)] == ["r1", "r2"]
    (reject,) = rejects(out)
    assert reject["key"] == "r0" and reject["kind"] == "prompt_too_long"
    assert re.match(
        rf"prompt: \d+ tokens \(1 image of \d+ tokens\) \+ infer.max_new_tokens 8 exceed the {needed} tokens a request "
        r"may take \(infer.max_context",
        reject["reason"],
    ), reject["reason"]
    (advice,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert advice.startswith(f"infer.max_context {needed} holds prompts of up to {shortest} tokens beside infer.")
    assert "the job's longest prompt (prompts.jsonl:" in advice and "goes to the rejects with its token count" in advice


def test_cli_summary_and_exit_codes(
    tiny_model: Path, demo_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, eval_file = demo_data
    out = tmp_path / "out"
    args = ["batch-infer", "--model", str(tiny_model), "--input", str(eval_file), "--output", str(out)]
    assert main([*args, "--set", "infer.max_new_tokens=3"]) == 0
    printed = capsys.readouterr().out
    assert "6 read: 6 answered, 0 rejected" in printed and "tokens/s" in printed and "images/s" in printed
    assert f"{out}/part-*.jsonl (1 part)" in printed
    assert re.search(r"start-up +\d+\.\d s before the first shard", printed), printed
    assert re.search(r"answers +greedy\n", printed), printed
    sampled = ["--set", "infer.temperature=0.7", "--set", "infer.top_p=0.9", "--set", "infer.seed=3"]
    assert main([*args[:-1], str(tmp_path / "sampled"), "--set", "infer.max_new_tokens=3", *sampled]) == 0
    assert "answers           sampled: temperature 0.7, top_p 0.9, top_k off, seed 3\n" in capsys.readouterr().out
    assert main([*args, "--set", "infer.max_new_tokens=2"]) == 2
    assert "error: output" in capsys.readouterr().err
    assert main([*args[:-1], str(tmp_path / "new"), "--set", "infer.engine=turbo"]) == 2
    assert (
        main(["batch-infer", "--model", str(tiny_model), "--input", str(tmp_path / "none"), "--output", str(out)]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    # A folder that holds no model (here the input's): said so, with the forms --model takes, before anything is read.
    # It was transformers' "Unrecognized processing class in ... Can't instantiate a processor, a tokenizer, ...".
    assert main([*args[:2], str(eval_file.parent), *args[3:-1], str(tmp_path / "not-a-model")]) == 2
    err = capsys.readouterr().err
    assert f"error: model {eval_file.parent}: not a model folder (no config.json, no run.json)" in err, err
    assert "models:/NAME@ALIAS" in err and not (tmp_path / "not-a-model").exists()
    # An --output that is a file: a message and exit 2, not a traceback and exit 1.
    assert main([*args[:-1], str(eval_file)]) == 2
    assert f"error: output {eval_file} is a file; pass a folder" in capsys.readouterr().err
    assert main(["batch-status", str(eval_file)]) == 2
    (tmp_path / "empty.jsonl").write_text("\n")
    empty = ["batch-infer", "--model", str(tiny_model), "--input", str(tmp_path / "empty.jsonl")]
    assert main([*empty, "--output", str(tmp_path / "out-empty")]) == 0
    printed = capsys.readouterr().out
    assert ": the input holds no records" in printed and "0 read: 0 answered, 0 rejected" in printed, printed


def test_a_shards_log_line_says_1_result_1_reject_1_token(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The line each finished shard logs read "shard 00000: 1 results, 1 rejects, 1 tokens in 0.2 s"."""
    prompts = tmp_path / "prompts.jsonl"
    records = [{"id": "a", "query": "Hello?"}, {"id": "bad", "query": "Hi", "system": 5}]  # the second: a reject
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = job_config(**{"infer.max_new_tokens": 1})
    with caplog.at_level(logging.INFO, logger="vlmops.infer.job"):
        run_batch_job(str(tiny_model), str(prompts), str(tmp_path / "out"), config, progress=False)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("shard 00000: ")]
    assert len(said) == 1 and re.fullmatch(r"shard 00000: 1 result, 1 reject, 1 token in \d+\.\d s", said[0]), said


def test_a_trial_run_answers_the_first_shards_and_the_same_command_goes_on(
    tiny_model: Path, demo_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`infer.max_shards`: a run answers that many of the shards to do and stops without the manifest; the job is
    the same, so the command without it answers only the rest, every record once."""
    train_file, _ = demo_data  # 11 records: shards of 4, 4 and 3
    out = tmp_path / "out"
    args = ["batch-infer", "--model", str(tiny_model), "--input", str(train_file), "--output", str(out)]
    args += ["--set", "infer.max_new_tokens=3", "--set", "infer.shard_size=4"]
    assert main([*args, "--set", "infer.max_shards=1"]) == 0
    printed = capsys.readouterr().out
    assert ": stopped after infer.max_shards=1\n" in printed, printed
    assert re.search(r"done +1 of 3 shards: 4 records, 4 answered, 0 rejected", printed), printed
    assert re.search(r"to do +2 shards: 7 records", printed), printed
    assert re.search(r"this run +1 shard in \d+\.\d s", printed), printed
    assert "run the same command without infer.max_shards" in printed
    assert sorted(p.name for p in out.glob("part-*.jsonl")) == ["part-00000.jsonl"]
    assert not (out / "manifest.json").exists()
    status = job_status(open_output(str(out)))
    assert [s.name for s in status.pending] == ["00001", "00002"] and status.manifest is None

    assert main([*args, "--set", "infer.max_shards=5"]) == 0  # more than are left: the job finishes
    printed = capsys.readouterr().out
    assert ": done\n" in printed and "this run          2 shards in " in printed, printed
    manifest = json.loads((out / "manifest.json").read_text())
    keys = [json.loads(line)["key"] for part in manifest["parts"] for line in (out / part["name"]).open()]
    assert keys == [f"train.jsonl:{i}" for i in range(1, 12)]  # every record once, in input order
    assert main(args) == 0 and ": finished before, nothing to do" in capsys.readouterr().out


def test_a_jobs_rejects_are_answered_again_alone_once_their_images_are_there(
    tiny_model: Path, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`infer.retry_rejects`: after the missing images are added, a new job answers only the records the finished
    job rejected, read where they are (a .jsonl's lines, a .json list's items; files without a reject not read),
    with the keys and sources that job would have given them; resumable like any job, and a job of its own."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(images["red"], data / "red.png")

    def record(i: int, image: str) -> dict[str, Any]:
        return {"id": f"q{i}", "query": f"<img>{image}</img>Colour {i}?"}

    lines = [record(i, "blue.png" if i in (1, 4, 6) else "red.png") for i in range(8)]
    text = "".join(json.dumps(r) + "\n" + ("\n" if i == 2 else "") for i, r in enumerate(lines))  # a blank line too
    (data / "a.jsonl").write_text(text)
    items = [record(10 + i, "blue.png" if i == 1 else "red.png") for i in range(4)]
    (data / "b.json").write_text(json.dumps(items, indent=2))
    (data / "c.jsonl").write_text(json.dumps(record(20, "red.png")) + "\n")
    first, retry = tmp_path / "first", tmp_path / "retry"
    args = ["batch-infer", "--model", str(tiny_model), "--input", str(data)]
    args += ["--set", "infer.max_new_tokens=3", "--set", "infer.shard_size=2"]
    assert main([*args, "--output", str(first)]) == 0
    rejected = rejects(first)
    assert [r["key"] for r in rejected] == ["q1", "q4", "q6", "q11"] and "blue.png" in rejected[0]["reason"]
    assert [r.get("line", r.get("index")) for r in rejected] == [2, 6, 8, 1]  # lines after the blank one shift
    capsys.readouterr()

    retry_args = [*args, "--output", str(retry), "--set", f"infer.retry_rejects={first}"]
    # Before the images are there: answered again, rejected again (the same records, the same keys).
    assert main([*retry_args[:-2], "--output", str(tmp_path / "too-soon"), *retry_args[-2:]]) == 0
    assert [r["key"] for r in rejects(tmp_path / "too-soon")] == ["q1", "q4", "q6", "q11"]
    shutil.copy(images["blue"], data / "blue.png")
    assert main([*retry_args, "--set", "infer.max_shards=1"]) == 0  # resumable: a trial shard, then the rest
    assert main(retry_args) == 0
    printed = capsys.readouterr().out
    assert "4 read: 4 answered, 0 rejected" in printed and f"retry of          the records {first} rejected" in printed
    answered = results(retry)
    assert [r["key"] for r in answered] == ["q1", "q4", "q6", "q11"] and rejects(retry) == []
    assert [r["source"] for r in answered] == [
        f"{data}/a.jsonl:2",
        f"{data}/a.jsonl:6",
        f"{data}/a.jsonl:8",
        f"{data}/b.json[1]",
    ]
    assert [r["query"] for r in answered] == [
        lines[1]["query"],
        lines[4]["query"],
        lines[6]["query"],
        items[1]["query"],
    ]
    manifest = json.loads((retry / "manifest.json").read_text())
    assert manifest["input"]["retry_of"] == str(first)
    assert [(f["name"], f["only"]) for f in manifest["input"]["files"]] == [("a.jsonl", [2, 6, 8]), ("b.json", [1])]
    assert [p["records"] for p in manifest["parts"]] == [2, 1, 1]  # shards of the chosen records, by file
    assert main(retry_args) == 0 and "finished before, nothing to do" in capsys.readouterr().out
    status = job_status(open_output(str(retry)))
    assert status.plan.retry_of == str(first) and status.as_dict()["retry_of"] == str(first)
    # Another job: never mixed into the first job's output, and what cannot be retried says why.
    assert main([*args, "--output", str(first), "--set", f"infer.retry_rejects={first}"]) == 2
    assert "records chosen: the rejects of no job vs " in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "r2"), "--set", f"infer.retry_rejects={retry}"]) == 2
    assert f"job {manifest['job_id']} rejected no record: nothing to answer again" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "r3"), "--set", f"infer.retry_rejects={tmp_path}"]) == 2
    assert f"infer.retry_rejects={tmp_path}: {tmp_path} holds no batch inference job" in capsys.readouterr().err
    typo = tmp_path / "frist"
    assert main([*args, "--output", str(tmp_path / "r5"), "--set", f"infer.retry_rejects={typo}"]) == 2
    assert f"{typo} holds no batch inference job" in capsys.readouterr().err and not typo.exists()  # none made
    (data / "a.jsonl").rename(tmp_path / "a.jsonl")
    assert main([*args, "--output", str(tmp_path / "r4"), "--set", f"infer.retry_rejects={first}"]) == 2
    assert f"rejected records of {data}/a.jsonl, which --input does not name" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    assert main([*args, "--output", str(unfinished), "--set", "infer.max_shards=1"]) == 0
    assert main([*args, "--output", str(tmp_path / "r5"), "--set", f"infer.retry_rejects={unfinished}"]) == 2
    assert "is not finished" in capsys.readouterr().err


def test_a_job_scores_its_answers_against_the_records_reference_answers(
    tiny_model: Path, demo_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dataset records that end with an answer are scored by exact match (as the evaluate step scores): in the
    manifest, the metrics, the summary and `batch-status`. Records without one are answered and not scored."""
    _, eval_file = demo_data
    first = run_batch_job(str(tiny_model), str(eval_file), str(tmp_path / "first"), job_config(), progress=False)
    # The same score the evaluate step gives the job's predictions file.
    assert write_eval_predictions(open_output(first.output), tmp_path / "pred.jsonl") == 6
    predictions = evaluate_predictions(tmp_path / "pred.jsonl")
    assert first.score == {
        "metric": "exact_match",
        "scored": 6,
        "correct": predictions.correct,
        "accuracy": pytest.approx(predictions.accuracy),
    }

    # References rewritten from the answers: the first three the answer itself as a person would write it (other
    # spacing, a final full stop), the last three another answer; and a simple record, which has no reference.
    answers = [
        json.loads(line)["response"] for line in (tmp_path / "first" / "part-00000.jsonl").read_text().splitlines()
    ]
    assert all(a.strip() for a in answers), answers
    shutil.copytree(eval_file.parent / "images", tmp_path / "images")
    lines = []
    for i, (line, answer) in enumerate(zip(eval_file.read_text().splitlines(), answers, strict=True)):
        record = json.loads(line)
        record["conversations"][-1]["value"] = f"  {answer}." if i < 3 else f"{answer} or not"
        lines.append(json.dumps(record))
    lines.append(json.dumps({"id": "no-reference", "query": "What colour is it?"}))
    (tmp_path / "graded.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "graded"
    args = ["batch-infer", "--model", str(tiny_model), "--input", str(tmp_path / "graded.jsonl"), "--output", str(out)]
    assert main([*args, "--set", "infer.max_new_tokens=4"]) == 0
    printed = capsys.readouterr().out
    assert "7 read: 7 answered, 0 rejected" in printed
    assert "exact match       3 of 6 answers equal to the record's reference answer (50.0%;" in printed, printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["score"] == {"metric": "exact_match", "scored": 6, "correct": 3, "accuracy": 0.5}
    graded = [json.loads(line) for line in (out / "part-00000.jsonl").read_text().splitlines()]
    assert [r["response"] for r in graded[:6]] == answers  # the reference is not part of the prompt
    assert "reference" not in graded[6]
    assert main(["batch-status", str(out)]) == 0
    assert "exact match       3 of 6 answers" in capsys.readouterr().out
    assert main(["batch-status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == manifest["score"]

    # The first results as a table to read: the question each answered, beside its reference.
    rows = sample_rows(open_output(str(out)), limit=7)
    assert [r["key"] for r in rows] == [f"graded.jsonl:{i}" for i in range(1, 7)] + ["no-reference"]
    first_image = json.loads(eval_file.read_text().splitlines()[0])["conversations"][0]["value"].split("</img>")[0]
    assert rows[0]["question"] == "What colour is the shape?" and rows[0]["images"] == Path(first_image).name
    assert [r["exact match"] for r in rows] == [True] * 3 + [False] * 3 + [""]
    assert rows[0]["reference"] == f"{answers[0]}." and rows[6]["reference"] == ""  # as the result keeps it: stripped
    assert [r["answer"] for r in rows[:6]] == answers and rows[6]["question"] == "What colour is it?"
    assert {tuple(r) for r in rows} == {
        ("key", "images", "question", "answer", "finish_reason", "reference", "exact match")
    }
    assert len(sample_rows(open_output(str(out)), limit=2)) == 2

    # No reference anywhere: nothing scored, no line in the summary.
    plain = run_batch_job(
        str(tiny_model), str(simple_prompts(tmp_path / "simple.jsonl", 2)), str(tmp_path / "s"), job_config(),
        progress=False,
    )  # fmt: skip
    assert plain.score is None and "exact_match" not in plain.metrics()
    assert list(sample_rows(open_output(plain.output))[0]) == ["key", "images", "question", "answer", "finish_reason"]


def test_s3_records_take_relative_images_from_under_their_prefix(
    tiny_model: Path, images: dict[str, Path], tmp_path: Path, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record read from `s3://bucket/set/p.jsonl` names `images/red.png`: the object `set/images/red.png`, as a local
    file's relative paths are its folder's. Never a file of the worker's own disk (before, relative paths resolved
    against the worker's working directory), never outside the prefix; an absolute local path only under
    data.allowed_roots (a mount every worker has)."""
    client = s3_server.client()
    client.create_bucket(Bucket="rel")
    client.upload_file(str(images["red"]), "rel", "set/images/red.png")
    client.upload_file(str(images["red"]), "rel", "other/red.png")
    (tmp_path / "images").mkdir()
    shutil.copy(images["red"], tmp_path / "images" / "blue.png")  # on the worker's disk, not in the bucket
    monkeypatch.chdir(tmp_path)
    records = [
        {"id": "relative", "query": "<img>images/red.png</img>Colour?"},
        {"id": "listed", "query": "Colour?", "images": ["./images/../images/red.png"]},
        {"id": "local-only", "query": "<img>images/blue.png</img>Colour?"},
        {"id": "outside", "query": "<img>../other/red.png</img>Colour?"},
        {"id": "absolute", "query": f"<img>{tmp_path / 'images' / 'blue.png'}</img>Colour?"},
        {"id": "full-uri", "query": "<img>s3://rel/other/red.png</img>Colour?"},
    ]
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    client.put_object(Bucket="rel", Key="set/p.jsonl", Body=body)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    result = run_batch_job(str(tiny_model), "s3://rel/set/p.jsonl", str(tmp_path / "out"), job_config(), progress=False)
    assert (result.results, result.rejects) == (3, 3)
    # A folder every worker mounts, named in data.allowed_roots: its absolute paths are local files
    shared = job_config(**{"data.allowed_roots": [str(tmp_path / "images")]})
    mounted = run_batch_job(str(tiny_model), "s3://rel/set/p.jsonl", str(tmp_path / "out2"), shared, progress=False)
    assert (mounted.results, mounted.rejects) == (4, 2)
    answered = [json.loads(line)["id"] for line in (tmp_path / "out" / "part-00000.jsonl").read_text().splitlines()]
    assert answered == ["relative", "listed", "full-uri"]
    reasons = {
        json.loads(line)["key"]: json.loads(line)["reason"]
        for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()
    }
    assert "s3://rel/set/images/blue.png" in reasons["local-only"], reasons
    assert "is outside s3://rel/set, where the record was read from" in reasons["outside"], reasons
    assert "a local path in a record read from s3://rel/set" in reasons["absolute"], reasons


def test_an_image_server_that_fails_for_now_stops_the_job_without_a_reject(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 503 (after the fetcher's retries) may pass: the job stops with exit 1, the record is not rejected and its
    shard not published, and the rerun, once the server is back, answers it. A 404 is the record's own
    fault: a reject, as before."""
    with serving_images() as server:
        records = [{"id": f"r{i}", "query": f"Question {i}?"} for i in range(6)]
        records[3]["images"] = [f"{server.url}/flaky.png"]
        records[5]["images"] = [f"{server.url}/missing.png"]
        (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        args = ["batch-infer", "--model", str(tiny_model), "--input", str(tmp_path / "in.jsonl")]
        args += ["--output", str(tmp_path / "out"), "--set", "infer.max_new_tokens=2", "--set", "infer.shard_size=2"]
        args += ["--set", "storage.url_allow_networks=[127.0.0.1/32]"]
        server.down = True
        assert main(args) == 1
        assert "HTTP 503 Service Unavailable after 3 retries. The job stops here" in capsys.readouterr().err
        # What was in flight is not published (the first shard may be, if it was answered before record 3 was read)
        assert {p.name for p in (tmp_path / "out").glob("part-*")} <= {"part-00000.jsonl"}
        assert not list((tmp_path / "out" / "_job").glob("rejects-00001*"))
        server.down = False
        assert main(args) == 0
    assert "6 read: 5 answered, 1 rejected" in capsys.readouterr().out
    assert keys_across_parts(tmp_path / "out") == ["r0", "r1", "r2", "r3", "r4"]
    (reject,) = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert reject["key"] == "r5" and "HTTP 404" in reject["reason"]


@pytest.mark.gpu
def test_a_lora_run_is_answered_by_the_fast_engine(
    lora_run: Path, demo_data: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On CUDA `infer.engine: auto` is the fast engine for a job of `infer.fast_min_records` or more, which decodes
    plain weights: a LoRA run's adapter is merged into them for it (the job failed on the peft wrapper before). Every
    record is answered, as by the plain engine. A job below that size takes the plain engine."""
    _, eval_file = demo_data
    with caplog.at_level(logging.INFO):
        small = run_batch_job(str(lora_run), str(eval_file), str(tmp_path / "small"), job_config(), progress=False)
    assert any("6 records to answer: the plain engine" in r.getMessage() for r in caplog.records)
    assert not any("FastEngine built" in r.getMessage() for r in caplog.records) and small.results == 6
    caplog.clear()
    with caplog.at_level(logging.INFO):
        config = job_config(**{"infer.fast_min_records": 6})
        fast = run_batch_job(str(lora_run), str(eval_file), str(tmp_path / "fast"), config, progress=False)
    assert any("merging the LoRA adapter" in r.getMessage() for r in caplog.records)
    assert any("FastEngine built" in r.getMessage() for r in caplog.records)
    plain = job_config(**{"infer.engine": "plain"})
    reference = run_batch_job(str(lora_run), str(eval_file), str(tmp_path / "plain"), plain, progress=False)
    assert (fast.records, fast.results, fast.rejects) == (reference.records, reference.results, 0)


@pytest.mark.gpu
def test_the_fast_engines_slots_hold_the_jobs_longest_prompt(
    tiny_model: Path, demo_data: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On CUDA a job's fast engine gets slots of the plan's longest prompt + the answer (rounded up to 128), not
    2048; `infer.max_context` set keeps that size."""
    train_file, _ = demo_data
    fast = {"infer.fast_min_records": 0}  # the fast engine for a small job
    with caplog.at_level(logging.INFO):
        result = run_batch_job(
            str(tiny_model), str(train_file), str(tmp_path / "sized"), job_config(**fast), progress=False
        )
    plan = json.loads((tmp_path / "sized" / "_job" / "job.json").read_text())
    (longest,) = [f["longest_prompt"] for f in plan["files"]]
    sizes = [re.search(r"FastEngine: \d+ slots of (\d+) tokens", r.getMessage()) for r in caplog.records]
    assert [int(m.group(1)) for m in sizes if m] == [-(-(longest + 4) // 128) * 128]
    assert (result.results, result.rejects) == (11, 0)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_batch_job(
            str(tiny_model),
            str(train_file),
            str(tmp_path / "fixed"),
            job_config(**fast, **{"infer.max_context": 1024}),
            progress=False,
        )
    sizes = [re.search(r"FastEngine: \d+ slots of (\d+) tokens", r.getMessage()) for r in caplog.records]
    assert [int(m.group(1)) for m in sizes if m] == [1024]


def test_tracking_logs_a_run_with_the_model_version_metrics_and_manifest(
    tiny_model: Path, demo_data: tuple[Path, Path], tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = job_config(
        **{"infer.track": True, "tracking.uri": uri, "tracking.experiment": "jobs", "infer.shard_size": 3}
    )
    result = run_batch_job(str(tiny_model), str(demo_data[1]), str(tmp_path / "out"), config, progress=False)
    assert result.mlflow_run_id is not None
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["model.uri"] == str(tiny_model)
    assert run.data.tags["model.content_hash"] == result.manifest["model"]["content_hash"]
    assert run.data.tags["job_id"] == result.manifest["job_id"]
    assert run.data.metrics["records"] == 6 and run.data.metrics["rejects"] == 0
    assert run.data.metrics["tokens_per_s"] > 0
    assert run.data.params["max_new_tokens"] == "4"
    manifest = Path(client.download_artifacts(run.info.run_id, "manifest.json", str(tmp_path)))
    assert json.loads(manifest.read_text()) == result.manifest
    # Each shard's speed, charted: a metric series with a step per shard, and the PNG.
    speeds = client.get_metric_history(run.info.run_id, "shard_images_per_s")
    assert [m.step for m in speeds] == list(range(len(result.ran))) and len(result.ran) == 2
    assert [m.value for m in speeds] == pytest.approx([s.images / s.seconds for s in result.ran])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "shard_rejects")] == [0, 0]
    records = client.get_metric_history(run.info.run_id, "shard_records_per_s")
    assert [m.value for m in records] == pytest.approx([(s.results + s.rejects) / s.seconds for s in result.ran])
    plot = Path(client.download_artifacts(run.info.run_id, "throughput.png", str(tmp_path)))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The first answers as a table on the run's page: the question, the answer, the reference.
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "samples.json", str(tmp_path))).read_text())
    assert table["columns"][:4] == ["key", "images", "question", "answer"] and "reference" in table["columns"]
    assert len(table["data"]) == 6 and table["data"][0][2] == "What colour is the shape?"
    # The same command again does nothing: it logs no second run of the job (one of another output would be).
    again = run_batch_job(str(tiny_model), str(demo_data[1]), str(tmp_path / "out"), config, progress=False)
    assert again.mlflow_run_id == result.mlflow_run_id and not again.ran
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_batch_status_reads_where_a_job_stands_from_its_output_alone(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = simple_prompts(tmp_path / "prompts.jsonl", 6)
    with prompts.open("a") as f:
        f.write("{not json\n")  # line 7: a reject, in the last shard
    out = tmp_path / "out"
    run_batch_job(str(tiny_model), str(prompts), str(out), job_config(**{"infer.shard_size": 3}), progress=False)
    assert main(["batch-status", str(out)]) == 0
    finished = capsys.readouterr().out
    assert "finished at" in finished and "done              3 shards: 7 records, 6 answered, 1 rejected" in finished
    assert f"input             {prompts} (1 file, 7 records)" in finished
    assert "to do" not in finished

    # As a crash leaves it: the last shard's part and the manifest not written yet. The parts' times give the pace:
    # 3 records in the 60 s between the two parts, so the one record to go takes ~20 s.
    (out / "part-00002.jsonl").unlink()
    (out / "manifest.json").unlink()
    now = time.time()
    os.utime(out / "part-00000.jsonl", (now - 100, now - 100))
    os.utime(out / "part-00001.jsonl", (now - 40, now - 40))
    assert main(["batch-status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "stopped" and status["run"] is None and status["finished_at"] is None
    assert (status["shards"], status["shards_done"], status["pending_shards"]) == (3, 2, ["00002"])
    assert (status["records"], status["records_done"], status["rejects_done"]) == (7, 6, 0)
    assert status["model"]["uri"] == str(tiny_model) and status["settings"]["max_new_tokens"] == 4
    assert status["records_per_s"] == pytest.approx(3 / 60) and status["eta_s"] == pytest.approx(20)
    assert status["last_part_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 40))
    assert main(["batch-status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "batch inference job" in text and ": 2 of 3 shards done (67%); stopped: the same command" in text, text
    assert "to do             1 shard: 1 record (00002)" in text
    assert re.search(r"pace              0\.05 records/s over the last 1 part, the last part written 4\d s ago; "
                     r"~20 s to go at that pace", text), text  # fmt: skip

    # One shard of one record, not done: every count is one or of one, and reads so (it said "0 of 1 shards done",
    # "1 file(s)", "1 shard(s): 1 records").
    one, one_record = tmp_path / "one", simple_prompts(tmp_path / "one.jsonl", 1)
    run_batch_job(str(tiny_model), str(one_record), str(one), job_config(), progress=False)
    (one / "part-00000.jsonl").unlink()
    (one / "manifest.json").unlink()
    assert main(["batch-status", str(one)]) == 0
    text = capsys.readouterr().out
    assert ": 0 of 1 shard done (0%); stopped: the same" in text and "one.jsonl (1 file, 1 record)\n" in text, text
    assert "done              0 shards: 0 records, 0 answered, 0 rejected\n" in text
    assert "to do             1 shard: 1 record (00000)\n" in text

    assert main(["batch-status", str(tmp_path)]) == 2
    assert "holds no batch inference job (no _job/job.json)" in capsys.readouterr().err
    assert main(["batch-status", str(tmp_path / "typo")]) == 2  # a read: never creates the folder
    assert "no such folder" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_a_task_worker_releases_the_last_jobs_model_before_loading_the_next(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Prefect task worker keeps its runner between shards of a job; for another job (here: other settings) the
    old model and engine go first, since on a GPU the engine's cache takes what the card has free and two would not
    fit."""
    from vlmops.infer import batch_job

    prompts = simple_prompts(tmp_path / "prompts.jsonl", 4)
    events: list[str] = []

    class Loads(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "model loaded in" in record.getMessage():
                events.append("loaded")

    handler = Loads()
    logging.getLogger("vlmops.infer.batch_job").addHandler(handler)
    caplog.set_level(logging.INFO, "vlmops.infer.batch_job")
    try:
        for tokens in (2, 3):
            config = job_config(**{"infer.max_new_tokens": tokens, "infer.shard_size": 2})
            _, plan, output, _ = batch_job.prepare_job(
                str(tiny_model), str(prompts), str(tmp_path / f"out{tokens}"), config
            )
            for shard in plan.shards:  # both shards on one runner
                assert batch_job.run_job_shard(str(tiny_model), output.uri, config, shard.index).results == 2
            ((runner, _),) = batch_job._WORKER_RUNNER.values()
            weakref.finalize(runner, events.append, f"released {tokens}")
            del runner
    finally:
        logging.getLogger("vlmops.infer.batch_job").removeHandler(handler)
        batch_job._WORKER_RUNNER.clear()
    assert events[:3] == ["loaded", "released 2", "loaded"], events


def test_reject_kinds_past_the_shown_ones_share_a_labelled_row_in_the_summary_and_the_flows_table() -> None:
    """Three kinds by name, the rest in one row; every row has a label, in the command's text and in the flow's
    markdown table (where the kinds' rows were `|  | missing image 2 (first: ...) |`)."""
    from flows.batch_inference import _table
    from vlmops.infer.summary import reason_rows

    by_reason = {
        "missing_image": {"count": 4, "first": "in.jsonl:1"},
        "malformed_json": {"count": 2, "first": "in.jsonl:2"},
        "not_an_image": {"count": 1, "first": "in.jsonl:5"},
        "prompt_too_long": {"count": 1, "first": "in.jsonl:7"},
        "not_text": {"count": 1, "first": "in.jsonl:9"},
    }
    rows = reason_rows(by_reason)
    assert rows == [
        ("missing image", "4 records (first: in.jsonl:1)"),
        ("malformed JSON", "2 records (first: in.jsonl:2)"),
        ("not an image", "1 record (first: in.jsonl:5)"),
        ("other kinds", "2 records of 2 kinds, in rejects.jsonl"),
    ]
    table = _table("job", rows).splitlines()
    assert table[-4:] == [
        "| missing image | 4 records (first: in.jsonl:1) |",
        "| malformed JSON | 2 records (first: in.jsonl:2) |",
        "| not an image | 1 record (first: in.jsonl:5) |",
        "| other kinds | 2 records of 2 kinds, in rejects.jsonl |",
    ]


def test_a_runs_speed_counts_workers_side_by_side() -> None:
    """Each worker answers its shards in turn and the workers run at once: the run took as long as its busiest
    worker, not the sum of every shard's seconds (which read 8 GPUs as 8 times slower than they were)."""
    from vlmops.infer.job_status import JobResult, ShardStats

    ran = [
        ShardStats(0, 3, 0, 30, 3, 2.0, "node:11"),
        ShardStats(1, 3, 0, 60, 6, 3.0, "node:12"),
        ShardStats(2, 2, 1, 30, 3, 2.5, "node:11"),
    ]
    side_by_side = JobResult("out", {}, ran)
    assert side_by_side.seconds == 4.5
    assert side_by_side.images_per_s == 12 / 4.5 and side_by_side.tokens_per_s == 120 / 4.5
    one_worker = JobResult("out", {}, [ShardStats(s.shard, 3, 0, 30, 3, s.seconds, "") for s in ran])
    assert one_worker.seconds == 7.5 and one_worker.images_per_s == 9 / 7.5
    assert JobResult("out", {}).seconds == 0.0 and JobResult("out", {}).images_per_s == 0.0


def test_retrain_step_runs_the_job_in_a_child_and_writes_what_evaluate_reads(
    tiny_model: Path, demo_data: tuple[Path, Path], tmp_path: Path
) -> None:
    from tasks.infer import batch_infer_task

    _, eval_file = demo_data
    out_file = tmp_path / "predictions" / "base.jsonl"
    # A trial setting in the pipeline's config does not cut the evaluation short: every record or none.
    config = job_config(**{"infer.shard_size": 2, "infer.max_shards": 1})
    result = batch_infer_task.fn(str(tiny_model), str(eval_file), str(out_file), config)
    assert result.path == out_file and result.count == 6 and result.generated_tokens > 0
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6))
    assert [r["source"] for r in rows] == [f"{eval_file}:{i}" for i in range(1, 7)]
    assert evaluate_predictions(out_file).total == 6
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == ["base.jsonl"], (
        "the finished job's folder goes"
    )


@pytest.mark.integration
def test_an_output_inside_the_input_folder_is_not_read_as_input(tiny_model: Path, tmp_path: Path) -> None:
    """`--input data --output data/out`: the rerun finds the same input (the output's parts, rejects, manifest and
    `_job/job.json` are not records) and has nothing left to do; before, it read `_job/job.json` as an input file."""
    (tmp_path / "data").mkdir()
    simple_prompts(tmp_path / "data" / "in.jsonl", 5)
    model, data, out = str(tiny_model), str(tmp_path / "data"), tmp_path / "data" / "out"
    first = run_batch_job(model, data, str(out), job_config(), progress=False)
    assert (first.records, first.results) == (5, 5)
    assert sorted(p.name for p in out.iterdir()) == ["_job", "manifest.json", "part-00000.jsonl", "rejects.jsonl"]
    again = run_batch_job(model, data, str(out), job_config(), progress=False)
    assert (again.ran, again.records) == ([], 5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["name"] for f in manifest["input"]["files"]] == ["in.jsonl"]
    globbed = run_batch_job(model, str(tmp_path / "data" / "**" / "*.jsonl"), str(out), job_config(), progress=False)
    assert (globbed.ran, globbed.records) == ([], 5)  # a glob over the folder finds the same one file


@pytest.mark.integration
def test_another_jobs_output_inside_the_input_folder_is_refused_naming_the_fix(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A job's output kept beside its input (`--input data --output data/run1`), then a second job over `data`: it
    read run1's parts as prompts and its manifest and job file as records. Refused naming run1 and the fix; a glob
    of the input files runs, and so does a job over run1's rejects (which reads only the files they name)."""
    data = tmp_path / "data"
    data.mkdir()
    simple_prompts(data / "in.jsonl", 5)
    with (data / "in.jsonl").open("a") as f:
        f.write("{not json\n")
    model = str(tiny_model)
    first = run_batch_job(model, str(data), str(data / "run1"), job_config(), progress=False)
    assert (first.records, first.results, first.rejects) == (6, 5, 1)
    fix = rf"pass the input files themselves as a glob \('{re.escape(str(data))}/\*\.jsonl'\)$"
    with pytest.raises(UserInputError, match=r"holds the output of another batch job \(.*data/run1: .*" + fix):
        run_batch_job(model, str(data), str(data / "run2"), job_config(), progress=False)
    assert not (data / "run2").exists()
    with pytest.raises(UserInputError, match=r"input .*run1 holds the output of another batch job \(.*run1: it has"):
        run_batch_job(model, str(data / "run1"), str(tmp_path / "again"), job_config(), progress=False)
    globbed = run_batch_job(model, str(data / "*.jsonl"), str(data / "run2"), job_config(), progress=False)
    assert (globbed.records, globbed.results) == (6, 5)
    retry = job_config(**{"infer.retry_rejects": str(data / "run1")})
    again = run_batch_job(model, str(data), str(tmp_path / "retry"), retry, progress=False)
    assert (again.records, again.rejects) == (1, 1)


@pytest.mark.integration
def test_an_output_that_is_the_input_folder_is_refused_naming_the_fix(
    tiny_model: Path, tmp_path: Path, s3_server: Any
) -> None:
    """`--output` the input folder (or prefix) itself: every input file lies under it, so none is input; refused with
    the reason and what to pass. Locally the error said there were no .jsonl files there; at an S3 bucket's root the
    job ran, then read its own parts, manifest and job file as input on the rerun and refused its own output."""
    simple_prompts(tmp_path / "in.jsonl", 3)
    same = rf"every input file .* lies under the output {re.escape(str(tmp_path))}, which is the input itself .*: pass an --output "
    with pytest.raises(UserInputError, match=same + rf"outside the input, e.g. {re.escape(str(tmp_path))}-results$"):
        run_batch_job(str(tiny_model), str(tmp_path), str(tmp_path), job_config(), progress=False)
    # An output that holds the input (`--input nest/in --output nest`): "outside the input" did not fit.
    (tmp_path / "nest" / "in").mkdir(parents=True)
    simple_prompts(tmp_path / "nest" / "in" / "in.jsonl", 3)
    nest, inner = tmp_path / "nest", tmp_path / "nest" / "in"
    holds = rf"lies under the output {re.escape(str(nest))}, which holds the input .*: pass an --output that neither is the input nor "
    with pytest.raises(UserInputError, match=holds + rf"holds it, e.g. {re.escape(str(inner))}-results$"):
        run_batch_job(str(tiny_model), str(inner), str(nest), job_config(), progress=False)
    client = s3_server.client()
    client.create_bucket(Bucket="same")
    client.upload_file(str(tmp_path / "in.jsonl"), "same", "in.jsonl")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.env().items():
            patch.setenv(key, value)
        for spec in ("s3://same/", "s3://same"):
            with pytest.raises(
                UserInputError, match=r"every input file .* lies under the output s3://same, which is the"
            ):
                run_batch_job(str(tiny_model), spec, spec, job_config(), progress=False)
        client.upload_file(str(tmp_path / "in.jsonl"), "same", "nest/in/in.jsonl")
        with pytest.raises(
            UserInputError,
            match=r"under the output s3://same/nest, which holds the input .*holds it, e.g. s3://same/nest/in-results$",
        ):
            run_batch_job(str(tiny_model), "s3://same/nest/in", "s3://same/nest", job_config(), progress=False)


def test_s3_input_and_output(tiny_model: Path, images: dict[str, Path], tmp_path: Path, s3_server: Any) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket="jobs")
    client.upload_file(str(images["red"]), "jobs", "images/red.png")
    for name, first in (("a.jsonl", 0), ("b.jsonl", 5)):
        lines = [
            json.dumps({"id": f"r{first + i}", "query": f"<img>s3://jobs/images/red.png</img>Colour {i}?"})
            for i in range(5)
        ]
        client.put_object(Bucket="jobs", Key=f"prompts/{name}", Body=("\n".join(lines) + "\n").encode())
    client.put_object(Bucket="jobs", Key="prompts/notes.txt", Body=b"not an input")
    config = job_config(**{"infer.shard_size": 3})
    scratch = tmp_path / "tmp"  # where the parts are written before their PUT
    scratch.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.env().items():
            patch.setenv(key, value)
        patch.setattr(tempfile, "tempdir", str(scratch))
        result = run_batch_job(str(tiny_model), "s3://jobs/prompts", "s3://jobs/answers/run1", config, progress=False)
        assert (result.records, result.results, len(result.ran)) == (10, 10, 4)  # 3 + 2 per file
        gc.collect()
        assert not list(scratch.iterdir())  # a worker running job after job kept a folder for each
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="jobs", Prefix="answers/run1/")["Contents"])
        assert [k for k in keys if "/part-" in k] == [f"answers/run1/part-0000{i}.jsonl" for i in range(4)]
        assert "answers/run1/manifest.json" in keys and "answers/run1/rejects.jsonl" in keys
        got = [
            json.loads(line)["key"]
            for k in keys
            if "/part-" in k
            for line in client.get_object(Bucket="jobs", Key=k)["Body"].read().decode().splitlines()
        ]
        assert got == [f"r{i}" for i in range(10)]
        assert run_batch_job(str(tiny_model), "s3://jobs/prompts", "s3://jobs/answers/run1", config).ran == []
        # Where the job stands, from the prefix alone; with a part gone (as a crash leaves it) the rejects of the done
        # shards are read from the bucket.
        client.delete_object(Bucket="jobs", Key="answers/run1/part-00003.jsonl")
        client.delete_object(Bucket="jobs", Key="answers/run1/manifest.json")
        status = job_status(open_output("s3://jobs/answers/run1", config.storage)).as_dict()
        assert (status["shards_done"], status["records_done"], status["rejects_done"]) == (3, 8, 0)
        assert status["pending_shards"] == ["00003"] and status["input"] == "s3://jobs/prompts"
        assert status["last_part_at"] is not None and status["state"] == "running or stopped"
        # An output under the input prefix: its parts, manifest and job file are the job's, not input, on a rerun too.
        inside = run_batch_job(str(tiny_model), "s3://jobs/prompts", "s3://jobs/prompts/out", config, progress=False)
        assert (inside.records, inside.results) == (10, 10)
        again = run_batch_job(str(tiny_model), "s3://jobs/prompts", "s3://jobs/prompts/out", config, progress=False)
        assert (again.ran, again.records) == ([], 10)
        # A reject answered again once its image is in the bucket (infer.retry_rejects on S3).
        lines = [
            json.dumps({"id": f"s{i}", "query": f"<img>{'blue' if i == 1 else 'red'}.png</img>Colour?"})
            for i in range(3)
        ]
        client.upload_file(str(images["red"]), "jobs", "more/red.png")
        client.put_object(Bucket="jobs", Key="more/d.jsonl", Body=("\n".join(lines) + "\n").encode())
        first = run_batch_job(str(tiny_model), "s3://jobs/more", "s3://jobs/answers/more", config, progress=False)
        assert (first.results, first.rejects) == (2, 1)
        client.upload_file(str(images["blue"]), "jobs", "more/blue.png")
        retry = config.model_copy(
            update={"infer": config.infer.model_copy(update={"retry_rejects": "s3://jobs/answers/more"})}
        )
        again = run_batch_job(str(tiny_model), "s3://jobs/more", "s3://jobs/answers/more-retry", retry, progress=False)
        assert (again.records, again.results, again.rejects) == (1, 1, 0)
        part = client.get_object(Bucket="jobs", Key="answers/more-retry/part-00000.jsonl")["Body"].read().decode()
        assert [(r["key"], r["source"]) for r in map(json.loads, part.splitlines())] == [
            ("s1", "s3://jobs/more/d.jsonl:2")
        ]


def test_rejects_are_counted_by_kind_with_the_first_of_each_in_summary_status_and_manifest(
    tiny_model: Path, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The summary said only how many records were rejected and where rejects.jsonl is: now it names the kinds, most
    first, with a count and the first such record each; the manifest holds the counts (`rejects_by_reason`), counted
    from the shards' rejects, so a job resumed after one shard gives the totals of one run straight through;
    batch-status shows them for the shards done; MLflow gets a metric per kind."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(images["red"], data / "red.png")
    (data / "bad.png").write_text("not a png")
    lines = [
        json.dumps({"id": "a", "query": "<img>gone.png</img>Colour?"}),
        "{not json",
        json.dumps({"id": "c", "query": "<img>bad.png</img>Colour?"}),
        json.dumps({"id": "d", "query": "<img>gone-too.png</img>Colour?"}),
        json.dumps({"id": "e", "query": "<img>red.png</img>Colour?"}),
        json.dumps({"prompt": "neither form"}),
    ]
    prompts = data / "in.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    args = ["batch-infer", "--model", str(tiny_model), "--input", str(prompts)]
    args += ["--set", "infer.max_new_tokens=2", "--set", "infer.shard_size=3"]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    assert main([*args, "--output", str(resumed), "--set", "infer.max_shards=1"]) == 0
    capsys.readouterr()
    assert main(["batch-status", str(resumed)]) == 0
    status = capsys.readouterr().out
    assert f"  missing image     1 record (first: {prompts}:1)\n" in status, status
    assert f"  not an image      1 record (first: {prompts}:3)\n" in status, status
    assert main([*args, "--output", str(resumed)]) == 0
    printed = capsys.readouterr().out
    assert main([*args, "--output", str(straight)]) == 0
    capsys.readouterr()

    expected = {
        "missing_image": {"count": 2, "first": f"{prompts}:1"},
        "malformed_json": {"count": 1, "first": f"{prompts}:2"},
        "invalid_record": {"count": 1, "first": f"{prompts}:6"},
        "not_an_image": {"count": 1, "first": f"{prompts}:3"},
    }
    for out in (resumed, straight):
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["rejects_by_reason"] == expected and list(manifest["rejects_by_reason"]) == list(expected)
        kinds = ["missing_image", "malformed_json", "not_an_image", "missing_image", "invalid_record"]
        assert [r["kind"] for r in rejects(out)] == kinds
    # A row per kind, the kind its label (the label column was blank); a fourth kind gets its row as the first three.
    rows = printed.splitlines()
    at = rows.index(f"  rejects           {resumed}/rejects.jsonl")
    assert rows[at + 1 :] == [
        f"  missing image     2 records (first: {prompts}:1)",
        f"  malformed JSON    1 record (first: {prompts}:2)",
        f"  invalid record    1 record (first: {prompts}:6)",
        f"  not an image      1 record (first: {prompts}:3)",
    ], printed
    assert main(["batch-status", str(resumed), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rejects_by_reason"] == expected
    result = JobResult(str(straight), json.loads((straight / "manifest.json").read_text()))
    metrics = result.metrics()
    assert {k: v for k, v in metrics.items() if k.startswith("rejects")} == {
        "rejects": 5,
        "rejects.missing_image": 2,
        "rejects.malformed_json": 1,
        "rejects.invalid_record": 1,
        "rejects.not_an_image": 1,
    }
