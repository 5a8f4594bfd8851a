"""What a prompt-lookup (n-gram) draft would guess of the benchmark's answers: the greedy answers of the random-initialised
released architectures (the rows of `bench/infer_bench.py`: one image and ~32 text tokens a prompt, 128 new tokens
forced), replayed as speculative decoding would see them.

    python bench/draft_probe.py --out bench/results/draft-DATE.json

For each answer, a draft of K tokens is taken where the answer's last n tokens (n = 3, 2, 1, the longest found) first
occurred earlier in its prompt and answer, and a verify step keeps the draft's tokens up to its first wrong one plus
the model's own next token. The table says how many tokens a step would keep on average, and how repetitive the
answers are (distinct tokens, the longest run of one token): a high rate on answers that repeat themselves says what
the random weights make of the benchmark, not what a draft gains on a trained model's answers.
"""

from __future__ import annotations

import argparse
import sys
from itertools import pairwise
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.infer_bench import build_random, make_requests, plain_generate, random_images  # noqa: E402
from bench.results_file import gpu_machine, write_results  # noqa: E402

NEW_TOKENS = 128


def draft(context: list[int], k: int) -> list[int]:
    """Prompt lookup as transformers' `prompt_lookup_num_tokens` does it: up to k tokens after the first earlier
    occurrence of the context's last n tokens (longest n first)."""
    for n in (3, 2, 1):
        tail = context[-n:]
        for start in range(len(context) - n):
            if context[start : start + n] == tail:
                return context[start + n : start + n + k]
    return []


def tokens_a_step(prompt: list[int], answer: list[int], k: int) -> float:
    """The answer's tokens over the verify steps a K-token draft would take to produce it."""
    done = steps = 0
    while done < len(answer):
        guessed = draft(prompt + answer[:done], k)
        kept = 0
        while kept < len(guessed) and done + kept < len(answer) and guessed[kept] == answer[done + kept]:
            kept += 1
        done += kept + 1  # the draft's right tokens, then the model's own
        steps += 1
    return len(answer) / steps


def longest_run(tokens: list[int]) -> int:
    best = run = 1
    for before, token in pairwise(tokens):
        run = run + 1 if token == before else 1
        best = max(best, run)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="1.3b,7b")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--drafts", default="2,4,8", help="draft lengths K, comma-separated")
    parser.add_argument("--work", default="/tmp/draft-probe", help="scratch folder (the processors)")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    rows = []
    for arch in args.models.split(","):
        loaded = build_random(arch, "released", Path(args.work), "cuda")
        reqs = make_requests(loaded, args.prompts, random_images(16, seed=1), seed=0)
        answers, _seconds = plain_generate(loaded, reqs, NEW_TOKENS, "cuda")
        for k in (int(n) for n in args.drafts.split(",")):
            per_row = [tokens_a_step(list(r.prompt_ids), answers[r.key], k) for r in reqs]
            rows.append({
                "model": arch, "prompts": len(reqs), "draft_tokens": k, "tokens_a_step": round(mean(per_row), 3),
                "tokens_a_step_min": round(min(per_row), 3), "tokens_a_step_max": round(max(per_row), 3),
                "distinct_tokens_an_answer": round(mean(len(set(answers[r.key])) for r in reqs), 1),
                "longest_run_of_one_token": round(mean(longest_run(answers[r.key]) for r in reqs), 1),
                "first_answer": answers[reqs[0].key][:24],
            })  # fmt: skip
        del loaded
        torch.cuda.empty_cache()
    print(
        "| model | draft tokens | tokens kept a step (min-max) | distinct tokens an answer | longest run of one token |"
        "\n| --- | ---: | ---: | ---: | ---: |"
    )
    for r in rows:
        print(
            f"| {r['model']} | {r['draft_tokens']} | {r['tokens_a_step']} ({r['tokens_a_step_min']}-"
            f"{r['tokens_a_step_max']}) | {r['distinct_tokens_an_answer']} of {NEW_TOKENS} | "
            f"{r['longest_run_of_one_token']} |"
        )
    for arch in dict.fromkeys(r["model"] for r in rows):
        print(f"{arch}: first answer's first tokens {next(r['first_answer'] for r in rows if r['model'] == arch)}")
    if args.out:
        write_results(args.out, gpu_machine(), rows, baseline="one token a step (plain decoding)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
