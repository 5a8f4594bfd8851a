"""Batch inference jobs: every record once and in input order, both record forms, fields kept, rejects
written down, batching that does not change answers, the plain engine's finish reasons."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmops.config import DEFAULT_SYSTEM_PROMPT, PipelineConfig, load_config
from vlmops.data.formats import read_dataset
from vlmops.data.problems import RecordError
from vlmops.errors import UserInputError
from vlmops.infer.batch_job import run_batch_job
from vlmops.infer.engine import GenerationRequest, make_engine
from vlmops.infer.generation import answer_tokens
from vlmops.infer.inputs import find_inputs
from vlmops.infer.job import RecordRejectedError
from vlmops.infer.job_output import iter_results
from vlmops.infer.job_status import JobResult, StoppedJob, job_status
from vlmops.infer.output import open_output
from vlmops.infer.plain_engine import PlainEngine
from vlmops.infer.records import parse_prompt
from vlmops.infer.shards import RawRecord
from vlmops.models.loading import LoadedModel, load_model
from vlmops.models.template import encode


def job_config(**infer: Any) -> PipelineConfig:
    return load_config(None, {"infer.max_new_tokens": 10, **{f"infer.{k}": v for k, v in infer.items()}})


def results(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [json.loads(line) for part in manifest["parts"] for line in (out / part["name"]).read_text().splitlines()]


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def test_every_record_once_in_input_order_across_uneven_batches_and_shards(
    tiny_model: Path, demo_data: tuple[Path, Path], tmp_path: Path
) -> None:
    train_file, _ = demo_data  # 11 records: single-image, multi-turn, two-image and text-only ones
    out = tmp_path / "out"
    result = run_batch_job(str(tiny_model), str(train_file), str(out), job_config(batch_size=4, shard_size=5))
    records = results(out)
    conversations = read_dataset(train_file).conversations
    lines = [json.loads(line) for line in train_file.read_text().splitlines()]

    assert result.records == result.results == len(records) == len(conversations) == 11 and result.rejects == 0
    assert sorted(p.name for p in out.glob("part-*.jsonl")) == [
        "part-00000.jsonl",
        "part-00001.jsonl",
        "part-00002.jsonl",
    ]
    assert [r["key"] for r in records] == [f"train.jsonl:{i}" for i in range(1, 12)]
    for record, conv, line in zip(records, conversations, lines, strict=True):
        assert record["conversations"] == line["conversations"]  # every input field kept as it was
        assert record["reference"] == conv.messages[-1].text("").strip()
        assert record["finish_reason"] in ("stop", "length")
        assert record["model"]["uri"] == str(tiny_model) and record["model"]["content_hash"].startswith("sha256:")
    kinds = {(len(c.images), len(c.messages)) for c in conversations}
    assert {(0, 2), (1, 2), (2, 2), (1, 4)} <= kinds, kinds  # the batches really mixed every record kind
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["records"] for p in manifest["parts"]] == [5, 5, 1]
    assert manifest["generated_tokens"] == sum(r["generated_tokens"] for r in records) > 0
    assert manifest["records_read"] == manifest["results"] + manifest["rejects"] == 11
    assert (
        manifest["settings"]["shard_size"] == 5
        and manifest["model"]["content_hash"] == records[0]["model"]["content_hash"]
    )
    assert result.tokens_per_s > 0 and result.images_per_s > 0
    assert rejects(out) == []


def test_a_json_list_input_is_sharded_and_read_from_each_shards_offset(
    tiny_model: Path, demo_data: tuple[Path, Path], tmp_path: Path
) -> None:
    """The same records as a .json list (indented, so items span lines): the same answers, keyed by index."""
    train_file, _ = demo_data
    lines = [json.loads(line) for line in train_file.read_text().splitlines()]
    as_list = train_file.parent / "train-list.json"  # beside the images
    as_list.write_text(json.dumps(lines, indent=2, ensure_ascii=False))
    config = job_config(batch_size=4, shard_size=4)
    run_batch_job(str(tiny_model), str(train_file), str(tmp_path / "from-jsonl"), config)
    result = run_batch_job(str(tiny_model), str(as_list), str(tmp_path / "from-json"), config)
    assert (result.records, result.results, result.rejects) == (11, 11, 0)
    from_json, from_jsonl = results(tmp_path / "from-json"), results(tmp_path / "from-jsonl")
    assert [r["key"] for r in from_json] == [f"train-list.json[{i}]" for i in range(11)]
    assert [r["response"] for r in from_json] == [r["response"] for r in from_jsonl]
    assert [r["conversations"] for r in from_json] == [line["conversations"] for line in lines]
    plan = json.loads((tmp_path / "from-json" / "_job" / "job.json").read_text())
    offsets = [shard["offset"] for shard in plan["shards"]]
    assert len(offsets) == 3 and all(as_list.read_bytes()[o : o + 1] == b"{" for o in offsets)


def test_the_jobs_files_take_the_umasks_mode_as_every_other_file(tiny_model: Path, tmp_path: Path) -> None:
    """Parts, rejects, manifest and job.json are readable by whoever may read the folder: they were 0600
    (mkstemp's mode), so a teammate's `vlmops batch-status` or reader of the results on a shared disk was refused."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "query": "Hello?"}) + "\n")
    out = tmp_path / "out"
    umask = os.umask(0o022)
    try:
        run_batch_job(str(tiny_model), str(prompts), str(out), job_config(max_new_tokens=2), progress=False)
    finally:
        os.umask(umask)
    written = ["part-00000.jsonl", "rejects.jsonl", "manifest.json", "_job/job.json", "_job/rejects-00000.jsonl"]
    assert {name: oct((out / name).stat().st_mode & 0o777) for name in written} == dict.fromkeys(written, "0o644")


def test_files_of_records_in_a_form_the_job_does_not_read_are_named_not_left_out_unsaid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder of prompts with a compressed `.jsonl.gz` (or an `.ndjson`) beside its `.jsonl`: those records were left
    out without a word. Their names are logged as a warning; images and other files beside the prompts are not."""
    (tmp_path / "in" / "images").mkdir(parents=True)
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"query": "Hello?"}) + "\n")
    for name in ("b.jsonl.gz", "more/c.ndjson", "images/red.png", "notes.txt", ".hidden.jsonl.tmp"):
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="vlmops"):
        assert [f.name for f in find_inputs(str(tmp_path / "in"))] == ["a.jsonl"]
        assert [f.name for f in find_inputs(str(tmp_path / "in" / "*"))] == ["a.jsonl"]
    folder, globbed = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "2 files named like records, not read (only .jsonl and .json are): b.jsonl.gz, more/c.ndjson; " in folder
    assert f"1 file named like records, not read (only .jsonl and .json are): {tmp_path}/in/b.jsonl.gz; " in globbed


def test_a_broken_link_among_the_inputs_stops_the_job_before_it_starts(tiny_model: Path, tmp_path: Path) -> None:
    """`in/part3.jsonl -> /mnt/gone/part3.jsonl`: the job answered the other files and said nothing of the third. Now
    it is refused by name before a shard is planned or written; a broken `notes.txt` beside the prompts is not read,
    so it stops nothing."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"id": "a", "query": "Hello?"}) + "\n")
    (tmp_path / "in" / "notes.txt").symlink_to(tmp_path / "gone" / "notes.txt")
    (tmp_path / "in" / "part3.jsonl").symlink_to(tmp_path / "gone" / "part3.jsonl")
    out = tmp_path / "out"
    with pytest.raises(UserInputError, match=f"{tmp_path}/in/part3.jsonl is a broken symlink to {tmp_path}/gone/"):
        run_batch_job(str(tiny_model), str(tmp_path / "in"), str(out), job_config(max_new_tokens=2), progress=False)
    assert not (out / "_job" / "job.json").exists()
    (tmp_path / "in" / "part3.jsonl").unlink()
    run_batch_job(str(tiny_model), str(tmp_path / "in"), str(out), job_config(max_new_tokens=2), progress=False)
    assert [r["key"] for r in results(out)] == ["a"]


def test_a_glob_over_links_into_a_hub_caches_blobs_answers_them_named_by_the_links(
    tiny_model: Path, tmp_path: Path
) -> None:
    """`in/*.jsonl` over `in/a.jsonl -> ../blobs/3f2a9c` (a blob has no suffix): the glob kept the files whose target
    ended in .jsonl, none here, and the job had no input. The plan, each result's source and each reject's file name
    the link, as given; the key falls back to the link's name."""
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "3f2a9c").write_text(json.dumps({"query": "Hello?"}) + "\n" + json.dumps({"id": 1}) + "\n")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").symlink_to("../blobs/3f2a9c")
    out, link = tmp_path / "out", f"{tmp_path.resolve()}/in/a.jsonl"
    run_batch_job(str(tiny_model), str(tmp_path / "in" / "*.jsonl"), str(out), job_config(max_new_tokens=2))
    plan = json.loads((out / "_job" / "job.json").read_text())
    assert [(f["uri"], f["name"]) for f in plan["files"]] == [(link, "a.jsonl")]
    assert [(r["key"], r["source"]) for r in results(out)] == [("a.jsonl:1", f"{link}:1")]
    assert [(r["file"], r["line"], r["key"]) for r in rejects(out)] == [(link, 2, 1)]


