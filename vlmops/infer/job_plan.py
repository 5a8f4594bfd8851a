"""What defines a batch inference job: its model, inputs, settings and shards (`JobPlan`, saved as `_job/job.json`).

A job is the model's content hash, the inputs' content hashes and the settings that change answers, which records
are rejected, or the shard layout (`job_settings`); its id is a hash of those (`vlmops.infer.planning.plan_job`). The
input is cut into shards of `infer.shard_size` records (never across files).
"""

from __future__ import annotations

import collections
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from vlmops.config import PipelineConfig, StorageConfig
from vlmops.data.image_paths import image_roots
from vlmops.errors import UserInputError
from vlmops.infer.engine import slot_tokens
from vlmops.infer.output import JOB_FILE
from vlmops.infer.resolve import registry_alias_version
from vlmops.infer.shards import PROMPT_STEP, InputFile, Shard
from vlmops.plural import counted


@dataclass(frozen=True)
class ModelInfo:
    """The model a job runs: as the user named it (`models:/NAME@ALIAS` stays the alias), the registry version it
    resolved to if any, and its content hash."""

    uri: str
    version: str | None
    content_hash: str

    @property
    def pinned(self) -> str:
        """The reference that loads this very model whatever the registry does since: `models:/NAME/VERSION` for an
        alias (the version the job took it at), else `uri`."""
        return registry_alias_version(self.uri, self.version) or self.uri

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobPlan:
    """Everything that defines a job and its shards; saved as `_job/job.json`."""

    job_id: str
    model: ModelInfo
    input: str
    files: list[InputFile]
    shards: list[Shard]
    settings: dict[str, Any]
    retry_of: str | None = None
    """A job over another job's rejects (`infer.retry_rejects`): that job's output (its files' `only` say which
    records)."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "job_id": self.job_id,
                "model": self.model.as_dict(),
                "input": self.input,
                "files": [asdict(f) for f in self.files],
                "shards": [asdict(s) for s in self.shards],
                "settings": self.settings,
                "retry_of": self.retry_of,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> JobPlan:
        """The plan saved as `_job/job.json`.

        Raises:
            UserInputError: the plan has fields this vlmops does not know (a newer one planned the job): read
                without them, a resumed job could answer records the plan leaves out.
        """
        data = json.loads(text)
        _refuse_unknown_fields(data)
        return cls(
            data["job_id"],
            ModelInfo(**data["model"]),
            data["input"],
            [InputFile(**f) for f in data["files"]],
            [Shard(**s) for s in data["shards"]],
            data["settings"],
            data.get("retry_of"),
        )

    @property
    def records(self) -> int:
        return sum(f.records for f in self.files)

    @property
    def longest_prompt(self) -> int | None:
        """The most prompt tokens any record encodes to (what a slot of the fast engine must hold before the answer);
        None where the plan did not count them."""
        counted = [f.longest_prompt for f in self.files]
        if not counted or any(n is None for n in counted):
            return None
        return max(n for n in counted if n is not None)

    def slot_advice(self, max_new_tokens: int) -> str | None:
        """Where a few long records make every slot of the fast engine long: what they cost and the setting that
        trades them for slots (None where 99% of the records need at least half the slot, or nothing was counted).
        """
        longest = self.longest_prompt
        steps: collections.Counter[int] = collections.Counter()
        for file in self.files:
            for step, count in file.prompt_steps or []:
                steps[step] += count
        total = sum(steps.values())
        if longest is None or not total:
            return None
        covered, bulk = 0, 0
        for step, count in sorted(steps.items()):
            covered += count
            if covered >= 0.99 * total:
                bulk = step
                break
        context, bulk_context = slot_tokens(longest + max_new_tokens), slot_tokens(bulk * PROMPT_STEP + max_new_tokens)
        if 2 * bulk_context > context:
            return None
        where = next(
            (f"{f.name}:{f.longest_line}" for f in self.files if f.longest_prompt == longest and f.longest_line),
            "?",
        )
        longer = sum(count for step, count in steps.items() if step > bulk)
        return (
            f"the job's longest prompt ({where}) takes {longest} tokens, so each slot of the fast engine holds {context} "
            f"tokens with the answer, where {covered} of its {total} records need {bulk_context} or fewer: "
            f"--set infer.max_context={bulk_context} fits ~{context // bulk_context}x the slots in the same memory and "
            f"sends at most {counted(longer, 'record')} (those over {bulk * PROMPT_STEP} prompt tokens) to the rejects"
        )

    def context_advice(self, max_context: int, max_new_tokens: int) -> str | None:
        """Where a set `infer.max_context` holds some of the job's prompts but not its longest: which records go to
        the rejects (None where every counted prompt fits, or nothing was counted)."""
        longest = self.longest_prompt
        if longest is None or longest + max_new_tokens <= max_context:
            return None
        where = next(
            (f"{f.name}:{f.longest_line}" for f in self.files if f.longest_prompt == longest and f.longest_line),
            "?",
        )
        return (
            f"infer.max_context {max_context} holds prompts of up to {max_context - max_new_tokens} tokens beside "
            f"infer.max_new_tokens {max_new_tokens}; the job's longest prompt ({where}) takes {longest}: each longer "
            f"record goes to the rejects with its token count (unset infer.max_context to size the slots to the job's "
            f"prompts, or raise it to {longest + max_new_tokens})"
        )


SETTING_KEYS = {
    "max_new_tokens": "infer.max_new_tokens",
    "temperature": "infer.temperature",
    "top_p": "infer.top_p",
    "top_k": "infer.top_k",
    "seed": "infer.seed",
    "repetition_penalty": "infer.repetition_penalty",
    "shard_size": "infer.shard_size",
    "system_prompt": "model.system_prompt",
    "dtype": "model.dtype",
    "max_context": "infer.max_context",
    "allowed_roots": "data.allowed_roots",
    "url_max_mib": "storage.url_max_mib",
    "url_allow_networks": "storage.url_allow_networks",
}
"""Each of a job's settings (`job_settings`) and the config key it comes from, which a mismatch names."""

