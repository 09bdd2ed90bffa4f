"""Policy files: validation with file:line, compilation, loading a directory, references."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from routing_policies.model import Facts
from routing_policies.policy import (
    PolicyFile,
    RouteMatcher,
    When,
    check_references,
    compile_policy,
    load_policies,
    load_policy,
    parse_policy,
)
from routing_policies.yamlsource import SourceError

GOOD = """\
name: default
description: the quickstart policy
routes:
  - name: sensitive-stays-local
    when: {data_class: [confidential, restricted]}
    candidates: [llama-local]
  - name: cheap-chat
    when: {model: fast}
    candidates: [llama-local, gpt-4o-mini, claude-haiku]
    objective: cheapest
    require: {min_quality: 1, max_p95_latency_ms: 3000, capabilities: [chat], max_usd_per_request: 0.01}
    split: null
    shadow: {model: claude-haiku, sample: 0.05}
  - name: direct
    when: {model: "*"}
    candidates: ["$requested"]
tests:
  - {tenant: search-team, model: fast, expect: llama-local}
  - {tenant: search-team, model: nope, expect: "error:model_not_found"}
"""

KNOWN = {"llama-local", "gpt-4o-mini", "claude-haiku"}


def test_good_policy_loads(tmp_path: Path) -> None:
    path = tmp_path / "default.yaml"
    path.write_bytes(GOOD.encode())
    policy = load_policy(path)
    assert policy.name == "default"
    assert policy.version == hashlib.sha256(GOOD.encode()).hexdigest()[:6]
    assert policy.source_path == str(path)
    assert [route.name for route in policy.routes] == ["sensitive-stays-local", "cheap-chat", "direct"]
    cheap = policy.routes[1]
    assert cheap.objective == "cheapest"
    assert str(cheap.require.max_usd_per_request) == "0.01"
    assert cheap.shadow is not None and cheap.shadow.sample == 0.05
    assert policy.routes[2].objective == "ordered" and policy.routes[2].max_attempts == 3
    assert len(policy.file.tests) == 2 and policy.file.tests[0].capabilities == ["chat"]
    assert policy.doc is not None and policy.doc.lines[("routes", 1)] == 7
    assert check_references(policy, None, KNOWN) == []


def test_version_changes_with_content() -> None:
    first = parse_policy(GOOD, "a.yaml")
    second = parse_policy(GOOD + "# comment\n", "a.yaml")
    assert len(first.version) == 6 and first.version != second.version


def _route(extra: str) -> str:
    return f"name: p\nroutes:\n  - name: r\n    candidates: [a, b]\n{extra}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: p\nroutes: []\n", "p.yaml:2: routes: List should have at least 1 item after validation, not 0"),
        ("routes:\n  - {name: r, candidates: [a]}\n", "p.yaml:1: name: Field required"),
        ("name: p\nroutes:\n  - name: r\n    candidates: []\n",
         "p.yaml:4: routes.0.candidates: List should have at least 1 item after validation, not 0"),
        (_route("    objective: smartest\n"),
         "p.yaml:5: routes.0.objective: Input should be 'cheapest', 'fastest', 'ordered' or 'weighted'"),
        (_route("    when: {modle: fast}\n"), "p.yaml:5: routes.0.when: unknown key 'modle'"),
        (_route("    when: {data_class: [secret]}\n"),
         ("p.yaml:5: routes.0.when.data_class.0: "
         "Input should be 'public', 'internal', 'confidential' or 'restricted'")),
        (_route("    when: {model: [fast, 3]}\n"), "p.yaml:5: routes.0.when.model.1: Input should be a valid string"),
        (_route("    require:\n      min_quality: high\n"),
         "p.yaml:6: routes.0.require.min_quality: Input should be a valid integer, unable to parse string as an integer"),
        (_route("    require: {capabilities: [telepathy]}\n"),
         ("p.yaml:5: routes.0.require.capabilities.0: "
         "Input should be 'chat', 'embeddings', 'tools', 'json' or 'vision'")),
        (_route("    shadow: {model: a, sample: 1.5}\n"),
         "p.yaml:5: routes.0.shadow.sample: Input should be less than or equal to 1"),
        (_route("    split:\n      - {model: a, weight: -1}\n"),
         "p.yaml:6: routes.0.split.0.weight: Input should be greater than or equal to 0"),
        (_route("    split:\n      - {model: c, weight: 1}\n"), "p.yaml:3: routes.0: split model 'c' is not in candidates"),
        (_route("    split: [{model: a, weight: 0}]\n"), "p.yaml:3: routes.0: split weights must not all be 0"),
        (_route("    weights: {cost: 1}\n"), "p.yaml:3: routes.0: weights only apply to objective: weighted"),
        (_route("    objective: weighted\n    weights: {cost: 0, latency: 0}\n"),
         "p.yaml:6: routes.0.weights: weights cost and latency cannot both be 0"),
        (_route("    max_attempts: 0\n"), "p.yaml:5: routes.0.max_attempts: Input should be greater than or equal to 1"),
        ("name: p\nroutes:\n  - {name: r, candidates: [a, a]}\n", "p.yaml:3: routes.0: duplicate candidate 'a'"),
        ("name: p\nroutes:\n  - {name: r, candidates: [a]}\n  - {name: r, candidates: [b]}\n",
         "p.yaml:2: routes: duplicate route name 'r'"),
        (_route("tests:\n  - {tenant: t, model: m, expect: 'error:boom'}\n"),
         "p.yaml:6: tests.0: expect must be a model name or one of error:model_not_allowed, error:model_not_found"),
        (_route("tests:\n  - {tenant: t, model: m}\n"), "p.yaml:6: tests.0.expect: Field required"),
        (_route("tests:\n  - {tenant: t, model: m, expect: a, input_tokens: -5}\n"),
         "p.yaml:6: tests.0.input_tokens: Input should be greater than or equal to 0"),
        ("name: p\nroutes: [\n", "p.yaml:3: YAML syntax error: expected the node content, but found '<stream end>'"),
    ],
)
def test_policy_errors_carry_file_and_line(text: str, expected: str) -> None:
    with pytest.raises(SourceError) as info:
        parse_policy(text, "p.yaml")
    assert info.value.errors == [expected]


def test_all_errors_in_a_file_are_reported() -> None:
    text = "name: p\nroutes:\n  - name: r\n    candidates: [a]\n    objective: nope\n    colour: red\n"
    with pytest.raises(SourceError) as info:
        parse_policy(text, "p.yaml")
    assert info.value.errors == [
        "p.yaml:5: routes.0.objective: Input should be 'cheapest', 'fastest', 'ordered' or 'weighted'",
        "p.yaml:6: routes.0: unknown key 'colour'",
    ]


def test_load_policies_reads_yaml_and_yml(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yml").write_text("name: other\nroutes: [{name: r, candidates: [x]}]\n")
    (tmp_path / "notes.txt").write_text("not a policy")
    policies = load_policies(tmp_path)
    assert sorted(policies) == ["default", "other"]
    assert policies["other"].source_path == str(tmp_path / "b.yml")


def test_load_policies_collects_errors_from_every_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: dup\nroutes: [{name: r, candidates: [x]}]\n")
    (tmp_path / "b.yaml").write_text("name: bad\nroutes: [{name: r, candidates: []}]\n")
    (tmp_path / "c.yaml").write_text("\n\nname: dup\nroutes: [{name: r, candidates: [y]}]\n")
    (tmp_path / "d.yaml").write_text("name: [\n")
    with pytest.raises(SourceError) as info:
        load_policies(tmp_path)
    a, b, c, d = (str(tmp_path / f"{n}.yaml") for n in "abcd")
    assert info.value.errors == [
        f"{b}:2: routes.0.candidates: List should have at least 1 item after validation, not 0",
        f"{c}:3: duplicate policy name 'dup' (also in {a})",
        f"{d}:2: YAML syntax error: expected the node content, but found '<stream end>'",
    ]


def test_load_policies_empty_and_missing_directory(tmp_path: Path) -> None:
    assert load_policies(tmp_path) == {}
    with pytest.raises(SourceError) as info:
        load_policies(tmp_path / "absent")
    assert info.value.errors == [f"{tmp_path / 'absent'}:1: cannot read: not a directory"]


def test_load_policy_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"nope.yaml:1: cannot read: No such file or directory"):
        load_policy(tmp_path / "nope.yaml")


REFS = """\
name: refs
routes:
  - name: one
    candidates: [a, ghost, "$requested"]
    split:
      - {model: a, weight: 1}
      - {model: ghost, weight: 1}
    shadow: {model: phantom, sample: 0.1}
