"""Packing (`vlmops.train.packing`): packed rows learn exactly what padded batches learn.

The comparison is on the *sum* of per-token losses (and its gradients): a packed row and a padded batch
holding the same samples have the same trained tokens, so the sums agree to float32 noise. The Trainer
normalises every optimizer step by the number of trained tokens in it (`num_items_in_batch`), which is the same
for both layouts, so the mean it trains on agrees as well; a mean over the batch would not, as it depends on how
the samples are split into rows.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from vlmops.conversation import Conversation
from vlmops.data.parsing import parse_record
from vlmops.models.template import IGNORE_INDEX
from vlmops.train.data import SFTDataset, VisionLanguageCollator
from vlmops.train.packing import (
    REAL_TOKENS_KEY,
    TRAINED_INDEX_KEY,
    TRAINED_TARGETS_KEY,
    GroupCollator,
    GroupedDataset,
    check_packing_support,
    length_groups,
    pack_groups,
    pack_samples,
    padding_fraction,
    padding_share,
    resolve_packing,
    training_attention,
    with_step_keys,
)

WORDS = [
    "what",
    "colour",
    "is",
    "the",
    "shape",
    "red",
    "green",
    "blue",
    "circle",
    "square",
    "left",
    "right",
    "one",
    "two",
]
IMAGES_PER_SAMPLE = [0, 1, 2, 1, 0, 2, 2, 0]  # 0, 1 and 2 images, mixed


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("pack-images")
    rng = random.Random(0)
    paths = []
    for i in range(4):
        path = folder / f"{i}.png"
        Image.frombytes("RGB", (40, 40), bytes(rng.randrange(256) for _ in range(40 * 40 * 3))).save(path)
        paths.append(str(path))
    return paths


def conversations(images: list[str], counts: list[int], seed: int = 0) -> list[Conversation]:
    """Records of different lengths with `counts[i]` images each; some have a second turn."""
    rng = random.Random(seed)
    out = []
    for i, n in enumerate(counts):
        tags = "".join(f"<img>{images[(i + k) % len(images)]}</img>" for k in range(n))
        words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
        turns = [tags + words(rng.randrange(3, 30)), words(rng.randrange(1, 12))]
        if i % 3 == 2:
            turns += [words(rng.randrange(2, 10)), words(rng.randrange(1, 8))]
        roles = ["user", "assistant"] * 2
        record = {"conversations": [{"from": r, "value": v} for r, v in zip(roles, turns, strict=False)]}
        out.append(parse_record(record, f"t.jsonl:{i + 1}", Path("/")))
    return out


def load(path: Path, attn: str = "sdpa", device: str = "cpu") -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText

    from vlmops.models.loading import attn_implementation, is_hybrid, load_processor

    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation(attn, is_hybrid(path))
    ).to(device)
    model.config.text_config.use_cache = False
    return model, load_processor(path)


def token_losses(model: Any, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per-token cross-entropy of every trained token, one tensor per sample, in sample order."""
    logits = model(**batch).logits.float()
    labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    per_sample = []
    if "position_ids" in batch:  # one packed row: cut it where the positions restart
        starts = [*(batch["position_ids"][0] == 0).nonzero().squeeze(-1).tolist(), labels.shape[1]]
        rows = [(0, a, b) for a, b in itertools.pairwise(starts)]
    else:
        rows = [(r, 0, labels.shape[1]) for r in range(labels.shape[0])]
    for r, a, b in rows:
        keep = labels[r, a:b] != IGNORE_INDEX
        per_sample.append(losses[r, a:b][keep])
    return per_sample


