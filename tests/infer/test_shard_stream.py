"""One stream through the engine for a whole job (`ShardRunner.run_many`): the next shard's prompts fill the slots
the last one's finished rows free, and each shard is still published alone, complete and exactly once."""

from __future__ import annotations

import gc
import json
import logging
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vlmops.config import load_config
from vlmops.infer.batch_job import prepare_job
from vlmops.infer.engine import DEFAULT_CONTEXT, GenerationRequest, GenerationResult, slot_context
from vlmops.infer.fast_engine import FastEngine
from vlmops.infer.job import ShardRunner
from vlmops.infer.job_output import finalize, open_job, pending_shards
from vlmops.infer.job_plan import JobPlan, ModelInfo
from vlmops.infer.output import open_output
from vlmops.infer.planning import plan_job
from vlmops.infer.records import Prompt, parse_prompt
from vlmops.infer.shards import RawRecord
from vlmops.models.loading import load_model
from vlmops.models.template import encode


class Recording:
    """The real engine, with the order in which requests went in and answers came out."""

    def __init__(self, engine: FastEngine):
        self.engine = engine
        self.max_context = engine.max_context
        self.events: list[tuple[str, Any]] = []

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResult]:
        def pulled() -> Iterator[GenerationRequest]:
            for request in requests:
                self.events.append(("in", request.key))
                yield request

        for result in self.engine.generate(pulled()):
            self.events.append(("out", result.key))
            yield result


def test_shards_overlap_in_the_engine_and_each_is_published_whole(
    tiny_model: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    shutil.copy(images["red"], tmp_path / "red.png")
    lines = []
    for i in range(23):
        record: dict[str, Any] = {"id": f"r{i}", "query": f"What is {i} plus {i}?"}
        if i % 4 == 0:
            record["images"] = ["red.png"]
        lines.append(json.dumps(record))
    lines[7] = "{not json"  # a reject in shard 1
    lines[10:15] = [
        json.dumps({"id": f"m{i}", "query": "<img>missing.png</img>?"}) for i in range(5)
    ]  # shard 2: all rejects
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    config = load_config(None, {"infer.max_new_tokens": 3, "infer.shard_size": 5})
    loaded = load_model(tiny_model)
    engine = Recording(FastEngine(loaded, config.infer, max_batch=8, prefill_batch=2, max_context=256))
    output = open_output(str(tmp_path / "out"))
    plan = open_job(plan_job(ModelInfo(str(tiny_model), None, "sha256:x"), str(tmp_path / "in.jsonl"), config), output)
    shards = pending_shards(plan, output)
    assert len(shards) == 5

    def live_prompts() -> int:
        gc.collect()
        return sum(type(o) is Prompt for o in gc.get_objects())

    before = live_prompts()  # whatever other tests in this process still hold
    stats, live = [], []
    for shard_stats in ShardRunner(loaded, engine, config).run_many(plan, shards, output):
        stats.append(shard_stats)
        live.append(live_prompts() - before)
    # Published shards let their records go: at the end only the last shard's (3) are alive, not all 17 answered.
    assert live[-1] <= 5

    assert sorted(s.shard for s in stats) == [0, 1, 2, 3, 4] and pending_shards(plan, output) == []
    assert [(s.results, s.rejects) for s in sorted(stats, key=lambda s: s.shard)] == [
        (5, 0),
        (4, 1),
        (0, 5),
        (5, 0),
        (3, 0),
    ]
    # The engine took the next shard's prompts before the previous shard's last answer came out.
    first_in = {k[0]: i for i, (e, k) in reversed(list(enumerate(engine.events))) if e == "in"}
    last_out = {k[0]: i for i, (e, k) in enumerate(engine.events) if e == "out"}
    assert first_in[1] < last_out[0]
    # Each part holds its own shard's records, in input order; rejects name their file and line.
    manifest = finalize(plan, output)
    assert manifest["results"] == 17 and manifest["rejects"] == 6 and manifest["records_read"] == 23
    for shard in range(5):
        part = tmp_path / "out" / f"part-{shard:05d}.jsonl"
        keys = [json.loads(line)["key"] for line in part.read_text().splitlines()]
        expected = [f"r{i}" for i in range(shard * 5, min(shard * 5 + 5, 23)) if i != 7 and not 10 <= i < 15]
        assert keys == expected
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rejects) == [8, 11, 12, 13, 14, 15]
    assert all(s.seconds >= 0 for s in stats)


