"""Local image paths in a scan: each folder resolved once (`RealFolders`), each image's own name after it, and every
answer the one the whole resolution of the path gives (`_resolve` without a folder table: `Path.resolve`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vlmops.conversation import ImageRef
from vlmops.data.formats import read_dataset
from vlmops.data.image_paths import MAX_LINKS, ImagePaths, RealFolders, _resolve, image_roots
from vlmops.data.problems import RecordError

# Every reference below, against the tree `links` builds; HOME is the tree's root.
REFERENCES = [
    *("images/a.png", "./images/a.png", "images//a.png", "images/./a.png", "images/sub/../a.png"),
    *("pics/a.png", "pics/../images/a.png", "deep/../a.png", "deep/b.png", "up/data/images/a.png"),
    *("a-link.png", "abs-link.png", "chain.png", "rel-up.png", "c0.png", "dangling.png", "images/new.png"),
    *("out.png", "../outside.png", "up/outside.png", "shared/s.png", "shared-link.png"),
    *("missing/a.png", "missing/../images/a.png", "images/a.png/x.png", "images/", "images/.", "images/.."),
    *("loop1.png", "self.png", "loopdir/a.png", "a\0b.png", ""),
    *("~/data/images/a.png", "./~/data/images/a.png", "~no-such-user-h43/a.png"),
]


def links(root: Path) -> Path:
    """A dataset folder with images, folder links in and out of it, file links, chains, loops and a dangling link."""
    data = root / "data"
    (data / "images" / "sub").mkdir(parents=True)
    (root / "shared").mkdir()
    for image in (data / "images" / "a.png", data / "images" / "sub" / "b.png", root / "outside.png"):
        image.write_bytes(b"png")
    (root / "shared" / "s.png").write_bytes(b"png")
    targets = {
        "pics": "images",
        "deep": "images/sub",
        "up": "..",
        "shared": "../shared",
        "loopdir": "loopdir",
        "a-link.png": "images/a.png",
        "abs-link.png": str(data / "images" / "a.png"),
        "chain.png": "a-link.png",
        "rel-up.png": "deep/../a.png",  # `..` after a linked folder: images/a.png, not data/a.png
        "out.png": "../outside.png",
        "shared-link.png": "../shared/s.png",
        "dangling.png": "nowhere.png",
        "loop1.png": "loop2.png",
        "loop2.png": "loop1.png",
        "self.png": "self.png",
        **{f"c{i}.png": f"c{i + 1}.png" for i in range(MAX_LINKS + 5)},
        f"c{MAX_LINKS + 5}.png": "images/a.png",
    }
    for name, target in targets.items():
        (data / name).symlink_to(target)
    return data


def answer(paths: ImagePaths | None, reference: str, data: Path, roots: tuple[Path, ...]) -> str:
    """The path a reference names, or why it is refused: by a scan's `paths`, or (None) by the whole resolution."""
    try:
        if paths is None:
            return _resolve(ImageRef(reference), data, "f", roots).uri
        return paths.resolve(ImageRef(reference), "f").uri
    except RecordError as err:
        return f"refused: {err.reason}"


@pytest.mark.parametrize("allowed", [False, True], ids=["the dataset's folder", "and an allowed root"])
def test_a_scan_answers_every_reference_as_the_whole_resolution_does(
    allowed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Links in a row, out of the roots and into an allowed one, `..` after a linked folder, loops, missing folders, a
    file used as a folder, `~`: one scan's answer for each is the whole resolution's, and a few are pinned here."""
    monkeypatch.setenv("HOME", str(tmp_path))
    data = links(tmp_path)
    roots = image_roots(data, [tmp_path / "shared"] if allowed else [])
    paths = ImagePaths(data, roots)
    got = {reference: answer(paths, reference, data, roots) for reference in REFERENCES}
    assert got == {reference: answer(None, reference, data, roots) for reference in REFERENCES}

    real = tmp_path.resolve()
    a = str(real / "data" / "images" / "a.png")
    assert [got[r] for r in ("deep/../a.png", "rel-up.png", "chain.png", "c0.png", "up/data/images/a.png")] == [a] * 5
    assert got["dangling.png"] == str(real / "data" / "nowhere.png")  # a name; validation finds no image there
    assert got["out.png"].startswith(
        f"refused: image out.png is outside the dataset's folder (a link to {real / 'outside.png'})"
    )
    if allowed:
        assert got["shared-link.png"] == str(real / "shared" / "s.png")
    else:
        assert got["shared-link.png"].startswith("refused: image shared-link.png is outside the dataset's folder")
    assert got["loop1.png"].startswith("refused: image 'loop1.png' is not a path that can be read (Symlink loop")


def test_the_folder_table_answers_as_realpath_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`RealFolders.real_path` gives `os.path.realpath`'s answer, or None (the whole resolution then runs): an image
    in a folder it knows costs its own name only, links and `..` after linked folders included."""
    monkeypatch.setenv("HOME", str(tmp_path))
    data = links(tmp_path)
    roots = image_roots(data)
    folders = RealFolders(data, roots)
    answered = []
    for reference in REFERENCES:
        found = folders.real_path(reference)
        if found is not None:
            real = os.path.realpath(data / Path(reference).expanduser())
            assert found == (real, any(Path(real).is_relative_to(root) for root in roots)), reference
            answered.append(reference)
    shortcut = ["images/a.png", "deep/../a.png", "a-link.png", "chain.png", "rel-up.png", "out.png", "dangling.png"]
    assert set(shortcut) <= set(answered)
    assert not {"loop1.png", "self.png", "loopdir/a.png", "c0.png", "missing/a.png", "a\0b.png"} & set(answered)


def test_a_folder_link_is_followed_where_it_leads_at_each_scan(tmp_path: Path) -> None:
    """The folder table is a scan's: pics/ pointed at another folder between two scans, the second finds the images
    there, and pointed out of the dataset's folder, the third refuses them."""
    data = tmp_path / "data"
    for folder in (data / "v1", data / "v2", tmp_path / "elsewhere"):
        folder.mkdir(parents=True)
        (folder / "a.png").write_bytes(b"png")
    (data / "pics").symlink_to("v1")
    record = {
        "conversations": [{"from": "user", "value": "<img>pics/a.png</img>What?"}, {"from": "assistant", "value": "A"}]
    }
    file = data / "d.jsonl"
    file.write_text(json.dumps(record) + "\n")

    def scan() -> list[str]:
        read = read_dataset(file)
        return [image.uri for conv in read.conversations for image in conv.images] + [p.reason for p in read.problems]

    assert scan() == [str((data / "v1" / "a.png").resolve())]
    (data / "pics").unlink()
    (data / "pics").symlink_to("v2")
    assert scan() == [str((data / "v2" / "a.png").resolve())]
    (data / "pics").unlink()
    (data / "pics").symlink_to(tmp_path / "elsewhere")
    [refused] = scan()
    assert "outside the dataset's folder" in refused