def assert_packed_learns_as_padded(
    path: Path, images: list[str], attn: str = "sdpa", device: str = "cpu", filler: int = 0
) -> None:
    """Per-token losses and gradients of the sum of the losses: padded batch (SDPA) vs one packed row (`attn`),
    filled with `filler` padding tokens of its own at the end when that is not 0."""
    reference, processor = load(path, "sdpa", device)
    model, _ = load(path, attn, device)
    check_packing_support(model)
    data = SFTDataset(conversations(images, IMAGES_PER_SAMPLE), processor, 512, "error")
    samples = [data[i] for i in range(len(data))]
    assert sorted({int(s.get("pixel_values", torch.empty(0)).shape[0]) for s in samples}) == [0, 1, 2]
    padded = VisionLanguageCollator(pad_token_id=processor.tokenizer.pad_token_id)(samples)
    pad = processor.tokenizer.pad_token_id
    packed = pack_samples(samples, sum(data.lengths) + filler if filler else None, pad)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, sum(data.lengths) + filler)
    counted = with_step_keys(dict(packed), sum(data.lengths))
    assert (padding_fraction([counted]) > 0) == bool(filler) and padding_fraction([padded]) > 0

    results = []
    for net, batch in ((reference, padded), (model, packed)):
        net.train()
        per_sample = token_losses(net, {k: v.to(device) for k, v in batch.items()})
        total = torch.cat(per_sample).sum()
        total.backward()
        grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        results.append((per_sample, total.detach(), grads))
    (ref_tokens, ref_total, ref_grads), (tokens, total, grads) = results
    if filler:
        assert len(tokens[-1]) == 0  # the filler: a sequence of its own with nothing trained
        tokens = tokens[:-1]

    assert [len(t) for t in tokens] == [len(t) for t in ref_tokens]  # the same trained tokens, sample by sample
    for ours, ref in zip(tokens, ref_tokens, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=1e-4)
    assert grads.keys() == ref_grads.keys()
    assert any(n.startswith("model.vision_model") for n in grads)  # the images took part in both
    # Gradients that are zero in exact arithmetic (the key biases: softmax ignores a shift) are float32 noise, so
    # the tolerance is relative to the largest gradient of the model.
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("arch", ["deepseek_vl", "deepseek_vl_hybrid"])
def test_packed_and_padded_give_the_same_token_losses_and_gradients(
    arch: str, tiny_models: dict[str, Path], images: list[str]
) -> None:
    assert_packed_learns_as_padded(tiny_models[arch], images)


def test_a_filled_packed_row_gives_the_same_token_losses_and_gradients(
    tiny_models: dict[str, Path], images: list[str]
) -> None:
    assert_packed_learns_as_padded(tiny_models["deepseek_vl"], images, filler=37)


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
@pytest.mark.parametrize("arch", ["deepseek_vl", "deepseek_vl_hybrid"])
def test_packed_rows_learn_as_padded_batches_on_the_gpu(
    arch: str, attn: str, tiny_models: dict[str, Path], images: list[str]
) -> None:
    """The GPU kernels: SDPA with the block-diagonal mask, FlexAttention with its block mask (forward and backward)."""
    assert_packed_learns_as_padded(tiny_models[arch], images, attn, "cuda")


def test_samples_in_a_row_never_see_each_other(tiny_model: Path, images: list[str]) -> None:
    """A sample's logits in a packed row equal its logits alone; the next sample's first label is never trained."""
    model, processor = load(tiny_model)
    model.eval()
    data = SFTDataset(conversations(images, [1, 2, 0]), processor, 512, "error")
    samples = [data[i] for i in range(len(data))]
    packed = pack_samples(samples)
    with torch.no_grad():
        row = model(**packed).logits[0]
        start = 0
        for s in samples:
            alone = model(**pack_samples([s])).logits[0]
            torch.testing.assert_close(row[start : start + len(s["input_ids"])], alone, rtol=1e-4, atol=1e-4)
            assert packed["labels"][0, start] == IGNORE_INDEX
            start += len(s["input_ids"])


def test_a_kv_cache_would_mix_packed_samples(tiny_model: Path) -> None:
    """Why `check_packing_support` insists on use_cache off: with the model's default, samples attend to each other."""
    model, _ = load(tiny_model)
    model.config.text_config.use_cache = True
    with pytest.raises(ValueError, match="use_cache"):
        check_packing_support(model)
    a, b = torch.randint(5, 600, (1, 10)), torch.randint(5, 600, (1, 7))
    row = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(10), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        alone = model(input_ids=b).logits[0]
        mixed = model(input_ids=row, position_ids=positions).logits[0, 10:]
        model.config.text_config.use_cache = False
        apart = model(input_ids=row, position_ids=positions).logits[0, 10:]
    torch.testing.assert_close(apart, alone, rtol=1e-4, atol=1e-4)
    assert (mixed - alone).abs().max() > 1e-2


def test_flex_attention_keeps_packed_samples_apart(tiny_model: Path, images: list[str]) -> None:
    """FlexAttention (the GPU's padding-free kernel without flash-attn) on the language model: the same per-token
    losses as padded SDPA, for packed rows and for padded batches (the evaluation batches of a run that
    `train.packing: auto` packed with FlexAttention). Forward only: torch has no FlexAttention backward on CPU."""
    model, processor = load(tiny_model)
    flex, _ = load(tiny_model, "flex_attention")
    check_packing_support(flex)
    data = SFTDataset(conversations(images, [2, 0, 1]), processor, 512, "error")
    samples = [data[i] for i in range(len(data))]
    padded = VisionLanguageCollator(pad_token_id=processor.tokenizer.pad_token_id)(samples)
    assert not padded["attention_mask"].all()  # samples of different lengths: real padding
    with torch.no_grad():
        ref = token_losses(model, padded)
        ours = token_losses(flex, pack_samples(samples))
        flex_padded = token_losses(flex, padded)
    for a, b, c in zip(ours, ref, flex_padded, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5)


