"""Tiny real models, images and a trained-run folder for the inference tests (built once per session)."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlmops.config import DataConfig, dump_config, load_config
from vlmops.data.demo import draw_shape, write_demo_dataset
from vlmops.data.prepare import prepare_dataset
from vlmops.models.template import token_counter
from vlmops.models.tiny import NUM_IMAGE_TOKENS, build_tiny_model
from vlmops.train.rundir import CONFIG_FILE, FINAL_DIR, RunInfo

WORD_TOKEN = re.compile(r" [A-Za-z]{2,}")


def make_readable(model_dir: Path) -> Path:
    """Keep only space-led word tokens (and no EOS) in the LM head, so greedy answers are printable words.

    The rows of every other token are zeroed (logit 0) and the kept rows scaled up, so the best kept token
    always wins; without EOS an answer runs to max_new_tokens, long enough to watch it stream.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    weights = load_file(model_dir / "model.safetensors")
    head = weights["lm_head.weight"]
    keep = [i for i in range(head.shape[0]) if WORD_TOKEN.fullmatch(tokenizer.decode([i]))]
    readable = head.new_zeros(head.shape)
    readable[keep] = head[keep] * 10
    weights["lm_head.weight"] = readable
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


@pytest.fixture(scope="session")
def readable_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_readable(build_tiny_model(tmp_path_factory.mktemp("models") / "readable", "deepseek_vl", seed=3))


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two PNGs: a red circle and a blue square."""
    folder = tmp_path_factory.mktemp("images")
    rng = random.Random(0)
    paths = {}
    for name, colour, shape in (("red", "red", "circle"), ("blue", "blue", "square")):
        paths[name] = folder / f"{name}.png"
        draw_shape(colour, shape, 64, rng).save(paths[name])
    return paths


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small demo dataset: mixed train records (multi-turn, two-image, text-only) and colour questions."""
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", num_train=11, num_eval=6, image_size=32)


def make_lora_run(run_dir: Path, base: Path, dataset_dir: Path, overrides: list[str] | None = None) -> Path:
    """A run folder as `vlmops sft` leaves it (rundir.py layout), holding a random, non-zero LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    run_dir.mkdir(parents=True)
    model = AutoModelForImageTextToText.from_pretrained(base)
    lora = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj)",
        init_lora_weights=False,  # random B: the adapter changes the answers, as a trained one would
    )
    get_peft_model(model, lora).save_pretrained(run_dir / FINAL_DIR)
    config = load_config(None, overrides or [])
    (run_dir / CONFIG_FILE).write_text(dump_config(config))
    RunInfo(base_model=str(base), dataset=str(dataset_dir), dataset_hash="test", mode="lora").write(run_dir)
    return run_dir


@pytest.fixture(scope="session")
def snapshot(tiny_model: Path, demo_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo data as a validated dataset snapshot (what a run's run.json points to)."""
    from transformers import AutoTokenizer

    train, evals = demo_data
    prepared = prepare_dataset(
        DataConfig.model_validate({}),
        train,
        evals,
        tmp_path_factory.mktemp("datasets"),
        token_counter(AutoTokenizer.from_pretrained(tiny_model), NUM_IMAGE_TOKENS),
        NUM_IMAGE_TOKENS,
    )
    return prepared.path


@pytest.fixture(scope="session")
def lora_run(tiny_model: Path, snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_run(
        tmp_path_factory.mktemp("runs") / "lora",
        tiny_model,
        snapshot,
        ["infer.max_new_tokens=8", "infer.batch_size=4"],
    )


@pytest.fixture(scope="session")
def full_run(tiny_model: Path, snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full fine-tuning run: final/ is a whole checkpoint (another seed stands in for trained weights)."""
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    build_tiny_model(run_dir / FINAL_DIR, "deepseek_vl", seed=7)
    config = load_config(None, ["train.mode=full", "infer.max_new_tokens=6"])
    (run_dir / CONFIG_FILE).write_text(dump_config(config))
    RunInfo(base_model=str(tiny_model), dataset=str(snapshot), dataset_hash="test", mode="full").write(run_dir)
    return run_dir
