"""The image references of dataset records resolved to the images they name.

A remote one (http(s)://, s3://, data:) is kept as written. A local path is made absolute against the dataset file's
folder, every symlink followed, and kept to the roots (that folder and `data.allowed_roots`); a relative path in a
record read from s3:// is a key under the folder it was read from. `ImagePaths` resolves each distinct reference once
a scan, `RealFolders` each folder once.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Sequence
from pathlib import Path

from vlmops.conversation import ImageRef
from vlmops.data.problems import RecordError

REMOTE_PREFIXES = ("http://", "https://", "s3://", "data:")
OTHER_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://")


def image_roots(folder: Path | None, allowed_roots: Sequence[str | os.PathLike[str]] = ()) -> tuple[Path, ...]:
    """Where a file's local image paths may point: its own folder (None: a file not on this disk) and the configured
    `data.allowed_roots`."""
    own = () if folder is None else (folder.resolve(),)
    return (*own, *(Path(r).expanduser().resolve() for r in allowed_roots))


def record_base(uri: str) -> Path | str:
    """The folder a record's relative image paths resolve against: its file's folder, or on S3 the file's prefix."""
    return uri.rpartition("/")[0] if uri.startswith("s3://") else Path(uri).parent


class ImagePaths:
    """The image references of one dataset file's records resolved (`_resolve`), each distinct local one once.

    Resolving a path costs a syscall per folder on it (every symlink followed), and a file often names the same few
    images over and over: 100,000 records naming 1,000 images spent most of a scan there (bench/scan_bench.py). What
    it finds is a snapshot, good for one scan of the file (`iter_dataset`) and no longer: a later scan must see a
    symlink pointed elsewhere or an image moved since, so keep none beyond it. It holds a path per distinct
    reference, as validation's table of checked images does. A file whose records each name an image of their own
    resolves each folder once (`RealFolders`), then each image's own name.
    """

    def __init__(self, base_dir: Path | str, roots: Sequence[Path] | None):
        self.base_dir = base_dir
        self.roots = roots
        self._resolved: dict[str, str] = {}  # reference as written -> the path it names
        self._refused: dict[str, str] = {}  # reference as written -> why it names no image the dataset may use
        self._folders = RealFolders(base_dir, roots) if isinstance(base_dir, Path) else None

    def resolve(self, image: ImageRef, field: str) -> ImageRef:
        """`image` as the record names it at `field`: see `_resolve`."""
        uri = image.uri
        if uri.startswith(REMOTE_PREFIXES):
            return ImageRef(uri, field)  # nothing on disk to look at (and a data: URI can be megabytes: not kept)
        if uri in self._refused:
            raise RecordError(field, self._refused[uri])
        if uri not in self._resolved:
            try:
                self._resolved[uri] = _resolve(image, self.base_dir, field, self.roots, self._folders).uri
            except RecordError as err:
                self._refused[uri] = err.reason
                raise
        return ImageRef(self._resolved[uri], field)


MAX_LINKS = 40  # links in a row an image's own name may lead through before the whole resolution is left to tell


class RealFolders:
    """The real path of each folder one scan's local images lie in, and whether it is under the roots.

    Resolving a path (`_real_path`) costs a syscall per folder on it, every symlink followed: 100,000 records each
    naming an image of its own paid it 100,000 times for one folder. Here a folder is resolved once, and each image in
    it costs an lstat of its own name (the link followed, if it is one, the same way). The answers are those of the
    whole resolution, by the same steps (`os.path.realpath`'s, component by component, `..` taken from the path
    resolved so far); where the shortcut cannot be sure of that it answers None and the whole resolution runs (a
    folder missing or in a loop, a link chain longer than `MAX_LINKS`, a NUL byte, a `~user` that does not expand, a
    `..` for a last component). A snapshot like `ImagePaths`: for one scan, and no longer. Paths are strings here, not
    `Path`s: pathlib parses every path it makes, and its parsing led the whole resolution's profile (bench/RESULTS.md,
    helper h43).
    """

    def __init__(self, base_dir: Path, roots: Sequence[Path] | None):
        self.roots = roots
        self._base = os.fspath(base_dir)
        self._folders: dict[str, tuple[str, bool] | None] = {}  # folder as written -> real path + "/", under the roots

    def real_path(self, uri: str) -> tuple[str, bool] | None:
        """The real path of the image `uri` names (as `_real_path`), and whether it is under the roots; None where
        only `_real_path` can tell."""
        path = self._written(uri)
        for _ in range(MAX_LINKS):
            if path is None:
                return None
            cut = path.rfind("/") + 1  # the folder with its slash ("/" for the root), then the name in it
            folder, name = path[:cut], path[cut:]
            if name in ("", ".", ".."):
                return None
            if folder not in self._folders:
                self._folders[folder] = self._resolve_folder(folder)
            found = self._folders[folder]
            if found is None:
                return None
            real, under = found
            path = real + name
            try:
                is_link = stat.S_ISLNK(os.lstat(path).st_mode)
            except OSError:
                is_link = False  # as realpath: a name that is not there is kept as written (the image is missing)
            except ValueError:
                return None
            if not is_link:
                return path, under or _within(path, self.roots)
            try:
                # A relative target goes on from the link's folder.
                path = os.path.join(real, os.readlink(path))  # noqa: PTH115, PTH118
            except OSError:
                return None
        return None

    def _written(self, uri: str) -> str | None:
        """`uri` expanded and joined to the dataset's folder as `_real_path` does it; None for a `~user` that does not
        expand."""
        if "~" in uri:
            try:  # pathlib's rule, not os.path's: it expands the first component it keeps, so `./~user/a.png` too
                uri = str(Path(uri).expanduser())
            except (RuntimeError, ValueError):
                return None
        return uri if uri.startswith("/") else f"{self._base}/{uri}"

    def _resolve_folder(self, folder: str) -> tuple[str, bool] | None:
        try:  # strict: an error is anything realpath would have walked past or stopped at (a missing folder, a loop)
            real = os.path.realpath(folder, strict=True)
        except (OSError, ValueError):
            return None
        return real.rstrip("/") + "/", _within(real, self.roots)