def test_pack_groups_fill_the_budget_and_keep_every_sample() -> None:
    rng = random.Random(1)
    lengths = [rng.randrange(64, 2700) for _ in range(500)]
    groups = pack_groups(lengths, 8192, seed=0)
    assert sorted(i for g in groups for i in g) == list(range(500))
    assert all(sum(lengths[i] for i in g) <= 8192 for g in groups)
    lower_bound = -(-sum(lengths) // 8192)
    assert len(groups) <= lower_bound + 1  # best-fit decreasing: at most one group more than the ideal
    assert pack_groups(lengths, 8192, seed=0) == groups  # seeded
    with pytest.raises(ValueError, match="train.packing_tokens"):
        pack_groups([10, 300], 200)


def test_length_groups_batch_similar_lengths() -> None:
    rng = random.Random(2)
    lengths = [rng.randrange(64, 2700) for _ in range(1000)]
    groups = length_groups(lengths, 4, seed=0)
    assert sorted(i for g in groups for i in g) == list(range(1000))
    assert all(len(g) == 4 for g in groups)

    def padding(gs: list[list[int]]) -> float:
        return sum(len(g) * max(lengths[i] for i in g) - sum(lengths[i] for i in g) for g in gs)

    shuffled = list(range(1000))
    random.Random(0).shuffle(shuffled)
    plain = [shuffled[j : j + 4] for j in range(0, 1000, 4)]
    assert padding(groups) < 0.1 * padding(plain)


def test_group_collator_packs_groups_and_pads_plain_samples(tiny_processor: Any, images: list[str]) -> None:
    data = SFTDataset(conversations(images, [1, 0, 2, 0]), tiny_processor, 512, "error")
    grouped = GroupedDataset(data, [[0, 1], [2, 3]])
    assert len(grouped) == 2 and grouped.mean_group_size == 2.0 and grouped.lengths[0] == sum(data.lengths[:2])
    pad = tiny_processor.tokenizer.pad_token_id
    packed = GroupCollator(pad, pack=True)([grouped[0]])
    assert packed["input_ids"].shape == (1, grouped.lengths[0]) and packed["pixel_values"].shape[0] == 1
    filled = GroupCollator(pad, pack=True, packed_length=grouped.lengths[0] + 50)([grouped[0]])
    assert filled["input_ids"].shape == (1, grouped.lengths[0] + 50) and filled[REAL_TOKENS_KEY] == grouped.lengths[0]
    assert filled["input_ids"][0, -50:].eq(pad).all() and filled["labels"][0, -50:].eq(IGNORE_INDEX).all()
    assert filled["position_ids"][0, -50:].tolist() == list(range(50))  # a sequence of its own
    assert padding_fraction([filled]) == pytest.approx(50 / (grouped.lengths[0] + 50))
    with pytest.raises(ValueError, match="more than the row"):
        GroupCollator(pad, pack=True, packed_length=grouped.lengths[0] - 1)([grouped[0]])
    by_length = GroupCollator(pad, pack=False)([grouped[1]])
    assert by_length["input_ids"].shape[0] == 2 and by_length["pixel_values"].shape[0] == 2
    plain = GroupCollator(pad, pack=True)([data[0], data[1]])  # the eval split: padded as before
    assert "attention_mask" in plain and plain["input_ids"].shape[0] == 2
    # The step keys, counted on the CPU: real tokens, and the flat positions that learn a next token with it.
    assert plain[REAL_TOKENS_KEY] == data.lengths[0] + data.lengths[1] == int(plain["attention_mask"].sum())
    for batch in (plain, filled, by_length):
        labels = batch["labels"]
        width = labels.shape[1]
        expected = [
            (row * width + col, int(labels[row, col + 1]))
            for row in range(labels.shape[0])
            for col in range(width - 1)
            if labels[row, col + 1] != IGNORE_INDEX
        ]
        got = list(zip(batch[TRAINED_INDEX_KEY].tolist(), batch[TRAINED_TARGETS_KEY].tolist(), strict=True))
        assert got == expected and expected


def test_resolve_packing() -> None:
    assert resolve_packing(True) is True and resolve_packing(False) is False
    assert resolve_packing("auto") is False  # SDPA's dense packed mask costs more than padding
    assert resolve_packing("auto", "flex_attention") is torch.cuda.is_available()
    # With the default SDPA, auto packs on a GPU where padded batches would be mostly padding (FlexAttention then).
    assert resolve_packing("auto", "sdpa", padding=0.4, cuda=True) is True
    assert resolve_packing("auto", "sdpa", padding=0.01, cuda=True) is False
    assert resolve_packing("auto", "sdpa", padding=0.4, cuda=False) is False  # CPU: never by itself
    assert resolve_packing("auto", "eager", padding=0.4, cuda=True) is False
    assert training_attention("sdpa", "auto", packing=True) == "flex_attention"
    assert training_attention("sdpa", True, packing=True) == "sdpa"  # asked for by name: as configured
    assert training_attention("sdpa", "auto", packing=False) == "sdpa"
    with pytest.raises(ValueError, match="train.packing"):
        resolve_packing("yes")


# 20 optimizer steps through the product path (`setup_training` + the Trainer: trained-position logits,
# num_items_in_batch normalisation, clipping, AdamW, the dummy image on text-only steps). The loss curves of
# packed rows and of padded batches of the same samples agree within LOSS_CURVE_RTOL: float32 noise, amplified
# a little over the steps by the optimizer.
LOSS_CURVE_STEPS = 20
LOSS_CURVE_RTOL = 1e-4


def trained_losses(tiny_model: Path, snapshot: Any, run_dir: Path, layout: str) -> tuple[list[float], int]:
    """The loss curve and the tokens the Trainer counted as seen; `layout`: packed, filled (packed rows filled to
    one length, as with compiled layers) or padded (the same groups as padded batches)."""
    from vlmops.config import load_config
    from vlmops.train.sft import setup_training

    overrides = {
        "train.packing": True,
        "train.packing_tokens": 300,  # ~4 demo samples per micro-batch
        "train.grad_accum": 2,
        "train.max_steps": LOSS_CURVE_STEPS,
        "train.lora.targets": "all-linear",
        "train.lora.dropout": 0.0,  # dropout masks depend on the tensor layout
        "train.freeze.aligner": False,
        "train.lr": 5e-3,
        "train.gradient_checkpointing": False,
        "train.eval_steps": 1000,
        "train.save_steps": 1000,
    }
    setup = setup_training(load_config(None, overrides), tiny_model, snapshot.path, run_dir)
    assert setup.batching.packing and setup.trainer.args.per_device_train_batch_size == 1
    pad = setup.trainer.data_collator.pad_token_id
    if layout == "padded":  # the same groups, each as a padded batch
        setup.trainer.data_collator = GroupCollator(pad, pack=False)
    elif layout == "filled":
        setup.trainer.data_collator = GroupCollator(pad, pack=True, packed_length=320)
    setup.trainer.train()
    losses = [entry["loss"] for entry in setup.trainer.state.log_history if "loss" in entry]
    return losses, setup.trainer.state.num_input_tokens_seen


def test_packed_training_follows_the_padded_loss_curve(tiny_model: Path, snapshot: Any, tmp_path: Path) -> None:
    packed, packed_seen = trained_losses(tiny_model, snapshot, tmp_path / "packed", "packed")
    padded, _ = trained_losses(tiny_model, snapshot, tmp_path / "padded", "padded")
    filled, filled_seen = trained_losses(tiny_model, snapshot, tmp_path / "filled", "filled")
    assert len(packed) == len(padded) == len(filled) == LOSS_CURVE_STEPS
    assert packed[-1] < 0.8 * packed[0]  # it learns
    assert packed == pytest.approx(padded, rel=LOSS_CURVE_RTOL)
    # Rows filled to one length learn the same, and the filler is not counted as tokens seen.
    assert filled == pytest.approx(packed, rel=LOSS_CURVE_RTOL)
    assert filled_seen == packed_seen > 0


@pytest.mark.gpu
def test_a_gpu_run_packs_and_sizes_its_batches_by_default(tiny_model: Path, snapshot: Any, tmp_path: Path) -> None:
    """On a GPU with FlexAttention the defaults pack (train.packing auto) and the memory policy splits the step
    (train.memory_gib): the tiny model fits the whole step in one micro-batch without recompute."""
    from vlmops.config import load_config
    from vlmops.train.sft import setup_training

    overrides = {"train.batch_size": 4, "train.grad_accum": 2, "train.max_steps": 6, "train.lr": 5e-3}
    config = load_config(None, {**overrides, "model.attn": "flex_attention"})
    setup = setup_training(config, tiny_model, snapshot.path, tmp_path / "run")
    batching = setup.batching
    assert batching.packing and not batching.recompute and batching.grad_accum == 1
    assert batching.packing_tokens is not None and batching.packing_tokens >= max(setup.datasets["train"].lengths)
    setup.trainer.train()
    losses = [entry["loss"] for entry in setup.trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_padding_share_of_shuffled_batches() -> None:
    assert padding_share([100] * 64, 8) == 0.0
    assert padding_share([], 8) == 0.0
    assert padding_share([100, 300], 2) == pytest.approx(1 - 400 / 600)
    # realistic spreads (64 to ~2,700 tokens) in batches of 8 are mostly padding; batches of 1 never are
    spread = [64 + (i * 997) % 2600 for i in range(400)]
    assert padding_share(spread, 8, seed=0) > 0.3 and padding_share(spread, 1) == 0.0
