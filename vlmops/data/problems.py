"""How rejected records are told: `RecordError`, raised by a record's reader with the field at fault; `RecordProblem`,
one rejected record's `file:line field: reason`; `DatasetError`, a dataset that cannot be used, with its problems."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmops.errors import UserInputError
from vlmops.plural import counted


@dataclass(frozen=True)
class RecordProblem:
    """Why one record was rejected: `file:line field: reason`."""

    location: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.location} {self.field}: {self.reason}"


class DatasetError(UserInputError):
    """A dataset that cannot be used; lists the problems found (the first of them when there are many).

    `total`: how many there are in all (default: `len(problems)`); `report`: the validation report so far,
    for a summary beside the error.
    """

    def __init__(self, problems: list[RecordProblem], hint: str = "", total: int | None = None, report: Any = None):
        self.problems = problems
        self.report = report
        total = len(problems) if total is None else total
        shown = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  ... and {total - min(50, len(problems))} more" if total > min(50, len(problems)) else ""
        super().__init__(f"{counted(total, 'rejected record')}:\n{shown}{more}" + (f"\n{hint}" if hint else ""))


class RecordError(UserInputError):
    """A record that cannot be read; `kind` sorts a batch job's rejects (`vlmops.infer.job_output.REJECT_KINDS`)."""

    def __init__(self, field: str, reason: str, *, kind: str = "invalid_record"):
        self.field = field
        self.reason = reason
        self.kind = kind
        super().__init__(f"{field}: {reason}")