def test_a_glob_over_a_folder_linked_twice_and_a_link_loop_answers_each_record_once(
    tiny_model: Path, tmp_path: Path
) -> None:
    """`in/**/*.jsonl` over in/more and in/zz-again (both -> elsewhere/batch) and in/up -> in: glob.glob matched
    batch's file under both names and in/'s 41 times round the loop, so the job answered each record many times.
    Each is answered once now, under the first name in sorted order."""
    (tmp_path / "elsewhere" / "batch").mkdir(parents=True)
    (tmp_path / "elsewhere" / "batch" / "b.jsonl").write_text(json.dumps({"query": "Hello?"}) + "\n")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"id": "a", "query": "Hi?"}) + "\n")
    for name in ("more", "zz-again"):
        (tmp_path / "in" / name).symlink_to(tmp_path / "elsewhere" / "batch")
    (tmp_path / "in" / "up").symlink_to(tmp_path / "in")
    out = tmp_path / "out"
    run_batch_job(str(tiny_model), str(tmp_path / "in" / "**" / "*.jsonl"), str(out), job_config(max_new_tokens=2))
    assert [r["key"] for r in results(out)] == ["a", "more/b.jsonl:1"]
    assert rejects(out) == []


def test_a_file_the_input_folder_holds_under_two_names_is_answered_once_and_a_rerun_goes_on(
    tiny_model: Path, tmp_path: Path
) -> None:
    """`in/b.jsonl -> a.jsonl` beside it: the job read the file under both names and answered each record twice. It
    is read once now, under the first name in sorted order, so each run of the command plans the same job (its id
    and shards): a trial run's shard is done for the next run, which answers the rest, and a third finds the job
    finished."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(
        "".join(json.dumps({"id": f"r{i}", "query": f"{i}?"}) + "\n" for i in range(3))
    )
    (tmp_path / "in" / "b.jsonl").symlink_to("a.jsonl")
    out = tmp_path / "out"

    def run(**infer: Any) -> JobResult | StoppedJob:
        config = job_config(max_new_tokens=2, shard_size=1, **infer)
        return run_batch_job(str(tiny_model), str(tmp_path / "in"), str(out), config, progress=False)

    trial = run(max_shards=1)
    plan = json.loads((out / "_job" / "job.json").read_text())
    assert [f["name"] for f in plan["files"]] == ["a.jsonl"] and len(plan["shards"]) == 3
    assert isinstance(trial, StoppedJob) and [s.name for s in trial.status.pending] == ["00001", "00002"]
    rest = run()
    assert isinstance(rest, JobResult) and [s.shard for s in rest.ran] == [1, 2]
    assert [r["key"] for r in results(out)] == ["r0", "r1", "r2"]
    again = run()
    assert isinstance(again, JobResult) and again.finished_before


def test_answers_end_at_the_first_eos() -> None:
    # generate pads a row that finished early (here: pad 2 after EOS 1) until the longest row is done
    assert answer_tokens([5, 6, 1, 2, 2], eos_token_id=1) == [5, 6, 1]
    assert answer_tokens([5, 6, 7], eos_token_id=1) == [5, 6, 7]


def test_batching_does_not_change_the_answers(tiny_model: Path, demo_data: tuple[Path, Path], tmp_path: Path) -> None:
    """Left padding and batched images must give what each record gets alone (greedy, float32)."""
    train_file, _ = demo_data
    run_batch_job(str(tiny_model), str(train_file), str(tmp_path / "one"), job_config(batch_size=1))
    run_batch_job(str(tiny_model), str(train_file), str(tmp_path / "many"), job_config(batch_size=5))
    one, many = results(tmp_path / "one"), results(tmp_path / "many")
    assert [r["response"] for r in many] == [r["response"] for r in one]
    assert [r["generated_tokens"] for r in many] == [r["generated_tokens"] for r in one]


def test_hybrid_model_batches(tiny_hybrid_model: Path, demo_data: tuple[Path, Path], tmp_path: Path) -> None:
    _, eval_file = demo_data
    run_batch_job(str(tiny_hybrid_model), str(eval_file), str(tmp_path / "one"), job_config(batch_size=1))
    run_batch_job(str(tiny_hybrid_model), str(eval_file), str(tmp_path / "many"), job_config(batch_size=4))
    many = results(tmp_path / "many")
    assert [r["response"] for r in many] == [r["response"] for r in results(tmp_path / "one")]
    assert len(many) == 6


def test_simple_records_keep_every_field_and_use_their_id_as_key(
    tiny_model: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    shutil.copy(images["red"], tmp_path / "in" / "red.png")
    records = [
        {"id": "q1", "query": "<img>red.png</img>What colour?", "meta": {"tags": ["a", {"b": 1}]}},
        {"id": 7, "query": "And this one?", "images": ["red.png"], "history": [["Hi", "Hello"]]},
        {"query": "<image>Compare with <image>", "images": [str(images["red"]), str(images["blue"])]},
        {"query": "text only", "extra": None},
    ]
    (tmp_path / "in" / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    # record 3 names images elsewhere by absolute path: their folder must be an allowed root
    config = load_config(None, {"infer.max_new_tokens": 3, "data.allowed_roots": [str(images["red"].parent)]})
    result = run_batch_job(str(tiny_model), str(tmp_path / "in"), str(out), config)
    got = results(out)
    assert result.results == 4 and result.rejects == 0
    assert [r["key"] for r in got] == ["q1", 7, "prompts.jsonl:3", "prompts.jsonl:4"]
    for record, given in zip(got, records, strict=True):
        assert {k: record[k] for k in given} == given  # nested fields too, exactly as they were
        assert set(record) - set(given) == {"key", "source", "response", "generated_tokens", "finish_reason", "model"}
        assert record["generated_tokens"] <= 3
    assert result.images_per_s > 0  # 4 images were loaded


def test_a_simple_records_system_field_is_its_system_prompt(tiny_model: Path, tmp_path: Path) -> None:
    """ms-swift's query-response form carries `system`: the record's prompt is encoded with it instead of the model's
    default (it was kept as a field and not used); "" means none; anything but a string is a reject."""

    def prompt_text(record: dict[str, Any]) -> str:
        prompt = parse_prompt(RawRecord("in.jsonl:1", "in.jsonl:1", 1, json.dumps(record)), tmp_path)
        assert prompt.fields == record  # kept as it was, too
        encoded = encode(prompt.messages, tokenizer, loaded.num_image_tokens, None, add_generation_prompt=True)
        return str(tokenizer.decode(encoded.input_ids))

    loaded = load_model(tiny_model)
    tokenizer = loaded.tokenizer
    own = prompt_text({"id": "s", "query": "Hi", "system": "Answer in one word."})
    assert "Answer in one word." in own and DEFAULT_SYSTEM_PROMPT not in own
    assert DEFAULT_SYSTEM_PROMPT in prompt_text({"id": "d", "query": "Hi"})
    none = prompt_text({"id": "n", "query": "Hi", "system": ""})
    assert none.replace(tokenizer.bos_token or "", "").startswith("User: Hi"), none
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "bad", "query": "Hi", "system": 5}) + "\n")
    result = run_batch_job(str(tiny_model), str(tmp_path / "in.jsonl"), str(tmp_path / "out"), job_config())
    assert result.rejects == 1 and rejects(tmp_path / "out")[0]["reason"] == "system: must be a string, got int"


def test_images_beside_conversations_are_a_reject_not_a_prompt_without_them(tmp_path: Path) -> None:
    """`conversations` carry their images as <img> tags: an ms-swift style `images` list beside them was passed over,
    and the prompt answered without its images. A turn's other keys are harmless: the result keeps the record."""

    def parse(record: dict[str, Any]) -> Any:
        return parse_prompt(RawRecord("in.jsonl:1", "in.jsonl:1", 1, json.dumps(record)), tmp_path)

    turns = [{"from": "user", "value": "<image>What colour?"}]
    with pytest.raises(RecordError, match="not read beside 'conversations'") as info:
        parse({"conversations": turns, "images": ["a.png"]})
    assert info.value.field == "images"
    with pytest.raises(RecordError) as info:
        parse({"conversations": turns, "messages": [{"role": "user", "content": "Hi"}]})
    assert info.value.field == "messages"
    record = {"conversations": [{"from": "user", "value": "Hi", "name": "ann"}]}
    assert parse(record).fields == record


