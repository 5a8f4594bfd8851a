"""`resolve_batching`: the config's batching keys on CPU (where train.memory_gib is ignored), and the train split and
TrainingArguments they produce."""

from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmops.config import load_config
from vlmops.train.batching import COMPILED_LENGTHS, Batching, collator, length_buckets, resolve_batching
from vlmops.train.packing import REAL_TOKENS_KEY, GroupedDataset

LENGTHS = [100, 300, 250, 90, 700, 60]

needs_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")


@needs_cpu
def test_memory_gib_is_ignored_cleanly_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(None, {"train.memory_gib": 20, "train.batch_size": 3, "train.grad_accum": 2})
    with caplog.at_level(logging.INFO, logger="vlmops.train.batching"):
        batching = resolve_batching(config, Path("unused"), LENGTHS, torch.float32)
    assert batching == Batching(3, 2, recompute=True, packing=False, packing_tokens=None, group_by_length=False)
    assert "train.memory_gib is ignored: there is no CUDA GPU" in caplog.text


@needs_cpu
def test_packing_budget_defaults_to_batch_size_times_the_mean_length() -> None:
    config = load_config(None, {"train.packing": True, "train.batch_size": 4, "train.gradient_checkpointing": False})
    batching = resolve_batching(config, Path("unused"), LENGTHS, torch.float32)
    assert batching.packing and not batching.recompute and batching.per_device_batch == 1
    assert batching.packing_tokens == 4 * 250  # mean 250
    single = load_config(None, {"train.packing": True, "train.batch_size": 1})
    assert resolve_batching(single, Path("unused"), LENGTHS, torch.float32).packing_tokens == 700  # the longest
    given = load_config(None, {"train.packing": True, "train.packing_tokens": 2000, "train.group_by_length": True})
    fixed = resolve_batching(given, Path("unused"), LENGTHS, torch.float32)
    assert fixed.packing_tokens == 2000 and not fixed.group_by_length  # packing wins over length grouping
    assert not resolve_batching(load_config(None), Path("unused"), LENGTHS, torch.float32).packing  # auto: off on CPU


def test_the_eval_loss_runs_micro_batches_that_fit(tmp_path: Path) -> None:
    """The eval loss ran `train.batch_size` samples a forward pass as written, not the micro-batch the memory policy
    split it into on a GPU: a run of train.batch_size 16 trained in micro-batches of 2, then ran out of memory at its
    first evaluation (and a train.batch_size of 1 that the policy ran 8 at a time evaluated one sample a pass)."""
    from vlmops.train.sft import training_arguments

    split = Batching(2, 8, recompute=True, packing=False, packing_tokens=None, group_by_length=False)  # the policy's
    config = load_config(None, {"train.batch_size": 16})
    assert training_arguments(config, tmp_path, "fp32", split).per_device_eval_batch_size == 2
    given = load_config(None, {"train.batch_size": 16, "train.eval_batch_size": 32})
    assert training_arguments(given, tmp_path, "fp32", split).per_device_eval_batch_size == 32


