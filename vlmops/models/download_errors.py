"""The errors of fetching a model, split by whose move it is: the user's (exit 2) or a failed run's (exit 1)."""

from __future__ import annotations

from vlmops.errors import RunFailed, UserInputError, VlmopsError

REFRESH_HINT = (
    "rerun with refresh (`vlmops download --refresh`, or `vlmops download NAME --refresh` for a catalog "
    "model; in code download_model(..., refresh=True))"
)


class ModelDownloadError(VlmopsError):
    """A model could not be fetched; the message says why and what to do. Raised as one of the subclasses."""


class ModelNotFoundError(ModelDownloadError, UserInputError):
    """The source has no such model (unknown id or revision, no model files under it): fix model.id."""


class ModelFolderNotFoundError(UserInputError, FileNotFoundError):
    """A `model.source: local` folder that does not exist."""


class TransferFailedError(ModelDownloadError, RunFailed):
    """The source could not be reached, or the transfer broke off or arrived damaged; a rerun resumes."""


class SnapshotCorruptedError(ModelDownloadError, RunFailed):
    """A downloaded snapshot no longer matches its manifest."""