def test_a_simple_records_reject_names_its_own_field_and_the_path_once(tiny_model: Path, tmp_path: Path) -> None:
    """A simple record is read as a `messages` record, and its rejects named that record's fields: "messages[0].content:
    image /x/secret.png is outside the dataset's folder (/x/secret.png)". They name the simple record's own field
    (`query`, `history[i][j]`, `images[i]`) and the path once; a dataset record keeps its own field paths. A turn's
    problem is said in the simple form's words: "history[0][1]: is empty", where it read "history[0][1]: turn 2
    (assistant) is empty", a dataset record's turn number."""
    data = tmp_path / "data"
    data.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    refused = f"is outside the dataset's folder; move it under {data} or add its folder to data.allowed_roots"
    records = {
        "query": ({"id": "query", "query": f"<img>{outside}</img>Colour?"}, f"query: image {outside} {refused}"),
        "history": (
            {
                "id": "history",
                "query": "And now?",
                "history": [["Hi", "Hello"], ["<img>../secret.png</img>Colour?", "Red"]],
            },
            f"history[1][0]: image ../secret.png {refused}",
        ),
        "images": (
            {"id": "images", "query": "<image>?", "images": [str(outside)]},
            f"images[0]: image {outside} {refused}",
        ),
        "not a path": (
            {"id": "not a path", "query": "?", "images": [3]},
            "images[0]: must be an image path or URL, got int",
        ),
        "marks": (
            {"id": "marks", "query": "<image><image>Differences?", "images": ["red.png"]},
            "query: more <image> tags than the 1 entry in images",
        ),
        "pair": (
            {"id": "pair", "query": "?", "history": [["Hi"]]},
            "history[0]: must be a [query, response] pair of strings",
        ),
        "empty": (
            {"id": "empty", "query": "?", "history": [["Hi", " "]]},
            "history[0][1]: is empty",
        ),
        "empty query": ({"id": "empty query", "query": " ", "history": [["Hi", "Hello"]]}, "query: is empty"),
        "image in a response": (
            {"id": "image in a response", "query": "?", "history": [["Hi", "<img>red.png</img>"]]},
            "history[0][1]: images are only allowed in a query, not in a response",
        ),
        "mark in a response": (  # it read "query: more <image> tags than the 1 entry in images"
            {"id": "mark in a response", "query": "?", "history": [["Hi", "<image>"]], "images": ["red.png"]},
            "history[0][1]: images are only allowed in a query, not in a response",
        ),
        "dataset": (
            {"id": "dataset", "messages": [{"role": "user", "content": f"<img>{outside}</img>Colour?"}]},
            f"messages[0].content: image {outside} {refused}",
        ),
        "dataset empty": (  # a dataset record's turns are named by number, as `vlmops validate` names them
            {
                "id": "dataset empty",
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": " "},
                    {"role": "user", "content": "?"},
                ],
            },
            "(turns): turn 2 (assistant) is empty",
        ),
    }
    (data / "in.jsonl").write_text("".join(json.dumps(record) + "\n" for record, _ in records.values()))
    result = run_batch_job(str(tiny_model), str(data / "in.jsonl"), str(tmp_path / "out"), job_config())
    assert result.rejects == len(records)
    assert {r["key"]: r["reason"] for r in rejects(tmp_path / "out")} == {k: v for k, (_, v) in records.items()}


