"""`data.max_length`: the one policy validation and training both apply, and the token lengths validation
measured, saved in the snapshot so training does not tokenise every record again.

A length counts every token of a record, image tokens included. The policy: `error` (the record is a
problem), `drop` (left out, reported), `truncate-text` (the text of its last turns is cut, never an image;
a record whose prompt and images alone are too long is a problem).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmops.models import template
from vlmops.models.template import IGNORE_INDEX, IMAGE_TOKEN, Encoded

LENGTHS_FILE = "lengths.json"
"""In a dataset snapshot: the token length of each record of train.jsonl and eval.jsonl, in file order, and
the fingerprint of what measured them (tokenizer, image tokens, system prompt, chat template)."""


@dataclass(frozen=True)
class LengthCheck:
    """What `data.max_length_policy` does with one record."""

    length: int
    """Tokens of the whole record."""
    cut: int | None = None
    """truncate-text: keep the first `cut` tokens (None: the record fits, or is dropped)."""
    dropped: bool = False
    problem: str | None = None
    """Why the record cannot be used (policy error, or a cut that would leave no answer token)."""


@dataclass(frozen=True)
class MaxLength:
    """`data.max_length` and its policy, for one tokenizer."""

    max_length: int
    policy: str
    num_image_tokens: int
    image_token_id: int

    @classmethod
    def for_tokenizer(cls, max_length: int, policy: str, tokenizer: Any, num_image_tokens: int) -> MaxLength:
        return cls(max_length, policy, num_image_tokens, int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)))

    def check(self, length: int, encoded: Encoded | Callable[[], Encoded]) -> LengthCheck:
        """Apply the policy to a record of `length` tokens. `encoded`: its tokens, or a function that gives them
        (called only when a too-long record is to be cut)."""
        if length <= self.max_length:
            return LengthCheck(length)
        if self.policy == "error":
            return LengthCheck(length, problem=f"{length} tokens > data.max_length {self.max_length}")
        if self.policy == "drop":
            return LengthCheck(length, dropped=True)
        enc = encoded if isinstance(encoded, Encoded) else encoded()
        cut = truncate_text(enc, self.max_length, self.num_image_tokens, self.image_token_id)
        if cut is None:
            return LengthCheck(
                length,
                problem=f"{length} tokens; cutting it to data.max_length {self.max_length} leaves no answer token "
                "(the prompt and its images alone are too long)",
            )
        return LengthCheck(length, cut=cut)

    def hint(self) -> str:
        """What to change when records are too long."""
        return "raise data.max_length, or set data.max_length_policy to drop (leave them out)" + (
            " or truncate-text" if self.policy == "error" else ""
        )


def truncate_text(enc: Encoded, max_length: int, num_image_tokens: int, image_token_id: int) -> int | None:
    """Where to cut an encoded sample so it fits `max_length`: the new length, or None if it cannot be cut.

    The cut never splits an image (it moves back to before one), and the sample then ends at its last
    trained token, so it stops inside or at the end of an answer, never on a dangling prompt: the text of
    the last turns goes, labels stay only on the answer tokens kept. None when no answer token would be left.
    """
    cut = min(len(enc), max_length)
    partial_image = sum(1 for t in enc.input_ids[:cut] if t == image_token_id) % num_image_tokens
    cut -= partial_image
    trained = [i for i in range(cut) if enc.labels[i] != IGNORE_INDEX]
    return trained[-1] + 1 if trained else None


def cut_sample(enc: Encoded, length: int, num_image_tokens: int, image_token_id: int) -> Encoded:
    """The first `length` tokens of a sample, with the images whose tokens they hold."""
    ids = enc.input_ids[:length]
    images_kept = sum(1 for t in ids if t == image_token_id) // num_image_tokens
    return Encoded(ids, enc.labels[:length], enc.images[:images_kept])


def length_fingerprint(tokenizer: Any, num_image_tokens: int, system_prompt: str | None) -> str:
    """What a record's token length depends on: the vocabulary, the image tokens, the system prompt and the chat
    template's code. Saved lengths are reused only under the same fingerprint."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([num_image_tokens, system_prompt, tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    h.update(Path(template.__file__).read_bytes())
    return h.hexdigest()


def write_lengths(folder: Path, fingerprint: str, lengths: dict[str, list[int]]) -> None:
    """lengths.json in a snapshot folder: {"fingerprint": ..., "train": [...], "eval": [...]}."""
    (folder / LENGTHS_FILE).write_text(json.dumps({"fingerprint": fingerprint, **lengths}) + "\n")


def read_lengths(folder: Path, fingerprint: str) -> dict[str, list[int]]:
    """The saved lengths per split, or {} when there are none for this fingerprint (measured otherwise)."""
    path = folder / LENGTHS_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.pop("fingerprint", None) != fingerprint:
        return {}
    return {split: [int(n) for n in lengths] for split, lengths in data.items()}
