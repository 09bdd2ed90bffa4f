"""The `gateway` command (CONTRACT section 2)."""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import orjson

from gateway.config import LoadedConfig, availability_notes, load_config
from gateway.settings import Settings
from routing_policies import SourceError


class UsageError(Exception):
    """What the user gave cannot be used (its message is the whole explanation)."""


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
    except UsageError as exc:  # a bad argument or input file: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="Model gateway and policy-based router")
    sub = p.add_subparsers(dest="command")

    def cmd(name: str, func: object, help_: str, parent: argparse._SubParsersAction = sub) -> argparse.ArgumentParser:  # type: ignore[type-arg]
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_)
        sp.add_argument("--config", required=True, help="gateway config YAML")
        sp.set_defaults(func=func)
        return sp

    sp = cmd("serve", _serve, "serve until SIGTERM/SIGINT, then drain")
    sp.add_argument("--host")
    sp.add_argument("--port", type=int)
    sp.add_argument("--workers", type=int)
    cmd("check", _check, "validate the config and its policies")
    sp = cmd("migrate", _migrate, "create or upgrade the PostgreSQL schema (SQLite needs none)")
    sp.add_argument("--status", action="store_true", help="only list the pending migrations")
    sp = cmd("explain", _explain, "print the routing decision for a request without sending it")
    sp.add_argument("--tenant", required=True)
    sp.add_argument("--model", required=True)
    sp.add_argument("--body", help="request body JSON file: OpenAI chat/embeddings or Anthropic Messages")
    sp.add_argument("--api", choices=["openai", "anthropic"],
                    help="the body's format (default: detected from its shape)")
    sp.add_argument("--data-class", dest="data_class", choices=["public", "internal", "confidential", "restricted"],
                    help="as the x-gateway-data-class header: can only raise the tenant's class")
    sp.add_argument("--json", action="store_true")

    policy = sub.add_parser("policy", help="policy tools").add_subparsers(dest="policy_command")
    cmd("test", _policy_test, "run every policy's tests: cases", policy)
    sp = cmd("simulate", _policy_simulate, "replay recorded audit metadata under a new policy file", policy)
    sp.add_argument("--policy", required=True, help="the new version of a policy (YAML)")
    sp.add_argument("--since")
    sp.add_argument("--until")
    sp.add_argument("--audit", help="replay this JSON-lines audit export instead of the state database")
    sp.add_argument("--format", choices=["table", "json"], default="table")

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
    sp.add_argument("--model")
    sp.add_argument("--by", default="tenant,model,day")
    sp.add_argument("--format", choices=["table", "csv", "json"], default="table",
                    help="csv with the default --by is FOCUS: one row per tenant x model x day x token type")

    # Not `cmd`: --config may come before or after `verify`.
    sp = sub.add_parser("audit", help="the redacted audit trail; `audit verify` checks its hash chain")
    sp.add_argument("--config", help="gateway config YAML")
    sp.set_defaults(func=_audit)
    sp.add_argument("--tenant")
    sp.add_argument("--since")
    sp.add_argument("--until")
    sp.add_argument("--kind", choices=["request", "admin", "purge"])
    sp.add_argument("--format", choices=["jsonl", "table"], default="jsonl")
    sp.add_argument("--limit", type=int, default=1000)
    verify = sp.add_subparsers(dest="audit_command").add_parser("verify", help="check the audit hash chain")
    verify.add_argument("--config", default=argparse.SUPPRESS, help="gateway config YAML")
    verify.add_argument("--jsonl", action="append", default=[], metavar="FILE",
                        help="also check another replica's JSON-lines copy (repeatable)")
    verify.set_defaults(func=_audit_verify)
    return p


def _load(args: argparse.Namespace) -> LoadedConfig:
    return load_config(args.config)


def _check(args: argparse.Namespace) -> int:
    loaded = _load(args)
    for note in loaded.warnings:
        print(f"warning: {note}")
    for note in availability_notes(loaded):
        print(note)
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
    from gateway.errors import InvalidRequest
    from gateway.explain import explain_offline, explain_text, read_body_file

    loaded = _load(args)
    try:
        body = read_body_file(args.body) if args.body else None
        result = explain_offline(loaded, args.tenant, args.model, body, args.data_class, args.api)
    except InvalidRequest as exc:
        raise UsageError(f"--body {args.body}: {exc.message}" if args.body else exc.message) from None
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        print(explain_text(result))
    return 0 if result.get("outcome") == "ok" else 1


def _policy_simulate(args: argparse.Namespace) -> int:
    from gateway.simulate import run_simulation

    loaded = _load(args)
    print(run_simulation(loaded, args.policy, since=_parse_date(args.since, flag="--since"),
                         until=_parse_date(args.until, end=True, flag="--until"),
                         audit_file=args.audit, fmt=args.format))
    return 0


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


def _migrate(args: argparse.Namespace) -> int:
    from gateway.migrate import migrate_command

    return migrate_command(_load(args), status_only=args.status)


def _key_admin(loaded: LoadedConfig):  # type: ignore[no-untyped-def]
    from gateway.keys import KeyAdmin

    return KeyAdmin(loaded.database)


def _keys_create(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if args.tenant not in loaded.tenants:
        print(f"error: unknown tenant {args.tenant!r}", file=sys.stderr)
        return 1
    key, record = _key_admin(loaded).create(args.tenant, args.name, args.expires_in)
    _audit_admin(loaded, "key.created", record.tenant, {"key_id": record.id, "name": record.name})
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
        _audit_admin(loaded, "key.revoked", None, {"key_id": args.key_id})
        print(f"revoked {args.key_id}")
        return 0
    print(f"error: no active key {args.key_id!r}", file=sys.stderr)
    return 1


def _parse_date(value: str | None, *, end: bool = False, flag: str = "date") -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{flag}: {value!r} is not a date (YYYY-MM-DD) or an ISO 8601 timestamp") from None
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if end and len(value) == 10:
        parsed += timedelta(days=1)  # --until 2026-11-25 includes that whole day
    return parsed


def _spend(args: argparse.Namespace) -> int:
    from gateway.reports import spend_command

    return spend_command(_load(args), by=args.by, fmt=args.format, tenant=args.tenant, model=args.model,
                         since=args.since, until=args.until)


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
    from gateway.reports import audit_command

    if not args.config:
        print("error: --config is required", file=sys.stderr)
        return 2
    return audit_command(_load(args), fmt=args.format, tenant=args.tenant, since=args.since, until=args.until,
                         kind=args.kind, limit=args.limit)


def _audit_verify(args: argparse.Namespace) -> int:
    from gateway.reports import audit_verify_command

    if not getattr(args, "config", None):
        print("error: --config is required", file=sys.stderr)
        return 2
    return audit_verify_command(_load(args), args.jsonl)


def _audit_admin(loaded: LoadedConfig, action: str, tenant: str | None, details: dict[str, object]) -> None:
    from gateway.audit import admin_record, append_now

    record = admin_record(action, tenant=tenant, actor="cli", details=details)
    append_now(loaded.database, loaded.audit_jsonl_path, [record])  # type: ignore[arg-type]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