def test_an_image_that_cannot_be_read_is_named_by_the_field_that_holds_it(
    tiny_model: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    """A missing or unreadable image's reject named the image alone ("image /x/gone.png: file not found"): of a record's
    several images, it now names the field it came from, as the parse's rejects do: `images[1]`, an <img> tag's
    `query` or `history[0][0]`, a dataset record's `conversations[2].value`; the first field where two name one image
    (it is read once)."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(images["red"], data / "red.png")
    (data / "bad.png").write_text("not a png")
    gone = (data / "gone.png").resolve()
    missing = f"image {gone}: file not found (relative paths resolve against the dataset file's folder)"
    records = {
        "second listed": (
            {"id": "second listed", "query": "<image><image>Differences?", "images": ["red.png", "gone.png"]},
            f"images[1]: {missing}",
        ),
        "history tag": (
            {"id": "history tag", "query": "<img>red.png</img>And this?", "history": [["<img>gone.png</img>?", "A"]]},
            f"history[0][0]: {missing}",
        ),
        "query tag": (
            {"id": "query tag", "query": "<img>gone.png</img>And this?", "history": [["<img>red.png</img>?", "A"]]},
            f"query: {missing}",
        ),
        "named twice": (
            {"id": "named twice", "query": "<img>gone.png</img>Again?", "history": [["<img>gone.png</img>?", "A"]]},
            f"history[0][0]: {missing}",
        ),
        "conversations": (
            {
                "id": "conversations",
                "conversations": [
                    {"from": "user", "value": "<img>red.png</img>Colour?"},
                    {"from": "assistant", "value": "Red"},
                    {"from": "user", "value": "<img>gone.png</img>And this one?"},
                ],
            },
            f"conversations[2].value: {missing}",
        ),
    }
    # Not an image: the reason quotes the path shortened where it is long, so its start and end are compared.
    not_images = {
        "second unreadable": (
            {"id": "second unreadable", "query": "<image><image>Differences?", "images": ["red.png", "bad.png"]},
            "images[1]: image ",
        ),
        "messages": (
            {
                "id": "messages",
                "messages": [{"role": "user", "content": "<image><image>?"}],
                "images": ["red.png", "bad.png"],
            },
            "images[1]: image ",
        ),
    }
    answered = {"id": "answered", "query": "<image>Colour?", "images": ["red.png"]}
    lines = [record for record, _ in [*records.values(), *not_images.values()]] + [answered]
    (data / "in.jsonl").write_text("".join(json.dumps(record) + "\n" for record in lines))
    result = run_batch_job(str(tiny_model), str(data / "in.jsonl"), str(tmp_path / "out"), job_config())
    assert (result.records, result.results, result.rejects) == (len(lines), 1, len(lines) - 1)
    reasons = {r["key"]: r["reason"] for r in rejects(tmp_path / "out")}
    kinds = {r["key"]: r["kind"] for r in rejects(tmp_path / "out")}
    assert {key: reasons[key] for key in records} == {key: reason for key, (_, reason) in records.items()}
    assert {key: kinds[key] for key in records} == dict.fromkeys(records, "missing_image")
    for key, (_, start) in not_images.items():
        assert reasons[key].startswith(start), reasons[key]
        assert reasons[key].endswith("bad.png: not a readable image (no image format starts like b'not a png')")
        assert kinds[key] == "not_an_image"
    assert [r["key"] for r in results(tmp_path / "out")] == ["answered"]


def test_a_byte_order_mark_and_windows_line_ends_are_read_as_text(tiny_model: Path, tmp_path: Path) -> None:
    """A .jsonl saved by a Windows editor (a UTF-8 byte-order mark, CRLF line ends, a blank line): every record is
    answered, the first one too (it was a reject: "Unexpected UTF-8 BOM")."""
    lines = [json.dumps({"id": "first", "query": "Colour?"}), json.dumps({"id": "second", "query": "Shape?"}), ""]
    (tmp_path / "in.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join([*lines, ""]).encode())
    result = run_batch_job(str(tiny_model), str(tmp_path / "in.jsonl"), str(tmp_path / "out"), job_config())
    assert (result.records, result.results, result.rejects) == (2, 2, 0)
    assert [r["key"] for r in results(tmp_path / "out")] == ["first", "second"]


def test_a_line_that_is_not_utf8_is_a_reject_not_answered_with_its_text_changed(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A line saved in another encoding (Latin-1's "café") is a reject that names the byte, as validation's is; it was
    answered with U+FFFD in place of the byte, its fields written back changed."""
    (tmp_path / "in.jsonl").write_bytes(
        json.dumps({"id": "ok", "query": "Colour?"}).encode() + b"\n" + b'{"id": "latin", "query": "caf\xe9?"}\n'
    )
    result = run_batch_job(str(tiny_model), str(tmp_path / "in.jsonl"), str(tmp_path / "out"), job_config())
    assert (result.records, result.results, result.rejects) == (2, 1, 1)
    (reject,) = rejects(tmp_path / "out")
    assert (reject["line"], reject["key"]) == (2, "in.jsonl:2")
    assert reject["reason"] == "(line): not UTF-8 text: byte 0xe9 at column 30 (save the file as UTF-8)"


def test_line_separators_inside_strings_stay_inside_their_record(
    tiny_model: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    """U+2028, U+2029 and U+0085 inside a JSON string are text, not line ends (results and rejects are written with
    them as they are): the job finishes with each record once, its fields as they were, and its rejects can be
    answered again. Read back with str.splitlines, a result or reject became two broken lines and the job could never
    finish (a JSONDecodeError at every rerun)."""
    records = [
        {"id": "a\u2028b", "query": "Line\u2028separator?", "meta": {"note": "para\u2029graph\x85"}},
        {"id": "gone\u2029", "query": "<img>red.png</img>Colour?"},  # its image comes later
    ]
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "out"
    result = run_batch_job(str(tiny_model), str(prompts), str(out), job_config())
    assert (result.records, result.results, result.rejects) == (2, 1, 1)
    (answered,) = iter_results(open_output(str(out)))
    assert {k: answered[k] for k in records[0]} == records[0]
    assert job_status(open_output(str(out))).rejects == 1
    shutil.copy(images["red"], tmp_path / "red.png")
    again = run_batch_job(str(tiny_model), str(prompts), str(tmp_path / "retry"), job_config(retry_rejects=str(out)))
    assert (again.records, again.results, again.rejects) == (1, 1, 0)
    assert [r["key"] for r in iter_results(open_output(str(tmp_path / "retry")))] == ["gone\u2029"]


def test_a_first_line_holding_only_a_byte_order_mark_is_blank(tiny_model: Path, tmp_path: Path) -> None:
    """A Windows editor's file that opens with a blank line (its byte-order mark alone on it): no record there, as
    validation reads it; it was counted as a record and rejected as "not valid JSON"."""
    lines = [json.dumps({"query": "Colour?"}), json.dumps({"query": "Shape?"})]
    (tmp_path / "in.jsonl").write_bytes(b"\xef\xbb\xbf\r\n" + "\r\n".join([*lines, ""]).encode())
    result = run_batch_job(str(tiny_model), str(tmp_path / "in.jsonl"), str(tmp_path / "out"), job_config())
    assert (result.records, result.results, result.rejects) == (2, 2, 0)
    assert [r["key"] for r in results(tmp_path / "out")] == ["in.jsonl:2", "in.jsonl:3"]


def test_a_prompt_past_the_models_positions_is_rejected_by_the_plain_engine(tiny_model: Path, tmp_path: Path) -> None:
    """The plain engine takes what the model's positions allow (the tiny model's `max_position_embeddings`: 4096): a
    longer record is a reject that says so; the others are answered. `infer.max_context`, where set, holds for it too
    (it took any prompt up to 4096 positions, so the job's rejects hung on which engine `auto` picked)."""
    records = [
        {"id": "short", "query": "Colour?"},
        {"id": "long", "query": "colour " * 4200},
        {"id": "last", "query": "?"},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_batch_job(str(tiny_model), str(tmp_path / "in.jsonl"), str(tmp_path / "out"), job_config())
    assert (result.results, result.rejects) == (2, 1)
    (reject,) = rejects(tmp_path / "out")
    # The model's positions are the limit here: raising infer.max_context would not let it in, so the reason does not
    # say to (it named infer.max_context whichever limit applied).
    assert reject["line"] == 2 and reject["reason"].endswith(
        " + infer.max_new_tokens 10 exceed the 4096 tokens a request may take (the model's max_position_embeddings); "
        "send fewer images or less text"
    ), reject
    assert sorted(r["id"] for r in results(tmp_path / "out")) == ["last", "short"]

    (tmp_path / "mid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [records[0], {"query": "colour " * 300}]))
    capped = job_config(max_context=256, engine="plain")
    result = run_batch_job(str(tiny_model), str(tmp_path / "mid.jsonl"), str(tmp_path / "capped"), capped)
    assert (result.results, result.rejects) == (1, 1)
    (reject,) = rejects(tmp_path / "capped")
    assert reject["line"] == 2 and reject["reason"].endswith(
        "exceed the 256 tokens a request may take (infer.max_context); send fewer images or less text, or raise "
        "infer.max_context"
    ), reject


def test_unanswerable_records_go_to_rejects_with_file_line_and_reason(
    tiny_model: Path, demo_data: tuple[Path, Path], tmp_path: Path
) -> None:
    shutil.copytree(demo_data[0].parent, tmp_path / "data")
    dataset = tmp_path / "data" / "train.jsonl"
    lines = dataset.read_text().splitlines()
    broken = tmp_path / "data" / "images" / "broken.png"
    broken.write_bytes(b"this is not a png")
    lines[8] = json.dumps({"conversations": [{"from": "user", "value": f"<img>{broken}</img>Colour?"}]})
    lines[2] = '{"conversations": [{"from": "user", "value": "cut off"}]'  # no closing brace: breaks at its end
    lines.append(json.dumps({"query": "<img>images/gone.png</img>Colour?"}))
    lines.append(json.dumps({"prompt": "neither form"}))
    lines.append(json.dumps({"query": "clash", "response": "mine"}))
    outside = tmp_path / "outside.png"  # a real image, but outside the input's folder
    shutil.copy(next((tmp_path / "data" / "images").glob("*.png")), outside)
    lines.append(json.dumps({"query": "<img>../outside.png</img>Colour?"}))
    deep = "[" * 100_000 + "]" * 100_000  # json's parser recursed to Python's limit: a RecursionError ended the job
    lines.append(deep)
    dataset.write_text("\n".join(lines) + "\n")

    out = tmp_path / "out"
    result = run_batch_job(str(tiny_model), str(dataset), str(out), job_config(batch_size=2, shard_size=4))
    assert (result.records, result.results, result.rejects) == (16, 9, 7)
    by_line = {r["line"]: r for r in rejects(out)}
    assert sorted(by_line) == [3, 9, 12, 13, 14, 15, 16]
    assert "outside.png is outside the dataset's folder" in by_line[15]["reason"]
    assert "data.allowed_roots" in by_line[15]["reason"]
    assert all(r["file"] == str(dataset) for r in by_line.values())
    # The column where the line breaks, as `vlmops validate` names it (it named column 1: the next line's start).
    assert by_line[3]["reason"] == f"(line): not valid JSON: Expecting ',' delimiter at column {len(lines[2]) + 1}"
    assert by_line[9]["reason"].startswith("conversations[0].value: image ")  # the field that names the image
    assert "broken.png: not a readable image" in by_line[9]["reason"]
    assert by_line[12]["reason"] == f"query: image {dataset.parent / 'images' / 'gone.png'}: file not found " + (
        "(relative paths resolve against the dataset file's folder)"
    )
    assert "needs 'conversations', 'messages' or 'query'" in by_line[13]["reason"]
    assert by_line[14]["reason"].startswith("response: is a field batch inference adds")
    assert (
        by_line[16]["reason"]
        == "(line): not valid JSON: lists and objects nested too deeply to read (at most about 1,000 levels)"
    )
    answered = {int(r["key"].split(":")[1]) for r in results(out)}
    assert answered | set(by_line) == set(range(1, 17)) and not answered & set(by_line)  # exactly once
    assert list((out / "_job" / "tmp").iterdir()) == []  # no temp file left behind
    config = load_config(
        None, {"infer.max_new_tokens": 10, "infer.shard_size": 4, "data.allowed_roots": [str(tmp_path)]}
    )
    allowed = run_batch_job(str(tiny_model), str(dataset), str(tmp_path / "out2"), config)
    assert (allowed.results, allowed.rejects) == (10, 6)  # with its folder allowed, the outside image is read


def test_on_error_fail_stops_at_the_first_unanswerable_record(
    tiny_model: Path, demo_data: tuple[Path, Path], tmp_path: Path
) -> None:
    shutil.copytree(demo_data[0].parent, tmp_path / "data")
    dataset = tmp_path / "data" / "train.jsonl"
    lines = dataset.read_text().splitlines()
    lines[8] = json.dumps({"query": f"<img>{tmp_path / 'data' / 'gone.png'}</img>Colour?"})
    dataset.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    # Batches of 3 over shards of 4: the batch that meets the bad record (line 9, shard 2) already holds the last two
    # records of shard 1, as the fast engine's slots hold prompts read ahead of its answers (on a GPU machine this job
    # runs on the fast engine: fast_min_records 0).
    config = job_config(batch_size=3, shard_size=4, on_error="fail", fast_min_records=0)
    with pytest.raises(RecordRejectedError, match=r"train\.jsonl:9: query: image \S*gone\.png: file not found"):
        run_batch_job(str(tiny_model), str(dataset), str(out), config)
    # The prompts in flight are answered and the shards read whole are published; the failed shard published nothing;
    # no temp file is left.
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.jsonl", "part-00001.jsonl"]
    assert not (out / "manifest.json").exists() and not (out / "_job" / "rejects-00002.jsonl").exists()
    assert list((out / "_job" / "tmp").iterdir()) == []


def test_plain_engine_finish_reasons_and_lazy_pull(tiny_model: Path) -> None:
    loaded = load_model(tiny_model, device="cpu")  # also on a GPU machine
    config = job_config(max_new_tokens=4, batch_size=2)
    engine = make_engine(loaded, config.infer)
    assert isinstance(engine, PlainEngine)  # auto on CPU
    tokenizer = loaded.tokenizer
    prompt = [tokenizer.bos_token_id, *tokenizer.encode("User: hi\n\nAssistant:", add_special_tokens=False)]

    pulled: list[int] = []

    def requests() -> Any:
        for key in range(5):
            pulled.append(key)
            yield GenerationRequest(key, prompt)

    cudnn_attention: list[bool] = []
    handle = loaded.model.lm_head.register_forward_hook(
        lambda *_: cudnn_attention.append(torch.backends.cuda.cudnn_sdp_enabled())
    )
    stream = engine.generate(requests())
    first = next(stream)
    handle.remove()
    assert cudnn_attention and not any(cudnn_attention)  # as chat: no cuDNN graph built per new shape
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert pulled == [0, 1]  # one batch taken, not the whole iterator
    rest = list(stream)
    assert [r.key for r in [first, *rest]] == [0, 1, 2, 3, 4]
    for result in [first, *rest]:
        assert result.finish_reason == "length" and len(result.token_ids) == 4
        assert tokenizer.eos_token_id not in result.token_ids

    # An LM head whose EOS row is the prompt's last hidden state (all others zero): EOS wins the first step,
    # so the answer stops at once, and the EOS is not in the tokens.
    with torch.no_grad():
        hidden = loaded.model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0, -1]
        head = loaded.model.get_output_embeddings().weight
        head.zero_()
        head[tokenizer.eos_token_id] = hidden * 100
    stopped = list(make_engine(loaded, config.infer).generate([GenerationRequest("a", prompt)]))
    assert stopped[0].finish_reason == "stop" and stopped[0].token_ids == []


def test_sampling_settings_run_on_the_plain_engine_and_fast_is_refused_on_cpu(
    tiny_model: Path, demo_data: tuple[Path, Path], tmp_path: Path
) -> None:
    """Sampled on CPU (the plain engine): a rerun draws the same answers (each batch seeded from its records); the
    seed and top-k are part of the job, so another seed is another job with other answers."""
    _, eval_file = demo_data
    sampled = {"temperature": 1.5, "top_p": 0.95, "repetition_penalty": 1.2, "max_new_tokens": 6, "batch_size": 2}
    config = job_config(engine="plain", **sampled)  # plain also on a GPU machine
    result = run_batch_job(str(tiny_model), str(eval_file), str(tmp_path / "out"), config)
    assert result.results == 6
    again = run_batch_job(str(tiny_model), str(eval_file), str(tmp_path / "again"), config)
    assert [r["response"] for r in results(tmp_path / "again")] == [r["response"] for r in results(tmp_path / "out")]
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("out", "again")]
    assert manifests[0]["job_id"] == manifests[1]["job_id"] == again.manifest["job_id"]
    assert {"seed": 0, "top_k": 0}.items() <= manifests[0]["settings"].items()
    reseeded = job_config(engine="plain", seed=7, **sampled)
    other = run_batch_job(str(tiny_model), str(eval_file), str(tmp_path / "other"), reseeded)
    assert other.manifest["job_id"] != again.manifest["job_id"]
    assert [r["response"] for r in results(tmp_path / "other")] != [r["response"] for r in results(tmp_path / "out")]
    loaded: LoadedModel = load_model(tiny_model, device="cpu")
    with pytest.raises(UserInputError, match="infer.engine=fast needs a CUDA device"):
        make_engine(loaded, job_config(engine="fast").infer)