def test_group_by_length_serves_padded_batches_of_similar_lengths(
    tiny_model: Path, snapshot: Any, tmp_path: Path
) -> None:
    from vlmops.train.sft import setup_training

    overrides = {"train.group_by_length": True, "train.batch_size": 4, "train.packing": False}
    setup = setup_training(load_config(None, overrides), tiny_model, snapshot.path, tmp_path)
    args, dataset = setup.trainer.args, setup.trainer.train_dataset
    assert isinstance(dataset, GroupedDataset) and args.per_device_train_batch_size == 1
    assert args.include_num_input_tokens_seen == "non_padding"
    batch = next(iter(setup.trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and "attention_mask" in batch


def test_packed_runs_count_every_token_as_real(tiny_model: Path, snapshot: Any, tmp_path: Path) -> None:
    from vlmops.train.sft import setup_training

    setup = setup_training(load_config(None, {"train.packing": True}), tiny_model, snapshot.path, tmp_path)
    batch = next(iter(setup.trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch and "attention_mask" not in batch
    assert batch[REAL_TOKENS_KEY] == batch["input_ids"].numel()  # a packed row without filler: no padding
    assert setup.trainer.model.config.text_config.use_cache is False


def _padding(lengths: list[int], edges: tuple[int, ...], multiple: int) -> int:
    return sum(min(e for e in edges if e >= -(-n // multiple) * multiple) - n for n in lengths)


def test_length_buckets_are_the_fewest_padding_split_of_at_most_count_lengths() -> None:
    rng = random.Random(0)
    for _ in range(150):
        multiple = rng.choice([1, 8, 64])
        lengths = [rng.randrange(1, 600) for _ in range(rng.randrange(1, 30))]
        count = rng.randrange(1, 6)
        edges = length_buckets(lengths, count, multiple)
        rounded = sorted({-(-n // multiple) * multiple for n in lengths})
        assert len(edges) <= count and edges == tuple(sorted(edges)) and edges[-1] == rounded[-1]
        assert all(e % multiple == 0 for e in edges)
        best = min(  # every choice of up to count - 1 lengths below the longest
            _padding(lengths, (*choice, rounded[-1]), multiple)
            for k in range(min(count, len(rounded)))
            for choice in itertools.combinations(rounded[:-1], k)
        )
        assert _padding(lengths, edges, multiple) == best
    with pytest.raises(ValueError):
        length_buckets([10], 0, 64)


def test_length_buckets_take_the_fewest_lengths_within_the_tolerance() -> None:
    rng = random.Random(2)
    for _ in range(100):
        lengths = [rng.randrange(1, 2000) for _ in range(rng.randrange(1, 60))]
        tolerance = rng.choice([0.002, 0.01, 0.05])
        edges = length_buckets(lengths, 16, 64, tolerance)
        computed = sum(-(-n // 64) * 64 for n in lengths)
        best = _padding(lengths, length_buckets(lengths, 16, 64), 64)
        assert _padding(lengths, edges, 64) <= best + tolerance * computed
        if len(edges) > 1:  # one length fewer, chosen at best, would waste more than allowed
            fewer = length_buckets(lengths, len(edges) - 1, 64)
            assert _padding(lengths, fewer, 64) > best + tolerance * computed


def test_length_buckets_take_a_length_only_where_it_saves_its_cost() -> None:
    rng = random.Random(4)
    for _ in range(60):
        lengths = [rng.randrange(1, 3000) for _ in range(rng.randrange(1, 80))]
        cost = rng.choice([0, 500, 5_000, 50_000])
        edges = length_buckets(lengths, 16, 64, length_cost=cost)
        # the least padding in at most k lengths, priced
        priced = [_priced(lengths, length_buckets(lengths, k, 64), cost) for k in range(1, 17)]
        assert _priced(lengths, edges, cost) == min(priced)
    assert length_buckets([100, 1000] * 50, 16, 64, length_cost=10**9) == (1024,)  # never worth a second


def _priced(lengths: list[int], edges: tuple[int, ...], cost: int) -> int:
    return _padding(lengths, edges, 64) + (len(edges) - 1) * cost


def test_compiled_lengths_follow_the_batches_longest_samples() -> None:
    """Near-uniform data (one image + a few hundred text tokens): a padded batch is as long as its longest sample, so
    in batches of 8 the shorter length would rarely be used and is not worth a compile; sample by sample it is."""
    rng = random.Random(3)
    lengths = [
        rng.choice(range(1100, 1152)) if rng.random() < 0.66 else rng.choice(range(1153, 1170)) for _ in range(400)
    ]
    shuffled = collator(Batching(8, 1, False, False, None, False), 0, 64, lengths, seed=0)
    assert shuffled.pad_to_lengths == (1216,)
    grouped = collator(Batching(8, 1, False, False, None, True), 0, 64, lengths, seed=0, passes=20)
    assert grouped.pad_to_lengths == (1152, 1216)  # grouped by length, the short samples pad together
    # ... once over the 400 samples, the ~17k tokens that saves are not worth a compile
    assert collator(Batching(8, 1, False, False, None, True), 0, 64, lengths, seed=0).pad_to_lengths == (1216,)


def test_compiled_runs_pad_batches_to_a_few_lengths() -> None:
    batching = Batching(4, 1, False, False, None, True)
    rng = random.Random(1)
    lengths = [rng.randrange(64, 2700) for _ in range(5000)]
    plain = collator(batching, 0)  # CPU: no compile, each batch as long as its longest sample
    assert plain.pad_to_lengths == () and plain.pad_to_multiple_of == 1
    compiled = collator(batching, 0, 64, lengths, passes=10)
    assert (
        len(compiled.pad_to_lengths) <= COMPILED_LENGTHS and max(compiled.pad_to_lengths) == -(-max(lengths) // 64) * 64
    )
    waste = _padding(lengths, compiled.pad_to_lengths, 64) / sum(lengths)
    assert waste < 0.08  # the price of 16 shapes instead of ~41 (multiples of 64)
    once = collator(batching, 0, 64, lengths, passes=1).pad_to_lengths  # one pass: fewer compiles pay
    assert len(once) < len(compiled.pad_to_lengths) and max(once) == max(compiled.pad_to_lengths)
    sample = {"input_ids": torch.ones(700, dtype=torch.long), "labels": torch.ones(700, dtype=torch.long)}
    batch = compiled([[sample, sample]])
    assert batch["input_ids"].shape[1] == min(e for e in compiled.pad_to_lengths if e >= 700)
    longer = {"input_ids": torch.ones(3000, dtype=torch.long), "labels": torch.ones(3000, dtype=torch.long)}
    assert compiled([longer])["input_ids"].shape[1] == 3008  # past the buckets (an eval sample): the multiple
    packed = collator(Batching(4, 1, False, True, 1000, False), 0, 64, lengths)
    assert packed.packed_length == 1024 and packed.pad_to_lengths == ()


def test_a_run_passes_over_its_data_as_its_epochs_or_max_steps_say() -> None:
    from vlmops.train.batching import train_passes

    batching = Batching(4, 2, False, False, None, False)
    assert train_passes(load_config(None, {"train.epochs": 3}).train, batching, 100) == 3
    # max_steps wins over epochs: 50 steps of 4 x 2 samples over 100 samples
    assert train_passes(load_config(None, {"train.epochs": 3, "train.max_steps": 50}).train, batching, 100) == 4
