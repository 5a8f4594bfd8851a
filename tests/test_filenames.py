"""safe_name: the one rule that turns model names, hub ids and revisions into path components."""

from __future__ import annotations

import pytest

from vlmops.filenames import safe_name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the names the model cache has always used stay as they were
        ("deepseek-ai/deepseek-vl-1.3b-chat", "deepseek-ai--deepseek-vl-1.3b-chat"),
        ("master", "master"),
        ("tiny-deepseek-vl", "tiny-deepseek-vl"),
        ("releases/tiny-vl", "releases--tiny-vl"),
        # anything else becomes `_`, and no name can climb out of its folder
        ("my model:v2", "my_model_v2"),
        ("..", "_"),
        ("../etc", "--etc"),
        ("", "_"),
        ("modèle", "mod_le"),
    ],
)
def test_safe_name(text: str, expected: str) -> None:
    assert safe_name(text) == expected
