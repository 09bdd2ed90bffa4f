"""Line-aware YAML loading shared by the config loader and the policy loader.

Every error a user sees about a YAML file reads `file:line: message`. To get there we
compose the document once (keeping node marks), remember where each location path
starts, construct plain Python data from the same nodes, and translate pydantic's
`loc` tuples back to lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml
from pydantic_core import ErrorDetails
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "Loc",
    "SourceError",
    "YamlDoc",
    "error_at",
    "line_for",
    "load_yaml",
    "parse_yaml",
    "validate",
]

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=pydantic.BaseModel)

_INT_TAG = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class SourceError(Exception):
    """One or more `file:line: message` errors found while loading a source file."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors: list[str] = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class YamlDoc:
    """Parsed YAML plus the line where each location path starts (1-based)."""

    path: str
    data: Any
    lines: dict[Loc, int] = field(default_factory=lambda: {(): 1})


def load_yaml(path: str | Path) -> YamlDoc:
    """Read and parse a YAML file; unreadable files are a `SourceError` at line 1."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError([f"{name}:1: cannot read: {_os_reason(exc)}"]) from exc
    return parse_yaml(text, name)


def parse_yaml(text: str, path: str) -> YamlDoc:
    """Parse one YAML document from `text`; `path` is only used in messages."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        raise SourceError([_syntax_error(path, exc)]) from exc
    except yaml.YAMLError as exc:
        raise SourceError([f"{path}:1: YAML error: {exc}"]) from exc
    finally:
        loader.dispose()
    lines: dict[Loc, int] = {(): 1}
    errors: list[str] = []
    if node is not None:
        _walk(node, (), lines, errors, path, set())
    if errors:
        raise SourceError(errors)
    return YamlDoc(path=path, data=data, lines=lines)


def line_for(doc: YamlDoc, loc: Sequence[str | int]) -> int:
    """Line of the deepest node named by `loc`.

    pydantic locs may carry items that are not in the document (union member tags
    such as `str` or `list[str]`, or a missing field's name); those are skipped, so
    the answer is the line of the longest matching path.
    """
    return doc.lines.get(_known_path(doc, loc), 1)


def error_at(doc: YamlDoc, loc: Sequence[str | int], message: str) -> str:
    """Format `message` as `file:line: message` for the node at `loc`."""
    return f"{doc.path}:{line_for(doc, loc)}: {message}"


def validate(doc: YamlDoc, model: type[M], *, context: dict[str, Any] | None = None) -> M:
    """Validate `doc.data` against `model`, turning pydantic errors into `SourceError`."""
    try:
        return model.model_validate(doc.data, context=context)
    except pydantic.ValidationError as exc:
        raise SourceError(_format_validation(doc, exc)) from exc


def _format_validation(doc: YamlDoc, exc: pydantic.ValidationError) -> list[str]:
    errors = [(err, _known_path(doc, tuple(err["loc"]))) for err in exc.errors(include_url=False)]
    messages: list[str] = []
    for err, known in errors:
        if _superseded(err, known, errors):
            continue
        loc: Loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden" and loc:
            where = known[:-1] if known[-1:] == loc[-1:] else known
            msg = f"unknown key '{loc[-1]}'"
        elif err["type"] == "missing" and loc:
            where, msg = known + loc[-1:], str(err["msg"])
        else:
            where, msg = known, _clean_message(str(err["msg"]))
        line = doc.lines.get(known, 1)
        dotted = ".".join(str(part) for part in where)
        text = f"{doc.path}:{line}: {dotted}: {msg}" if dotted else f"{doc.path}:{line}: {msg}"
        if text not in messages:
            messages.append(text)
    return messages


def _superseded(err: ErrorDetails, known: Loc, errors: list[tuple[ErrorDetails, Loc]]) -> bool:
    """True for a union member's "not even this type" error when another member got
    further into the value (`model: [1]` against `str | list[str]` should only report
    the bad item, not also that a list is not a string)."""
    if not err["type"].endswith("_type"):
        return False
    return any(len(other) > len(known) and other[: len(known)] == known for _, other in errors)


def _clean_message(msg: str) -> str:
    # Custom validators raise ValueError; pydantic prefixes that with noise.
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def _known_path(doc: YamlDoc, loc: Sequence[str | int]) -> Loc:
    path: Loc = ()
    for part in loc:
        candidate = path + (part,)
        if candidate in doc.lines:
            path = candidate
    return path


def _walk(
    node: Node, loc: Loc, lines: dict[Loc, int], errors: list[str], path: str, active: set[int]
) -> None:
    # `active` guards against recursive aliases (`&a [*a]`), which compose into cycles.
    if id(node) in active:
        return
    active.add(id(node))
    if isinstance(node, MappingNode):
        seen: dict[str | int, int] = {}
        for key_node, value_node in node.value:
            key = _key_of(key_node)
            if key is None:
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                errors.append(f"{path}:{line}: duplicate key '{key}' (first on line {seen[key]})")
                continue
            seen[key] = line
            lines[loc + (key,)] = line
            _walk(value_node, loc + (key,), lines, errors, path, active)
    elif isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            lines[loc + (index,)] = item.start_mark.line + 1
            _walk(item, loc + (index,), lines, errors, path, active)
    active.discard(id(node))


def _key_of(node: Node) -> str | int | None:
    if not isinstance(node, ScalarNode) or node.tag == _MERGE_TAG:
        return None
    value = str(node.value)
    if node.tag == _INT_TAG:
        try:
            return int(value.replace("_", ""), 0)
        except ValueError:
            return value
    return value


def _syntax_error(path: str, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else 1
    problem = exc.problem or exc.context or "invalid YAML"
    return f"{path}:{line}: YAML syntax error: {problem}"


def _os_reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
