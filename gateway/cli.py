"""The `gateway` command (CONTRACT section 2)."""
from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from gateway.config import LoadedConfig, load_config
from gateway.settings import Settings
from routing_policies import SourceError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except SourceError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="Model gateway and policy-based router")
    sub = p.add_subparsers(dest="command")

    def cmd(name: str, func: object, help_: str, parent: argparse._SubParsersAction = sub) -> argparse.ArgumentParser:  # type: ignore[type-arg]
        sp = parent.add_parser(name, help=help_)
        sp.add_argument("--config", required=True, help="gateway config YAML")
        sp.set_defaults(func=func)
        return sp

    sp = cmd("serve", _serve, "serve until SIGTERM/SIGINT, then drain")
    sp.add_argument("--host")
    sp.add_argument("--port", type=int)
    sp.add_argument("--workers", type=int)
    cmd("check", _check, "validate the config and its policies")
    sp = cmd("explain", _explain, "print the routing decision for a request without sending it")
    sp.add_argument("--tenant", required=True)
    sp.add_argument("--model", required=True)
    sp.add_argument("--body", help="request body JSON file (OpenAI chat format)")
    sp.add_argument("--json", action="store_true")

    policy = sub.add_parser("policy", help="policy tools").add_subparsers(dest="policy_command")
    cmd("test", _policy_test, "run every policy's tests: cases", policy)

    keys = sub.add_parser("keys", help="tenant API keys").add_subparsers(dest="keys_command")
    sp = cmd("create", _keys_create, "create a key (printed once)", keys)
    sp.add_argument("--tenant", required=True)
    sp.add_argument("--name", default="")
    sp.add_argument("--expires-in", type=int, dest="expires_in", help="days")
    sp = cmd("list", _keys_list, "list keys (never the key itself)", keys)
    sp.add_argument("--tenant")
    sp = cmd("revoke", _keys_revoke, "revoke a key at once", keys)
    sp.add_argument("key_id")

    sp = cmd("spend", _spend, "FinOps report from the ledger")
    sp.add_argument("--tenant")
    sp.add_argument("--since")
    sp.add_argument("--until")
    sp.add_argument("--by", default="tenant,model,day")
    sp.add_argument("--format", choices=["table", "csv", "json"], default="table")

    sp = cmd("audit", _audit, "the redacted audit trail")
    sp.add_argument("--tenant")
    sp.add_argument("--since")
    sp.add_argument("--format", choices=["jsonl", "table"], default="jsonl")
    sp.add_argument("--limit", type=int, default=1000)
    return p


def _load(args: argparse.Namespace) -> LoadedConfig:
    return load_config(args.config)


def _check(args: argparse.Namespace) -> int:
    loaded = _load(args)
    for note in loaded.warnings:
        print(f"warning: {note}")
    print(f"ok: {len(loaded.providers)} providers, {len(loaded.models)} models, "
          f"{len(loaded.tenants)} tenants, {len(loaded.policies)} policies")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from gateway.serve import serve

    loaded = _load(args)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("workers", args.workers)) if v is not None}
    settings = Settings(**overrides)
    return serve(loaded, settings)


def _explain(args: argparse.Namespace) -> int:
    from gateway.explain import explain

    loaded = _load(args)
    body = orjson.loads(Path(args.body).read_bytes()) if args.body else None
    result = explain(loaded, args.tenant, args.model, body)
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        print(_explain_text(result))
    return 0 if result.get("outcome") == "ok" else 1


def _explain_text(result: dict[str, object]) -> str:
    lines = [f"route:     {result['route']}", f"outcome:   {result['outcome']}",
             f"chosen:    {result['chosen']}", f"fallbacks: {', '.join(result['fallbacks']) or '-'}",  # type: ignore[arg-type]
             f"reason:    {result['reason']}", f"est. cost: ${result['estimated_cost_usd']}"]
    rejected = result.get("rejected") or []
    if rejected:
        lines.append("excluded:")
        lines.extend(f"  - {r['model']}: {r['reason']}" for r in rejected)  # type: ignore[attr-defined, index]
    return "\n".join(lines)


