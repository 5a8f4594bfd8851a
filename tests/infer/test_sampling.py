"""The fast engine's token choice (vlmops.infer.sampling): `generate`'s own logits processors for `infer.*`, and
seeded draws that sample softmax(scores) whatever the batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmops.config import InferConfig
from vlmops.infer.generation import generation_config
from vlmops.infer.sampling import TokenSelector, logits_processors, uniform
from vlmops.models.loading import load_model

SETTINGS = [
    InferConfig(temperature=0.7, top_p=0.9, repetition_penalty=1.2),
    InferConfig(temperature=1.0, top_k=5),
    InferConfig(temperature=0.5, top_k=40, top_p=0.8),
    InferConfig(repetition_penalty=1.3),  # greedy with a penalty
    InferConfig(),
]


def _described(processors: list[object]) -> list[tuple[str, dict[str, object]]]:
    keys = ("penalty", "temperature", "top_k", "top_p", "min_tokens_to_keep", "filter_value", "prompt_ignore_length")
    return [(type(p).__name__, {k: getattr(p, k) for k in keys if hasattr(p, k)}) for p in processors]


@pytest.mark.parametrize(
    "settings", SETTINGS, ids=lambda c: f"t{c.temperature}-k{c.top_k}-p{c.top_p}-r{c.repetition_penalty}"
)
def test_the_processors_are_the_ones_generate_applies(tiny_model: Path, settings: InferConfig) -> None:
    """The same processors, in the same order with the same parameters, as `generate` builds for the plain engine's
    generation config of these settings (also: top_k 0 is off there, not transformers' default of 50)."""
    loaded = load_model(tiny_model, dtype="float32", device="cpu")
    model = loaded.model
    config, _ = model._prepare_generation_config(generation_config(loaded, settings))
    theirs = model._get_logits_processor(
        config, input_ids_seq_length=8, encoder_input_ids=None, prefix_allowed_tokens_fn=None, logits_processor=None
    )
    assert _described(logits_processors(settings)) == _described(list(theirs))


def test_uniform_values_are_a_function_of_seed_and_draw_alone() -> None:
    seeds = torch.tensor([0, 1, 2**40 + 5, -3, 1])
    draws = torch.tensor([7, 7, 7, 7, 8])
    values = uniform(seeds, draws, 50_000)
    assert values.dtype == torch.float32 and bool(((values > 0) & (values < 1)).all())
    # Each row alone, in another batch layout: the same values.
    for row in range(len(seeds)):
        assert torch.equal(uniform(seeds[row : row + 1], draws[row : row + 1], 50_000)[0], values[row])
    # Another seed or another draw: other values; every row roughly uniform.
    for a, b in ((0, 1), (1, 4), (2, 3)):
        assert (values[a] == values[b]).float().mean() < 0.001
    assert torch.allclose(values.mean(dim=1), torch.full((5,), 0.5), atol=0.01)
    assert torch.allclose(values.std(dim=1), torch.full((5,), 12**-0.5), atol=0.01)


def test_draws_sample_the_softmax_of_the_processed_scores() -> None:
    """20,000 rows with the same logits and their own seeds: token frequencies within sampling error of
    softmax(logits / temperature) over the tokens top-p keeps; the filtered ones never drawn."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temperature, top_p, rows = 0.8, 0.9, 20_000
    selector = TokenSelector(InferConfig(temperature=temperature, top_p=top_p))
    tokens = selector(logits.repeat(rows, 1), None, torch.arange(rows) * 7919, torch.full((rows,), 3))
    counts = torch.bincount(tokens, minlength=len(logits)).double()
    probs = torch.softmax(logits.double() / temperature, dim=0)
    # top-p keeps the fewest most likely tokens whose probabilities reach 0.9: here the first three.
    kept = torch.cumsum(probs, 0) - probs < top_p
    assert kept.tolist() == [True, True, True, False, False, False]
    assert counts[~kept].sum() == 0
    expected = probs[kept] / probs[kept].sum() * rows
    chi_square = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert chi_square < 13.8  # 2 degrees of freedom: p = 0.001
    # Greedy settings take the argmax; the same seeds draw the same tokens again.
    assert TokenSelector(InferConfig())(logits[None], None, None, None).tolist() == [0]
    again = selector(logits.repeat(rows, 1), None, torch.arange(rows) * 7919, torch.full((rows,), 3))
    assert torch.equal(tokens, again)


def test_a_failed_compilation_picks_eagerly_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An inductor failure (as its split scan over a real vocabulary on an H200) costs speed, not the job."""

    def broken(fn: object, **_: object) -> object:
        def run(*args: object) -> object:
            raise RuntimeError("InductorError: TypeError: list indices must be integers or slices, not NoneType")

        return run

    settings = InferConfig(temperature=0.8, top_p=0.9, repetition_penalty=1.2)
    logits, history = torch.randn(6, 300), torch.randint(0, 300, (6, 20))
    seeds, draws = torch.arange(6), torch.full((6,), 4)
    want = TokenSelector(settings)(logits, history, seeds, draws)
    monkeypatch.setattr(torch, "compile", broken)
    selector = TokenSelector(settings, compile=True)
    with caplog.at_level("WARNING", logger="vlmops.infer.sampling"):
        assert torch.equal(selector(logits, history, seeds, draws), want)
        assert torch.equal(selector(logits, history, seeds, draws), want)
    assert [r.getMessage() for r in caplog.records].count(
        "sampling: torch.compile failed (InductorError: TypeError: list indices must be integers or slices, not "
        "NoneType); picking tokens eagerly"
    ) == 2  # one per compiled stage, each once
