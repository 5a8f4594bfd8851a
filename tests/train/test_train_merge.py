"""Merging: a plain transformers checkpoint that reproduces adapter-on-base logits, a parity check that
fails loudly on genuinely wrong weights, full-mode export, and `vlmops export`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmops.cli.main import main
from vlmops.config import load_config
from vlmops.data.prepare import PreparedDataset
from vlmops.errors import UserInputError
from vlmops.evaluate.checkpoint import evaluate_checkpoint
from vlmops.scratch import held_folder
from vlmops.train.merge import (
    MergeFailed,
    MergeParityError,
    adapter_on_base,
    batch_logits,
    check_parity,
    launch_merge,
    load_plain,
    merge_run,
    parity_batch,
)
from vlmops.train.rundir import checkpoints, open_run
from vlmops.train.sft import train

ROOT = Path(__file__).resolve().parents[2]

LORA = {
    "train.lora.targets": "all-linear",
    "train.freeze.aligner": False,  # merged through peft's modules_to_save
    "train.lr": 1e-2,
    "train.max_steps": 3,
    "train.gradient_checkpointing": False,
}
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["deepseek_vl", "deepseek_vl_hybrid"])
def lora_run(
    request: pytest.FixtureRequest,
    tiny_models: dict[str, Path],
    snapshot: PreparedDataset,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    train(load_config(None, LORA), tiny_models[request.param], snapshot.path, run_dir)
    return run_dir


def test_merged_checkpoint_is_plain_transformers_and_matches(lora_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "merged"
    result = merge_run(lora_run, out)
    assert result.adapter and result.path == out and result.atol == 1e-3
    assert 0.0 <= result.max_abs_diff <= 1e-3
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    merged = AutoModelForImageTextToText.from_pretrained(out)  # transformers alone
    processor = AutoProcessor.from_pretrained(out)
    base_path = Path(open_run(lora_run).info.base_model)
    base = AutoModelForImageTextToText.from_pretrained(base_path)
    assert set(merged.state_dict()) == set(base.state_dict())  # no lora_* or modules_to_save keys
    batch = parity_batch(processor)
    assert batch["pixel_values"].shape[0] == 1 and batch["input_ids"].shape[0] == 2  # an image and a text-only prompt
    # the merge changed the model: training did something, and the merged weights carry it
    assert float((batch_logits(merged, batch) - batch_logits(base, batch)).abs().max()) > 1e-2
    reopened = open_run(out)  # usable as --ckpt, with the run's config, like swift's ...-merged folder
    assert reopened.weights == out and not reopened.is_adapter
    assert reopened.info.merged_from == str((lora_run / "final").resolve())


def test_tampered_merged_weights_fail_the_check(lora_run: Path, tmp_path: Path) -> None:
    from transformers import AutoProcessor

    out = merge_run(lora_run, tmp_path / "merged").path
    weights = load_file(out / "model.safetensors")
    key = next(k for k in weights if "language_model.layers.0.self_attn.q_proj" in k)
    weights[key] = weights[key] * 1.5
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    run = open_run(lora_run)
    batch = parity_batch(AutoProcessor.from_pretrained(out))
    reference = batch_logits(adapter_on_base(run, torch.float32, CPU), batch)
    with pytest.raises(MergeParityError, match="merge.parity_atol") as err:
        check_parity(out, reference, batch, 1e-3, CPU)
    assert err.value.max_abs_diff > err.value.atol == 1e-3


def test_adapter_altered_after_the_reference_fails_the_check(lora_run: Path, tmp_path: Path) -> None:
    from transformers import AutoProcessor

    lora_run = Path(shutil.copytree(lora_run, tmp_path / "run"))  # leave the shared run untouched
    run = open_run(lora_run)
    batch = parity_batch(AutoProcessor.from_pretrained(run.weights))
    reference = batch_logits(adapter_on_base(run, torch.float32, CPU), batch)
    adapter_file = run.weights / "adapter_model.safetensors"
    adapter = load_file(adapter_file)
    for key in adapter:
        if "lora_B" in key:
            adapter[key] = adapter[key] * 3
    save_file(adapter, adapter_file, metadata={"format": "pt"})
    merged = merge_run(lora_run, tmp_path / "merged-altered")  # consistent with itself ...
    with pytest.raises(MergeParityError):  # ... but not with the adapter the reference was taken from
        check_parity(merged.path, reference, batch, 1e-3, CPU)
    # and the check is not trivially failing: the reference model itself passes
    assert (
        check_parity(merged.path, batch_logits(load_plain(merged.path, torch.float32, CPU), batch), batch, 1e-3, CPU)
        == 0.0
    )


def test_merge_above_tolerance_raises_and_publishes_nothing(lora_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged-bf16"
    with pytest.raises(MergeParityError) as err:
        merge_run(lora_run, out, atol=1e-9, dtype="bfloat16")  # float32 rounding of the merge itself is real
    assert err.value.max_abs_diff > 1e-9
    assert not out.exists() and not list(tmp_path.glob(".staging-*"))


def test_a_bf16_merge_is_proved_in_float32(lora_run: Path, tmp_path: Path) -> None:
    """Written in bf16 (as on a GPU), checked in float32: the merge against the adapter on its base, the folder
    against the merged weights rounded to bf16. Compared in bf16, rounding alone moved the logits past 1e-3 (and a
    real-size model's by a few percent of their range: bench/merge_parity_probe.py)."""
    from transformers import AutoProcessor

    result = merge_run(lora_run, tmp_path / "merged", atol=1e-3, dtype="bfloat16")
    assert result.max_abs_diff <= 1e-3
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"
    run = open_run(lora_run)
    processor = AutoProcessor.from_pretrained(run.weights)
    batch = parity_batch(processor)
    with torch.no_grad():
        adapter_bf16 = batch_logits(adapter_on_base(run, torch.bfloat16, CPU), batch)
        merged_bf16 = batch_logits(load_plain(tmp_path / "merged", torch.bfloat16, CPU), batch)
    assert float((merged_bf16 - adapter_bf16).abs().max()) > 1e-3  # what a 16-bit comparison would have seen


def test_merge_refuses_an_out_folder_that_is_not_a_merged_model(lora_run: Path, tmp_path: Path) -> None:
    """The merged model replaces its out folder whole: an out that holds the runs (or anything else but an earlier
    merge) was replaced, deleting every run folder in it."""
    runs = tmp_path / "runs"
    run = runs / "run"
    shutil.copytree(lora_run, run)
    with pytest.raises(UserInputError, match=r"is not a merged model .*pass a new folder"):
        merge_run(run, runs)
    assert (run / "final" / "adapter_model.safetensors").is_file()
    (tmp_path / "empty").mkdir()
    merged = merge_run(run, tmp_path / "empty").path  # an empty folder holds nothing to lose
    assert merge_run(run, merged).path == merged  # an earlier merge is written again


@pytest.mark.parametrize("lora_run", ["deepseek_vl"], indirect=True)
def test_merge_in_a_child_process(lora_run: Path, tmp_path: Path) -> None:
    """The flow's merge step: the same result from a child process, and the parity failure as the same error. The
    process around the merge is the same for both architectures (each merges in process above): one is enough."""
    result = launch_merge(lora_run, tmp_path / "merged")
    assert result.adapter and result.path == tmp_path / "merged" and result.atol == 1e-3
    assert 0.0 <= result.max_abs_diff <= 1e-3 and (result.path / "model.safetensors").is_file()
    assert "merge parity: max |merged - reference|" in (tmp_path / "merged.log").read_text()
    with pytest.raises(MergeParityError) as err:
        launch_merge(lora_run, tmp_path / "merged-bf16", atol=1e-9, dtype="bfloat16")
    assert err.value.max_abs_diff > err.value.atol == 1e-9
    assert not (tmp_path / "merged-bf16").exists() and not list(tmp_path.glob(".merge-*"))
    with pytest.raises(MergeFailed, match=r"(?s)merge failed \(exit code 1\).*not a vlmops run"):
        launch_merge(tmp_path / "nope", tmp_path / "never")


MERGING = """
import sys
from pathlib import Path
from vlmops.train.merge import launch_merge
launch_merge(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_a_merge_killed_outright_leaves_its_folder_to_the_next_merge_there_and_a_live_ones_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A merge step killed outright (SIGKILL, the OOM killer) left its `.merge-` folder beside the merged model
    forever (a TemporaryDirectory's clean-up never ran). The next merge into that folder removes it, and says so, but
    not the folder of a merge going on now (held: here this process's own)."""
    out = tmp_path / "merged"
    with held_folder(".merge-", tmp_path) as live:
        merging = [sys.executable, "-c", MERGING, str(tmp_path / "nope"), str(out)]
        killed = subprocess.Popen(merging, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            deadline = time.monotonic() + 60
            while len(list(tmp_path.glob(".merge-*"))) < 2:  # its folder made: the merge child starts now
                assert killed.poll() is None and time.monotonic() < deadline, "the merge did not get under way"
                time.sleep(0.01)
            killed.send_signal(signal.SIGKILL)
        finally:
            killed.kill()
            killed.wait()
        (dead,) = set(tmp_path.glob(".merge-*")) - {live}
        with caplog.at_level("INFO", logger="vlmops.scratch"), pytest.raises(MergeFailed, match="not a vlmops run"):
            launch_merge(tmp_path / "nope", out)
        assert list(tmp_path.glob(".merge-*")) == [live]
    assert not list(tmp_path.glob(".merge-*"))
    said = [r.getMessage() for r in caplog.records if r.name == "vlmops.scratch"]
    assert said == [
        f"removed 1 scratch folder (0 bytes) that runs killed while writing left in {tmp_path}: {dead.name}"
    ]


def test_full_mode_merge_exports_final(tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path) -> None:
    full = {"train.mode": "full", "train.max_steps": 2, "train.gradient_checkpointing": False}
    run_dir = tmp_path / "full"
    train(load_config(None, full), tiny_model, snapshot.path, run_dir)
    result = merge_run(run_dir, tmp_path / "exported")
    assert not result.adapter and result.max_abs_diff == 0.0
    assert (result.path / "model.safetensors").is_file() and not (result.path / "training_args.bin").exists()


def test_export_command(lora_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--ckpt", str(lora_run)]) == 2
    assert "pass --merge-lora" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(lora_run), "--merge-lora"]) == 0
    printed = capsys.readouterr().out
    merged = lora_run.with_name(lora_run.name + "-merged")  # RUN_DIR-merged, as swift's ...-merged
    assert f"merged LoRA adapter into {merged}" in printed and "parity: max |logit difference|" in printed
    assert (merged / "model.safetensors").is_file()
    assert main(["export", "--ckpt", str(lora_run / "nope"), "--merge-lora"]) == 2


def test_export_command_takes_merge_settings_from_config(
    lora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text("merge:\n  parity_atol: 0.25\n")
    export = ["export", "--ckpt", str(lora_run), "--merge-lora", "--config", str(config_file)]
    assert main([*export, "--out", str(tmp_path / "a")]) == 0
    assert "(tolerance 0.25)" in capsys.readouterr().out
    # --set on top; a bfloat16 merge cannot meet 1e-9, so the check fails and nothing is published
    bf16 = ["--set", "model.dtype=bfloat16", "--set", "merge.parity_atol=1e-9"]
    assert main([*export, "--out", str(tmp_path / "b"), *bf16]) == 1
    assert "merge.parity_atol 1e-09" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_a_moved_run_tree_still_finds_its_base_model_and_dataset(
    tiny_model: Path, snapshot: PreparedDataset, tmp_path: Path
) -> None:
    """A run, its base model and its dataset snapshot moved together (a clone restored with `dvc pull`, another
    machine) open, merge and evaluate from the new place: run.json keeps its paths relative to the folder too."""
    old = tmp_path / "old"
    shutil.copytree(tiny_model, old / "models" / "tiny")
    shutil.copytree(snapshot.path, old / "datasets" / snapshot.path.name)
    train(load_config(None, LORA), old / "models" / "tiny", old / "datasets" / snapshot.path.name, old / "sft")
    merge_run(old / "sft", old / "merged", atol=1e-3)
    new = tmp_path / "new"
    old.rename(new)

    assert checkpoints(new / "sft"), "the run should have kept a checkpoint to open"
    for folder in (new / "sft", checkpoints(new / "sft")[-1], new / "merged"):
        info = open_run(folder).info
        assert Path(info.base_model) == (new / "models" / "tiny").resolve(), folder
        assert Path(info.dataset) == (new / "datasets" / snapshot.path.name).resolve(), folder
    assert open_run(new / "merged").info.merged_from == str((new / "sft" / "final").resolve())

    evaluation = evaluate_checkpoint(new / "merged", load_config(None, {"infer.max_new_tokens": 2}), tmp_path / "eval")
    eval_lines = (new / "datasets" / snapshot.path.name / "eval.jsonl").read_text().splitlines()
    assert evaluation.tuned.total == len(eval_lines) > 0
    assert evaluation.base is not None and evaluation.base.total == len(eval_lines)

    # Nothing at the recorded absolute paths and nothing relative to the folder: the error names the snapshot.
    shutil.rmtree(new / "datasets")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_checkpoint(new / "merged", load_config(None), tmp_path / "eval2")