def _policy_test(args: argparse.Namespace) -> int:
    from gateway.explain import run_all_policy_tests

    loaded = _load(args)
    failures = 0
    total = 0
    for policy_name, test, got, passed in run_all_policy_tests(loaded):
        total += 1
        mark = "PASS" if passed else "FAIL"
        print(f"{mark} {policy_name}: tenant={test.tenant} model={test.model} expected={test.expect} got={got}")
        failures += 0 if passed else 1
    print(f"{total - failures} passed, {failures} failed")
    return 1 if failures else 0


def _key_admin(loaded: LoadedConfig):  # type: ignore[no-untyped-def]
    from gateway.keys import KeyAdmin

    if loaded.sqlite_path is None:
        raise SystemExit("only sqlite:/// state is supported by this build")
    return KeyAdmin(loaded.sqlite_path)


def _keys_create(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if args.tenant not in loaded.tenants:
        print(f"error: unknown tenant {args.tenant!r}", file=sys.stderr)
        return 1
    key, record = _key_admin(loaded).create(args.tenant, args.name, args.expires_in)
    print(key)
    print(f"# id {record.id}, tenant {record.tenant}; shown once: only its SHA-256 is stored", file=sys.stderr)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    loaded = _load(args)
    records = _key_admin(loaded).list(args.tenant)
    print(f"{'id':18} {'tenant':16} {'name':16} {'created':26} {'expires':26} {'last used':26} revoked")
    for r in records:
        print(f"{r.id:18} {r.tenant:16} {r.name[:16]:16} {r.created_at:26} {r.expires_at or '-':26} "
              f"{r.last_used_at or '-':26} {r.revoked_at or '-'}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if _key_admin(loaded).revoke(args.key_id):
        print(f"revoked {args.key_id}")
        return 0
    print(f"error: no active key {args.key_id!r}", file=sys.stderr)
    return 1


def _parse_date(value: str | None, *, end: bool = False) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if end and len(value) == 10:
        parsed += timedelta(days=1)  # --until 2026-11-25 includes that whole day
    return parsed


def _spend(args: argparse.Namespace) -> int:
    from budgets import SqliteLedger

    loaded = _load(args)
    group_by = [g for g in args.by.split(",") if g]
    if not set(group_by) <= {"tenant", "model", "day"}:
        print("error: --by must be a subset of tenant,model,day", file=sys.stderr)
        return 1
    assert loaded.sqlite_path is not None

    async def query():  # type: ignore[no-untyped-def]
        ledger = SqliteLedger(str(loaded.sqlite_path))
        try:
            return await ledger.spend(_parse_date(args.since), _parse_date(args.until, end=True), args.tenant, group_by)
        finally:
            await ledger.close()

    rows = asyncio.run(query())
    columns = [*group_by, "requests", "input_tokens", "output_tokens", "cached_input_tokens", "cost_usd"]
    records = [{**r.group, "requests": r.requests, "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
                "cached_input_tokens": r.cached_input_tokens, "cost_usd": str(r.cost_usd)} for r in rows]
    print(_render(records, columns, args.format))
    return 0


def _render(records: list[dict[str, object]], columns: list[str], fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps(records, option=orjson.OPT_INDENT_2).decode()
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return out.getvalue().rstrip("\n")
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in records]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in records]
    return "\n".join(lines)


def _audit(args: argparse.Namespace) -> int:
    from gateway.audit import read_audit

    loaded = _load(args)
    assert loaded.sqlite_path is not None
    records = read_audit(loaded.sqlite_path, since=_parse_date(args.since), tenant=args.tenant, limit=args.limit)
    if args.format == "jsonl":
        for record in records:
            print(orjson.dumps(record).decode())
        return 0
    columns = ["ts", "request_id", "tenant", "route", "model_served", "status", "outcome",
               "input_tokens", "output_tokens", "cost_usd", "latency_ms"]
    print(_render(records, columns, "table"))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
