"""Golden files per direction: request, answer and stream translation, byte for byte.

Each `golden/<direction>/<case>.json` holds inputs (`request_in`, `response_in`,
`stream_in`) and the expected outputs (`*_out`). Directions are named by who talks to whom:
`anthropic_client__openai_upstream` and `openai_client__anthropic_upstream`.
`UPDATE_GOLDEN=1` rewrites the outputs (review the diff before committing it).
Streams are fed in awkward slices (7 bytes) to prove nothing depends on chunk boundaries.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters import naming
from adapters.canonical import TranslationError
from adapters.stream_translate import (
    TranslatingTap,
    anthropic_to_openai,
    openai_to_anthropic,
)
from adapters.translate_anthropic import (
    request_from_anthropic,
    request_to_anthropic,
    response_from_anthropic,
    response_to_anthropic,
)
from adapters.translate_openai import (
    request_from_openai,
    request_to_openai,
    response_from_openai,
    response_to_openai,
)

GOLDEN = Path(__file__).parent / "golden"
A_CLIENT = "anthropic_client__openai_upstream"
O_CLIENT = "openai_client__anthropic_upstream"
CREATED = 1700000000
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
CASES = sorted((p.parent.name, p.stem) for p in GOLDEN.glob("*/*.json"))


def _count(text: str) -> int:
    return len(text.split())  # stands in for the tokenizer: deterministic and obvious


def _names(direction: str, request: dict[str, Any] | None) -> dict[str, str]:
    tools = (request or {}).get("tools") or []
    if direction == A_CLIENT:
        return naming.name_table([t["name"] for t in tools], "openai")
    return naming.name_table([t["function"]["name"] for t in tools], "anthropic")


def _translate_request(direction: str, body: dict[str, Any]) -> dict[str, Any]:
    if direction == A_CLIENT:
        return request_to_openai(request_from_anthropic(body), max_tokens_key="max_completion_tokens",
                                 max_tokens=body["max_tokens"])
    canonical = request_from_openai(body)
    return request_to_anthropic(canonical, max_tokens=canonical.max_tokens or 4096)  # 4096: the model's cap


def _translate_response(direction: str, payload: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    if direction == A_CLIENT:
        return response_to_anthropic(response_from_openai(payload), names=names)
    return response_to_openai(response_from_anthropic(payload), names=names, created=CREATED)


def _tap(direction: str, names: dict[str, str], request: dict[str, Any] | None) -> TranslatingTap:
    if direction == A_CLIENT:
        return openai_to_anthropic(names=names, input_estimate=9, count_text=_count)
    options = (request or {}).get("stream_options") or {}
    return anthropic_to_openai(names=names, client_wants_usage=bool(options.get("include_usage")), created=CREATED,
                               input_estimate=9, count_text=_count)


def _translate_stream(tap: TranslatingTap, frames: list[str]) -> list[str]:
    raw = "".join(frame + "\n\n" for frame in frames).encode()
    out = b"".join(tap.feed(raw[i:i + 7]) for i in range(0, len(raw), 7)) + tap.flush()
    return [frame for frame in out.decode().split("\n\n") if frame]


@pytest.mark.parametrize(("direction", "case"), CASES, ids=[f"{d}/{c}" for d, c in CASES])
def test_golden(direction: str, case: str) -> None:
    path = GOLDEN / direction / f"{case}.json"
    golden = json.loads(path.read_text())
    got: dict[str, Any] = {}
    request = golden.get("request_in")
    names = _names(direction, request)
    if request is not None:
        got["request_out"] = _translate_request(direction, request)
    if "response_in" in golden:
        got["response_out"] = _translate_response(direction, golden["response_in"], names)
    if "stream_in" in golden:
        tap = _tap(direction, names, request)
        got["stream_out"] = _translate_stream(tap, golden["stream_in"])
        got["stream_done"] = tap.done
    if UPDATE:
        golden.update(got)
        path.write_text(json.dumps(golden, indent=2, ensure_ascii=False) + "\n")
    for key, value in got.items():
        assert value == golden.get(key), f"{path.name}: {key} differs from the golden file"


def test_every_direction_covers_the_required_cases() -> None:
    required = {"plain_text", "tools", "tools_streamed", "multi_turn_tool_results", "system_prompt",
                "stop_sequences", "refusal", "max_tokens"}
    for direction in (A_CLIENT, O_CLIENT):
        assert required <= {case for d, case in CASES if d == direction}, direction


def test_stream_outputs_are_valid_sse_for_their_client() -> None:
    """Every rendered Anthropic frame names its event; every OpenAI stream ends with [DONE]."""
    for direction, case in CASES:
        golden = json.loads((GOLDEN / direction / f"{case}.json").read_text())
        frames = golden.get("stream_out") or []
        if not frames:
            continue
        if direction == A_CLIENT:
            for frame in frames:
                name, data = frame.split("\n")
                assert name.startswith("event: ") and data.startswith("data: ")
                assert orjson.loads(data[6:])["type"] == name[7:]
        elif golden["stream_done"]:
            assert frames[-1] == "data: [DONE]"


def test_untranslatable_answer_is_an_error_not_a_guess() -> None:
    with pytest.raises(TranslationError):
        response_from_openai({"error": "nope"})
