"""Loading a config: a YAML file and the `base:` files it extends, then dotted overrides, validated as one.

Every problem is reported at once in a ConfigError, each with its key path and, where a file set the key, the file
and line. An override must name an existing key, and one that holds a password or token is refused."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vlmops.config.pipeline import PipelineConfig
from vlmops.errors import UserInputError
from vlmops.plural import counted


class ConfigError(UserInputError):
    """Every problem of a config at once, one line each: `[file:line] key.path: message`."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        super().__init__(f"{counted(len(problems), 'problem')}{where}:\n" + "\n".join(f"  - {p}" for p in problems))


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> PipelineConfig:
    """Load pipeline.yaml (or the defaults when path is None), apply dotted overrides, validate.

    Overrides are `key.path=value` strings (the value parsed as YAML) or a {dotted key: value} dict;
    they must name existing keys. A config may start with `base: other.yaml` (relative to the file) to
    extend another file; an error is reported at the file and line that set the key.
    """
    data: dict[str, Any] = {}
    lines: dict[str, KeyLocation] = {}
    source = None
    if path is not None:
        source = str(path)
        data, lines = _read_yaml_with_bases(Path(path), ())
    problems: list[str] = []
    given = _parse_overrides(overrides)
    for key, value in given.items():
        try:
            _set_dotted(data, key, value)
        except ValueError as err:
            problems.append(str(err))
        lines = {k: v for k, v in lines.items() if not _under(k, key)}  # an override is no longer the file's
    if problems:
        raise ConfigError(problems, source)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError([_describe(e, lines, given) for e in err.errors()], source) from None


KeyLocation = tuple[str, int]
"""(file, line) where a config key was set."""


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _read_yaml_with_bases(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, KeyLocation]]:
    """The file's mapping merged over its `base:` chain, and where each dotted key was set."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist (copy pipeline.yaml and edit it)")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML: {err}"], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections"], str(path))
    if twice := _keys_set_twice(node):  # YAML keeps the last of them without a word
        raise ConfigError([f"{path}:{line}: {message}" for line, message in twice], str(path))
    lines = {key: (str(path), line) for key, line in (_key_lines(node) if node is not None else {}).items()}
    base = data.pop("base", None)
    if base is None:
        return data, lines
    where = f"{path}:{lines['base'][1]}"
    if not isinstance(base, str) or not base.strip():
        raise ConfigError([f"{where}: base: must be the path of another config file, not {base!r}"], str(path))
    base_path = (path.parent / base).resolve()
    chain = (*chain, path.resolve())
    if base_path in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(base_path) :], base_path))
        raise ConfigError([f"{where}: base: {base} makes a cycle: {cycle}; remove one of these base: keys"], str(path))
    if not base_path.is_file():
        raise ConfigError([f"{where}: base: {base_path} does not exist"], str(path))
    base_data, base_lines = _read_yaml_with_bases(base_path, chain)
    lines.pop("base")
    # A key set in this file replaces the base's value for it and everything under it.
    kept = {k: v for k, v in base_lines.items() if not any(_under(k, own) and _is_leaf(data, own) for own in lines)}
    return _deep_merge(base_data, data), {**kept, **lines}


def _is_leaf(data: dict[str, Any], dotted: str) -> bool:
    """Whether `dotted` names a value (not a section) in `data`: a value replaces the base's whole subtree."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return not isinstance(node, dict)


def _keys_set_twice(node: yaml.Node | None, prefix: str = "") -> list[tuple[int, str]]:
    """(line, message) for each key set again in the same mapping, which YAML would settle by dropping the first."""
    found: list[tuple[int, str]] = []
    if not isinstance(node, yaml.MappingNode):
        return found
    first: dict[str, int] = {}
    for key_node, value_node in node.value:
        key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
        if key_node.value != "<<" and key in first:
            found.append((line, f"{key} is set twice (first on line {first[key]}); keep one of them"))
        first.setdefault(key, line)
        found += _keys_set_twice(value_node, key + ".")
    return found


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Dotted key -> line number in the file, for error messages."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, key + "."))
    return out


def _describe(error: Any, lines: dict[str, KeyLocation], overrides: dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc) or "(top level)"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; `vlmops config --show` prints every valid key)"
    elif error["type"] == "literal_error":
        message = message.replace("Input should be", "must be")
    elif error["type"] == "value_error":  # a validator's own words, which pydantic prefixes with "Value error, "
        message = message.removeprefix("Value error, ")
    given = next((k for k in overrides if _under(key, k)), None)
    if error["type"] == "list_type":
        message += f" (a YAML list: {given or key}=[a, b], quoted in a shell)"
    if given is not None:  # the override's words, not the file's key: the file may not set it at all
        shown = f"override {given}={_shown_value(overrides[given])}"
        return f"{shown}: {message}" if given == key else f"{shown}: {key}: {message}"
    location = None
    for i in range(len(loc), 0, -1):
        location = lines.get(".".join(loc[:i]))
        if location is not None:
            break
    where = f"{location[0]}:{location[1]}: " if location else ""
    return f"{where}{key}: {message}"


def _shown_value(value: Any) -> str:
    """An override's value as it would be written after `=` (YAML's flow style), cut short past 80 characters."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        parsed = dict(overrides)
    else:
        parsed = {}
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError([f"override {item!r}: write it as key.path=value, e.g. train.epochs=2"])
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    _refuse_credentials(parsed)
    return parsed


def _refuse_credentials(overrides: dict[str, Any]) -> None:
    """Overrides are flow-run parameters: the Prefect server stores them, its UI shows them, and a shell keeps
    them in its history. A password or token in one would be kept where the redaction never reaches."""
    from vlmops.redact import redact_uri

    def holds_secret(value: Any) -> bool:
        if isinstance(value, dict):
            return any(holds_secret(v) for v in value.values())
        if isinstance(value, list):
            return any(holds_secret(v) for v in value)
        return isinstance(value, str) and redact_uri(value) != value

    keys = [key for key, value in overrides.items() if holds_secret(value)]
    if keys:
        raise ConfigError(
            [
                f"override {key}: holds a password or token; overrides are stored as flow-run parameters, so "
                "put credentials in the environment instead (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, PGPASSWORD; see .env.example)"
                for key in keys
            ]
        )


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    fields: dict[str, Any] | None = PipelineConfig.model_fields
    node = data
    for i, part in enumerate(parts):
        if fields is None or part not in fields:
            known = ", ".join(sorted(fields)) if fields else "nothing (it is a value, not a section)"
            raise ValueError(f"override {key}: unknown key {'.'.join(parts[: i + 1])}; valid keys there: {known}")
        annotation = fields[part].annotation
        if i == len(parts) - 1:
            node[part] = copy.deepcopy(value)
            return
        fields = annotation.model_fields if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