def _resolve(
    image: ImageRef, base_dir: Path | str, field: str, roots: Sequence[Path] | None, folders: RealFolders | None = None
) -> ImageRef:
    """The image `image.uri` names, resolved against `base_dir` and kept to `roots`; `folders` (this scan's, for the
    same folder and roots) answers for a local path where it can, at a syscall or two."""
    uri = image.uri
    if not uri:
        raise RecordError(field, "empty image reference <img></img>")
    if uri.startswith(REMOTE_PREFIXES):
        return ImageRef(uri, field)
    other = OTHER_SCHEME.match(uri)
    if other:
        raise RecordError(
            field, f"image {uri}: {other.group(1)}:// is not supported; use a path, http(s)://, s3:// or data:"
        )
    if isinstance(base_dir, str):
        if uri.startswith(("/", "~")) and roots:
            absolute = _real_path(uri, None, field)
            if any(absolute.is_relative_to(root) for root in roots):
                return ImageRef(str(absolute), field)  # a shared mount the config names (data.allowed_roots)
        return ImageRef(_under_remote(base_dir, uri, field), field)
    found = folders.real_path(uri) if folders is not None else None
    if found is None:
        whole = str(_real_path(uri, base_dir, field))
        found = whole, _within(whole, roots)
    resolved, under = found
    if roots is not None and not under:
        # Where the path is read as written, naming it again adds nothing; a link that leads out is the surprise.
        written = Path(os.path.normpath(base_dir.resolve() / Path(uri).expanduser()))
        link = "" if written == Path(resolved) else f" (a link to {resolved})"
        raise RecordError(
            field,
            f"image {uri} is outside the dataset's folder{link}; move it under {roots[0]} "
            "or add its folder to data.allowed_roots",
        )
    return ImageRef(resolved, field)


def _within(path: str, roots: Sequence[Path] | None) -> bool:
    """Whether `path` (absolute, every link followed) is in one of `roots` or is one (None: anywhere is)."""
    return roots is None or any(Path(path).is_relative_to(root) for root in roots)


def _real_path(uri: str, base_dir: Path | None, field: str) -> Path:
    """The local path `uri` names, `~` expanded, made absolute against `base_dir` and every symlink followed (a link
    out of the roots is out); RecordError for one that names no path (a NUL byte, an unknown `~user`, a link loop)."""
    try:
        path = Path(uri).expanduser()
        return (path if path.is_absolute() or base_dir is None else base_dir / path).resolve()
    except (ValueError, RuntimeError, OSError) as err:
        raise RecordError(field, f"image {uri!r} is not a path that can be read ({err})") from None


def _under_remote(base: str, uri: str, field: str) -> str:
    """A relative image path of a record read from the remote folder `base` (`s3://bucket/prefix`): the URI of the
    object under it. Never a local file (the worker's disk is not where the record came from), never outside `base`."""
    scheme, _, rest = base.partition("://")
    bucket, _, prefix = rest.partition("/")
    if uri.startswith(("/", "~")) or re.match(r"[A-Za-z]:[\\/]", uri):
        raise RecordError(
            field,
            f"image {uri}: a local path in a record read from {base}; use a path relative to it or a full "
            f"{scheme}:// URI (or list its folder, a mount every worker has, in data.allowed_roots)",
        )
    key = posixpath.normpath(posixpath.join(prefix, uri))
    if key == ".." or key.startswith("../") or (prefix and not key.startswith(prefix.rstrip("/") + "/")):
        raise RecordError(
            field, f"image {uri} is outside {base}, where the record was read from; use a full {scheme}:// URI"
        )
    return f"{scheme}://{bucket}/{key}"
