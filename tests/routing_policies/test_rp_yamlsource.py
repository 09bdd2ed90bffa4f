"""Line-aware YAML loading: location -> line, and pydantic errors rendered as file:line."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from routing_policies.yamlsource import (
    SourceError,
    YamlDoc,
    error_at,
    line_for,
    load_yaml,
    parse_yaml,
    validate,
)

DOC = """\
name: demo
providers:
  - name: openai
    timeout_s: 60
  - name: local
    extra:
      nested: true
models: [a, b]
flow:
  inline: {x: 1, y: [2, 3]}
"""


@pytest.mark.parametrize(
    ("loc", "line"),
    [
        ((), 1),
        (("name",), 1),
        (("providers",), 2),
        (("providers", 0), 3),
        (("providers", 0, "name"), 3),
        (("providers", 0, "timeout_s"), 4),
        (("providers", 1), 5),
        (("providers", 1, "extra"), 6),
        (("providers", 1, "extra", "nested"), 7),
        (("models",), 8),
        (("models", 1), 8),
        (("flow", "inline", "y", 1), 10),
    ],
)
def test_lines_map_each_location(loc: tuple[str | int, ...], line: int) -> None:
    doc = parse_yaml(DOC, "demo.yaml")
    assert doc.lines[loc] == line


def test_data_is_plain_python() -> None:
    doc = parse_yaml(DOC, "demo.yaml")
    assert doc.data["providers"][1] == {"name": "local", "extra": {"nested": True}}
    assert doc.data["flow"]["inline"] == {"x": 1, "y": [2, 3]}
    assert doc.path == "demo.yaml"


@pytest.mark.parametrize(
    ("loc", "line"),
    [
        (("providers", 1, "extra", "nested"), 7),
        (("providers", 1, "missing_field"), 5),  # a missing key points at its parent
        (("providers", 0, "timeout_s", "int"), 4),  # trailing union tag
        (("providers", "list[str]", 1, "extra"), 6),  # union tag in the middle
        (("nowhere", "at", "all"), 1),
        ((), 1),
    ],
)
def test_line_for_skips_unknown_items(loc: tuple[str | int, ...], line: int) -> None:
    assert line_for(parse_yaml(DOC, "demo.yaml"), loc) == line


def test_error_at_formats_file_and_line() -> None:
    doc = parse_yaml(DOC, "cfg/demo.yaml")
    assert error_at(doc, ("providers", 1, "name"), "boom") == "cfg/demo.yaml:5: boom"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("a: 1\nb: [1, 2\nc: 3\n", 3, "YAML syntax error"),
        ("a: 1\n  b: 2\n", 2, "YAML syntax error: mapping values are not allowed here"),
        ("a:\n  - x\n - y\n", 3, "YAML syntax error"),
        ("a: 1\n---\nb: 2\n", 2, "YAML syntax error"),
        ("a: *missing\n", 1, "found undefined alias"),
        ("a: 1\nb:\n  c: 1\n  c: 2\n", 4, "duplicate key 'c' (first on line 3)"),
    ],
)
def test_yaml_errors_name_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(SourceError) as info:
        parse_yaml(text, "bad.yaml")
    (message,) = info.value.errors
    assert message.startswith(f"bad.yaml:{line}: ")
    assert fragment in message
    assert str(info.value) == message


def test_empty_document_is_none() -> None:
    doc = parse_yaml("", "empty.yaml")
    assert doc == YamlDoc("empty.yaml", None, {(): 1})


def test_recursive_alias_does_not_loop() -> None:
    doc = parse_yaml("a: &x [1, *x]\n", "loop.yaml")
    assert doc.lines[("a", 0)] == 1


def test_integer_keys_are_ints() -> None:
    doc = parse_yaml("codes:\n  404: missing\n  0x10: hex\n", "k.yaml")
    assert doc.lines[("codes", 404)] == 2
    assert doc.lines[("codes", 16)] == 3


def test_load_yaml_reads_files(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("a:\n  b: 1\n", encoding="utf-8")
    doc = load_yaml(path)
    assert doc.path == str(path)
    assert doc.lines[("a", "b")] == 2


def test_load_yaml_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SourceError) as info:
        load_yaml(missing)
    assert info.value.errors == [f"{missing}:1: cannot read: No such file or directory"]


class Provider(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    kind: Literal["openai", "anthropic"] = "openai"
    timeout_s: float = Field(default=60, gt=0)
    tags: str | list[str] = []


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    providers: list[Provider]
    port: int = 8080


CONFIG = """\
providers:
  - name: openai
    timeout_s: 5
  - name: local
    kind: ollama
    timeout_s: fast
    colour: blue
    tags: [1, ok]
port: 80
"""


def test_validate_returns_the_model() -> None:
    doc = parse_yaml("providers:\n  - name: a\n", "ok.yaml")
    config = validate(doc, Config)
    assert config.providers[0].name == "a"


def test_validate_reports_every_error_with_its_line() -> None:
    with pytest.raises(SourceError) as info:
        validate(parse_yaml(CONFIG, "gw.yaml"), Config)
    assert info.value.errors == [
        "gw.yaml:5: providers.1.kind: Input should be 'openai' or 'anthropic'",
        "gw.yaml:6: providers.1.timeout_s: Input should be a valid number, unable to parse string as a number",
        "gw.yaml:8: providers.1.tags.0: Input should be a valid string",
        "gw.yaml:7: providers.1: unknown key 'colour'",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("providers:\n  - {name: a}\nbogus: 1\n", "x.yaml:3: unknown key 'bogus'"),
        ("providers:\n  - timeout_s: 1\n", "x.yaml:2: providers.0.name: Field required"),
        ("providers:\n  - name: a\n    timeout_s: -1\n", "x.yaml:3: providers.0.timeout_s: Input should be greater than 0"),
        ("providers: 3\n", "x.yaml:1: providers: Input should be a valid list"),
        ("port: 1\n", "x.yaml:1: providers: Field required"),
        ("- 1\n", "x.yaml:1: Input should be a valid dictionary or instance of Config"),
    ],
)
def test_validate_single_errors(text: str, expected: str) -> None:
    with pytest.raises(SourceError) as info:
        validate(parse_yaml(text, "x.yaml"), Config)
    assert info.value.errors == [expected]


def test_validate_passes_context() -> None:
    seen: list[object] = []

    class Probe(BaseModel):
        value: int

        def model_post_init(self, context: object) -> None:
            seen.append(context)

    validate(parse_yaml("value: 1\n", "p.yaml"), Probe, context={"base": "/etc"})
    assert seen == [{"base": "/etc"}]


def test_source_error_joins_lines() -> None:
    error = SourceError(["a.yaml:1: one", "a.yaml:2: two"])
    assert str(error) == "a.yaml:1: one\na.yaml:2: two"
    assert error.errors == ["a.yaml:1: one", "a.yaml:2: two"]
