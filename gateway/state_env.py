"""Store URLs from the environment: `state.database_url_env` / `state.redis_url_env`.

A PostgreSQL or Redis URL usually carries a password, so a deployment keeps it in a secret
(a Kubernetes Secret, an operator-generated `uri` key) and names the variable in the config,
the way providers name theirs with `api_key_env`. The URL is read once, when the config is
loaded: an unset variable is a config error (`check` and `serve` stop before anything
starts), never a silent fallback to another store. The value never appears in an error.
"""
from __future__ import annotations

import os
from typing import Any

#: (the URL field, the field naming the env var that holds it)
_PAIRS = (("database_url", "database_url_env"), ("redis_url", "redis_url_env"))


def urls_from_env(data: Any) -> Any:
    """``state`` as written, with each ``*_url_env`` replaced by the URL it names.

    Runs before field validation, so a URL from the environment is checked exactly like one
    written in the file (scheme, type)."""
    if not isinstance(data, dict):
        return data
    resolved, problems = dict(data), []
    for url_field, env_field in _PAIRS:
        name = data.get(env_field)
        if not isinstance(name, str):
            continue  # absent (None) or the wrong type: field validation reports the latter
        value = os.environ.get(name)
        if data.get(url_field) is not None:
            problems.append(f"set {url_field} or {env_field}, not both")
        elif not value:
            problems.append(f"{env_field}: ${name} is not set (it holds the {url_field})")
        else:
            resolved[url_field] = value
    if problems:
        raise ValueError("; ".join(problems))
    return resolved