tests:
  - {tenant: t, model: m, expect: a}
  - {tenant: t, model: m, expect: spectre}
  - {tenant: t, model: m, expect: "$requested"}
  - {tenant: t, model: m, expect: "error:model_not_allowed"}
"""


def test_check_references_names_every_dangling_model() -> None:
    policy = parse_policy(REFS, "refs.yaml")
    assert check_references(policy, policy.doc, {"a"}) == [
        "refs.yaml:4: route one: unknown model 'ghost'",
        "refs.yaml:7: route one split: unknown model 'ghost'",
        "refs.yaml:8: route one shadow: unknown model 'phantom'",
        "refs.yaml:11: test 2 expect: unknown model 'spectre'",
        "refs.yaml:12: test 3 expect: unknown model '$requested'",
    ]


def test_check_references_without_a_document_uses_line_1() -> None:
    file = PolicyFile.model_validate({"name": "mem", "routes": [{"name": "r", "candidates": ["x"]}]})
    policy = compile_policy(file, source_path="mem.yaml")
    assert check_references(policy, None, set()) == ["mem.yaml:1: route r: unknown model 'x'"]


def _facts(model: str = "fast", data_class: str = "internal", tenant: str = "search") -> Facts:
    return Facts(tenant, model, data_class, 10, None, frozenset({"chat"}))


@pytest.mark.parametrize(
    ("when", "facts", "matches"),
    [
        ({}, _facts(), True),
        ({"model": "fast"}, _facts(), True),
        ({"model": "fast"}, _facts("Fast"), False),
        ({"model": "gpt-*"}, _facts("gpt-4o"), True),
        ({"model": "gpt-*"}, _facts("claude"), False),
        ({"model": ["a", "b?"]}, _facts("b1"), True),
        ({"model": ["a", "b?"]}, _facts("b12"), False),
        ({"data_class": ["confidential", "restricted"]}, _facts(data_class="restricted"), True),
        ({"data_class": ["confidential", "restricted"]}, _facts(data_class="internal"), False),
        ({"tenant": "team-*"}, _facts(tenant="team-a"), True),
        ({"tenant": ["x", "y"]}, _facts(tenant="team-a"), False),
        ({"model": "fast", "tenant": "search"}, _facts(tenant="other"), False),
    ],
)
def test_route_matcher(when: dict[str, object], facts: Facts, matches: bool) -> None:
    assert RouteMatcher.from_when(When.model_validate(when)).matches(facts) is matches