_DEFAULT_URL_MAX_MIB = StorageConfig().url_max_mib


def _refuse_unknown_fields(data: dict[str, Any]) -> None:
    parts: list[tuple[str, type, list[dict[str, Any]]]] = [
        ("", JobPlan, [data]),
        ("model.", ModelInfo, [data.get("model") or {}]),
        ("files[].", InputFile, data.get("files") or []),
        ("shards[].", Shard, data.get("shards") or []),
    ]
    unknown = sorted(
        {prefix + key for prefix, kind, items in parts for item in items for key in item}
        - {prefix + f.name for prefix, kind, _ in parts for f in fields(kind)}
    )
    if unknown:
        raise UserInputError(
            f"{JOB_FILE} has {counted(len(unknown), 'field')} this vlmops does not know ({', '.join(unknown)}): a "
            "newer vlmops planned this job; run it with that version, or give another --output for a new job"
        )


def job_settings(config: PipelineConfig) -> dict[str, Any]:
    """The settings that change answers, which records are answered or rejected, or the shard layout; batch size,
    workers and engine do not (sampled, the engines draw differently, but each draw is a valid answer of the same
    settings).

    The limits on prompts and images (`infer.max_context`, `data.allowed_roots`, `storage.url_max_mib`,
    `storage.url_allow_networks`) decide which records are rejects: a rerun with another would answer records the
    done shards rejected, or the reverse. They are in only where set (not their defaults), so that a job planned
    before they were part of the identity keeps its id.
    """
    infer, storage = config.infer, config.storage
    sampling = {"top_k": infer.top_k, "seed": infer.seed} if infer.temperature > 0 else {}
    limits: dict[str, Any] = {}
    if infer.max_context is not None:
        limits["max_context"] = infer.max_context
    if config.data.allowed_roots:  # as the records' image paths are checked against them: resolved, in any order
        limits["allowed_roots"] = sorted({str(root) for root in image_roots(None, config.data.allowed_roots)})
    if storage.url_max_mib != _DEFAULT_URL_MAX_MIB:
        limits["url_max_mib"] = storage.url_max_mib
    if storage.url_allow_networks:
        limits["url_allow_networks"] = sorted(storage.url_allow_networks)
    return {
        "max_new_tokens": infer.max_new_tokens,
        "temperature": infer.temperature,
        "top_p": infer.top_p,
        **sampling,
        "repetition_penalty": infer.repetition_penalty,
        "shard_size": infer.shard_size,
        "system_prompt": config.model.system_prompt,
        "dtype": config.model.dtype,
        **limits,
    }