def test_a_prompt_longer_than_the_engine_takes_is_a_reject_not_a_failed_job(
    tiny_model: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    """The fast engine refuses a request longer than its `max_context`; a job sends such a record to its rejects, with
    its token count and what to change, and answers the rest (before, the engine's refusal ended the job at that
    record, on every rerun)."""
    shutil.copy(images["red"], tmp_path / "red.png")
    lines = [json.dumps({"id": f"r{i}", "query": f"<img>red.png</img>What colour is shape {i}?"}) for i in range(6)]
    lines[3] = json.dumps({"id": "long", "query": "<img>red.png</img>" + "colour " * 300})
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    config = load_config(None, {"infer.max_new_tokens": 3, "infer.shard_size": 4, "infer.max_context": 128})
    loaded = load_model(tiny_model)
    engine = FastEngine(loaded, config.infer, max_batch=4, prefill_batch=2, max_context=128)
    output = open_output(str(tmp_path / "out"))
    plan = open_job(plan_job(ModelInfo(str(tiny_model), None, "sha256:x"), str(tmp_path / "in.jsonl"), config), output)
    stats = list(ShardRunner(loaded, engine, config).run_many(plan, pending_shards(plan, output), output))
    assert [(s.results, s.rejects) for s in stats] == [(3, 1), (2, 0)]
    finalize(plan, output)
    (reject,) = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert reject["line"] == 4
    assert re.fullmatch(
        r"prompt: \d+ tokens \(1 image of \d+ tokens\) \+ infer.max_new_tokens 3 exceed the 128 tokens a request may take .*"
        r"raise infer.max_context",
        reject["reason"],
    ), reject["reason"]
    answered = [
        json.loads(line)["id"]
        for part in sorted((tmp_path / "out").glob("part-*.jsonl"))
        for line in part.read_text().splitlines()
    ]
    assert sorted(answered) == ["r0", "r1", "r2", "r4", "r5"]


def test_a_job_sizes_the_fast_engines_slots_to_its_longest_prompt(
    tiny_model: Path, images: dict[str, Path], tmp_path: Path
) -> None:
    """With `infer.max_context` unset, the plan counts every record's prompt tokens as the runner will encode them
    (a .jsonl and a .json list file, a malformed line not counted) and the fast engine's slots hold the longest prompt
    and the answer: the longest record is answered; one token less per slot and it is a reject, so the count is the
    runner's to the token. An old plan (no counts) and a set `infer.max_context` keep the fixed sizes; a plan made for the
    plain engine (not counted) gets its counts when the job is resumed with the fast engine possible."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(images["red"], folder / "red.png")
    short = [json.dumps({"id": f"s{i}", "query": f"<img>red.png</img>What colour is shape {i}?"}) for i in range(5)]
    (folder / "a.jsonl").write_text("\n".join([*short, "{not json"]) + "\n")
    long = {"id": "long", "query": "<img>red.png</img>Describe it. " + "The colour naïve 🙂 " * 40, "history": []}
    (folder / "b.json").write_text(json.dumps([{"id": "t", "query": "<img>red.png</img>Shape?"}, long], indent=1))
    config = load_config(None, {"infer.max_new_tokens": 3, "infer.shard_size": 4})
    loaded = load_model(tiny_model)
    _, plan, _, _ = prepare_job(str(tiny_model), str(folder), str(tmp_path / "out"), config)

    def encoded(record: dict[str, Any]) -> int:
        prompt = parse_prompt(RawRecord("x", "x", 1, json.dumps(record)), folder)
        return len(encode(prompt.messages, loaded.tokenizer, loaded.num_image_tokens, add_generation_prompt=True))

    longest = encoded(long)
    assert [f.longest_prompt for f in plan.files] == [max(encoded(json.loads(line)) for line in short), longest]
    assert plan.longest_prompt == longest > 2 * encoded(json.loads(short[0]))
    context = slot_context(loaded, config.infer, plan.longest_prompt)
    assert context == -(-(longest + 3) // 128) * 128

    def run(max_context: int, out: str) -> list[str]:
        engine = FastEngine(loaded, config.infer, max_batch=4, prefill_batch=2, max_context=max_context)
        target = open_output(str(tmp_path / out))
        job = open_job(plan, target)
        list(ShardRunner(loaded, engine, config).run_many(job, pending_shards(job, target), target))
        finalize(job, target)
        return [json.loads(line)["key"] for line in (tmp_path / out / "rejects.jsonl").read_text().splitlines()]

    assert run(context, "sized") == ["a.jsonl:6"]  # only the malformed line
    assert run(longest + 3, "exact") == ["a.jsonl:6"]
    assert run(longest + 2, "short") == ["a.jsonl:6", "long"]
    reason = json.loads((tmp_path / "short" / "rejects.jsonl").read_text().splitlines()[1])["reason"]
    assert reason == (
        f"prompt: {longest} tokens (1 image of {loaded.num_image_tokens} tokens) + infer.max_new_tokens 3 exceed the "
        f"{longest + 2} tokens a request may take (the fast engine's slots); send fewer images or less text, or size "
        f"them with infer.max_context={longest + 3} or more"
    )

    assert slot_context(loaded, config.infer, None) == DEFAULT_CONTEXT  # no job, or a plan from before the counts
    saved = json.loads(plan.to_json())
    for file in saved["files"]:
        del file["longest_prompt"]
    assert JobPlan.from_json(json.dumps(saved)).longest_prompt is None
    limit = loaded.model.config.get_text_config().max_position_embeddings
    assert slot_context(loaded, config.infer, limit) == limit  # capped: a longer record is a reject
    fixed = load_config(None, {"infer.max_new_tokens": 3, "infer.shard_size": 4, "infer.max_context": 512})
    assert slot_context(loaded, fixed.infer, longest) == 512
    _, capped, _, _ = prepare_job(str(tiny_model), str(folder), str(tmp_path / "fixed"), fixed)
    # Counted too (the plan checks that some prompt fits the setting), but the slots keep the size set.
    assert capped.longest_prompt == longest and slot_context(loaded, fixed.infer, capped.longest_prompt) == 512
    plain = load_config(None, {"infer.max_new_tokens": 3, "infer.shard_size": 4, "infer.engine": "plain"})
    _, unmeasured, _, _ = prepare_job(str(tiny_model), str(folder), str(tmp_path / "plain"), plain)
    assert unmeasured.longest_prompt is None  # the plain engine has no slots to size
    # The same job run again with the fast engine possible (the engine is not part of the job; infer.max_context is):
    # its slots are sized after all, and the saved plan (what workers read) now holds the counts.
    _, resumed, _, _ = prepare_job(str(tiny_model), str(folder), str(tmp_path / "plain"), config)
    assert resumed.job_id == unmeasured.job_id and resumed.longest_prompt == longest
    assert JobPlan.from_json((tmp_path / "plain" / "_job" / "job.json").read_text()).longest_prompt == longest


def test_a_few_long_records_are_named_with_the_setting_that_trades_them_for_slots(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One record in 201 makes every slot three times as long as the rest need: planning says which record, what
    the others need, and the `infer.max_context` that gives the slots back (at the cost of that record)."""
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"id": f"s{i}", "query": f"What is {i} plus {i}?"}) for i in range(200)]
    lines.insert(57, json.dumps({"id": "long", "query": "Describe it. " + "The colour naïve 🙂 " * 90}))
    prompts.write_text("\n".join(lines) + "\n")
    config = load_config(None, {"infer.max_new_tokens": 4})
    with caplog.at_level(logging.WARNING, logger="vlmops.infer.batch_job"):
        _, plan, _, _ = prepare_job(str(tiny_model), str(prompts), str(tmp_path / "out"), config)
    (file,) = plan.files
    longest = plan.longest_prompt
    assert longest is not None and file.longest_line == 58
    steps = -(-longest // 128)
    assert steps >= 4 and file.prompt_steps == [[1, 200], [steps, 1]]  # the short ones: 128 tokens or fewer
    context = -(-(longest + 4) // 128) * 128
    (advice,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert advice == (
        f"the job's longest prompt (prompts.jsonl:58) takes {longest} tokens, so each slot of the fast engine holds "
        f"{context} tokens with the answer, where 200 of its 201 records need 256 or fewer: --set "
        f"infer.max_context=256 fits ~{context // 256}x the slots in the same memory and sends at most 1 record "
        "(those over 128 prompt tokens) to the rejects"
    )
    # The plan keeps the counts (workers and a resumed run read them); records of one length: no advice.
    assert JobPlan.from_json((tmp_path / "out" / "_job" / "job.json").read_text()).files == plan.files
    prompts.write_text("\n".join(line for line in lines if '"long"' not in line) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlmops.infer.batch_job"):
        _, even, _, _ = prepare_job(str(tiny_model), str(prompts), str(tmp_path / "even"), config)
    assert even.slot_advice(4) is None and not [r for r in caplog.records if r.levelno == logging.WARNING]
