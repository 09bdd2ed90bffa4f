"""state.database_url_env / state.redis_url_env: store URLs (with their passwords) from the
environment, checked like URLs written in the file, and never echoed in an error."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from routing_policies import SourceError
from tests.harness import base_config, write_config

PG = "postgresql://gateway:s3cret-pw@db.internal:5432/gateway?sslmode=require"
REDIS = "redis://:r3dis-pw@cache.internal:6379/0"


def config_with_state(tmp_path: Path, state: dict[str, Any]) -> Path:
    config = base_config("http://127.0.0.1:9", tmp_path)
    config["state"] = state
    return write_config(tmp_path, config)


def load_errors(path: Path) -> list[str]:
    with pytest.raises(SourceError) as raised:
        load_config(path)
    return raised.value.errors


def test_urls_come_from_the_named_env_vars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_DB_URL", PG)
    monkeypatch.setenv("MY_REDIS_URL", REDIS)
    path = config_with_state(tmp_path, {"database_url_env": "MY_DB_URL", "redis_url_env": "MY_REDIS_URL",
                                        "redis_url": None})
    state = load_config(path).config.state
    assert (state.database_url, state.redis_url) == (PG, REDIS)
    assert (state.database_url_env, state.redis_url_env) == ("MY_DB_URL", "MY_REDIS_URL")


@pytest.mark.parametrize("state,expected", [
    ({"database_url_env": "NOPE_DB"},
     ["state: database_url_env: $NOPE_DB is not set (it holds the database_url)"]),
    ({"database_url_env": "NOPE_DB", "redis_url_env": "NOPE_REDIS"},
     [("state: database_url_env: $NOPE_DB is not set (it holds the database_url); "
       "redis_url_env: $NOPE_REDIS is not set (it holds the redis_url)")]),
    ({"database_url": "sqlite:///x.db", "database_url_env": "SET_DB"},
     ["state: set database_url or database_url_env, not both"]),
])
def test_missing_or_conflicting_env_is_a_config_error_with_its_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: dict[str, Any], expected: list[str]) -> None:
    monkeypatch.delenv("NOPE_DB", raising=False)
    monkeypatch.delenv("NOPE_REDIS", raising=False)
    monkeypatch.setenv("SET_DB", PG)
    path = config_with_state(tmp_path, state)
    line = path.read_text().splitlines().index("state:") + 1
    assert load_errors(path) == [f"{path}:{line}: {message}" for message in expected]


def test_an_env_url_is_validated_without_showing_its_password(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_DB_URL", "mysql://gateway:s3cret-pw@db.internal/gateway")
    errors = load_errors(config_with_state(tmp_path, {"database_url_env": "MY_DB_URL"}))
    assert len(errors) == 1 and "database_url must start with sqlite:/// or postgresql://" in errors[0]
    assert "s3cret-pw" not in errors[0] and "mysql" not in errors[0]


def test_an_empty_env_var_counts_as_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_REDIS_URL", "")
    errors = load_errors(config_with_state(tmp_path, {"redis_url_env": "MY_REDIS_URL"}))
    assert len(errors) == 1 and errors[0].endswith("state: redis_url_env: $MY_REDIS_URL is not set (it holds the redis_url)")
