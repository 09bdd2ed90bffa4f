"""The budgets schema in PostgreSQL, as ordered migrations (see ``budgets.pgmigrate``).

``ledger_entries`` holds one row per (request id, attempt) for every backend that uses
PostgreSQL. ``budget_counters`` and ``budget_reservations`` are used only by
``PostgresLedger`` (reservations under a per-tenant advisory lock); ``RedisLedger`` keeps
those in Redis. Money is exact ``NUMERIC``; ``cost_nano_usd`` mirrors SQLite's column so
reports round identically on every backend.
"""

from __future__ import annotations

from budgets.pgmigrate import Migration

COMPONENT = "budgets"

_V1 = """
CREATE TABLE IF NOT EXISTS ledger_entries (
    request_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    cost_usd NUMERIC NOT NULL,
    cost_nano_usd BIGINT NOT NULL,
    usage_estimated BOOLEAN NOT NULL,
    status TEXT NOT NULL,
    price_version TEXT NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (request_id, attempt)
);
CREATE INDEX IF NOT EXISTS ledger_entries_tenant_ts ON ledger_entries (tenant, ts);
CREATE INDEX IF NOT EXISTS ledger_entries_ts ON ledger_entries (ts);
CREATE TABLE IF NOT EXISTS budget_alerts (
    tenant TEXT NOT NULL,
    window_key TEXT NOT NULL,
    fraction TEXT NOT NULL,
    claimed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, window_key, fraction)
);
CREATE TABLE IF NOT EXISTS budget_counters (
    tenant TEXT NOT NULL,
    window_key TEXT NOT NULL,
    window_end TIMESTAMPTZ,
    spent_tokens BIGINT NOT NULL,
    spent_usd NUMERIC NOT NULL,
    held_tokens BIGINT NOT NULL DEFAULT 0,
    held_usd NUMERIC NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, window_key)
);
CREATE TABLE IF NOT EXISTS budget_reservations (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    tokens BIGINT NOT NULL,
    usd NUMERIC NOT NULL,
    window_keys TEXT[] NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    ref JSONB
);
CREATE INDEX IF NOT EXISTS budget_reservations_expires ON budget_reservations (expires_at);

-- Load the counters of every window in p_keys that is not loaded yet, from the rows.
-- Holds the tenant's lock until the caller's transaction ends.
CREATE OR REPLACE FUNCTION gw_budget_ensure(
    p_tenant TEXT, p_keys TEXT[], p_starts TIMESTAMPTZ[], p_ends TIMESTAMPTZ[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    i INTEGER;
    t BIGINT;
    u NUMERIC;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('gw-budget:' || p_tenant, 0));
    FOR i IN 1 .. coalesce(array_length(p_keys, 1), 0) LOOP
        IF NOT EXISTS (SELECT 1 FROM budget_counters
                       WHERE tenant = p_tenant AND window_key = p_keys[i]) THEN
            SELECT coalesce(sum(input_tokens + cached_input_tokens + output_tokens), 0),
                   coalesce(sum(cost_usd), 0)
              INTO t, u FROM ledger_entries
             WHERE tenant = p_tenant
               AND (p_starts[i] IS NULL OR ts >= p_starts[i])
               AND (p_ends[i] IS NULL OR ts < p_ends[i]);
            INSERT INTO budget_counters (tenant, window_key, window_end, spent_tokens, spent_usd)
            VALUES (p_tenant, p_keys[i], p_ends[i], t, u);
        END IF;
    END LOOP;
END $$;

-- Check every cap and hold the amounts, atomically for the tenant. Idempotent per p_id.
-- Returns ('ok', 0, 0) or (kind, 1-based index of the window that refused, used so far).
CREATE OR REPLACE FUNCTION gw_budget_reserve(
    p_tenant TEXT, p_keys TEXT[], p_starts TIMESTAMPTZ[], p_ends TIMESTAMPTZ[],
    p_max_tokens BIGINT[], p_max_usd NUMERIC[], p_tokens BIGINT, p_usd NUMERIC,
    p_id TEXT, p_created TIMESTAMPTZ, p_expires TIMESTAMPTZ, p_ref JSONB
) RETURNS TABLE (kind TEXT, idx INTEGER, used NUMERIC) LANGUAGE plpgsql AS $$
DECLARE
    i INTEGER;
    c RECORD;
BEGIN
    PERFORM gw_budget_ensure(p_tenant, p_keys, p_starts, p_ends);
    IF EXISTS (SELECT 1 FROM budget_reservations WHERE id = p_id) THEN
        RETURN QUERY SELECT 'ok'::TEXT, 0, 0::NUMERIC;
        RETURN;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_keys, 1), 0) LOOP
        SELECT * INTO c FROM budget_counters WHERE tenant = p_tenant AND window_key = p_keys[i];
        IF p_max_tokens[i] IS NOT NULL
           AND c.spent_tokens + c.held_tokens + p_tokens > p_max_tokens[i] THEN
            RETURN QUERY SELECT 'tokens'::TEXT, i, (c.spent_tokens + c.held_tokens)::NUMERIC;
            RETURN;
        END IF;
        IF p_max_usd[i] IS NOT NULL AND c.spent_usd + c.held_usd + p_usd > p_max_usd[i] THEN
            RETURN QUERY SELECT 'usd'::TEXT, i, c.spent_usd + c.held_usd;
            RETURN;
        END IF;
    END LOOP;
    UPDATE budget_counters SET held_tokens = held_tokens + p_tokens, held_usd = held_usd + p_usd
     WHERE tenant = p_tenant AND window_key = ANY(p_keys);
    INSERT INTO budget_reservations (id, tenant, tokens, usd, window_keys, created_at, expires_at, ref)
    VALUES (p_id, p_tenant, p_tokens, p_usd, ARRAY(SELECT DISTINCT k FROM unnest(p_keys) AS k),
            p_created, p_expires, p_ref);
    RETURN QUERY SELECT 'ok'::TEXT, 0, 0::NUMERIC;
END $$;
"""

# Cache writes and the provider's raw usage per row; the rates behind each price version.
_V2 = """
ALTER TABLE ledger_entries ADD COLUMN IF NOT EXISTS cache_write_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE ledger_entries ADD COLUMN IF NOT EXISTS usage_raw JSONB;
CREATE TABLE IF NOT EXISTS price_versions (
    version TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    input_usd_per_mtok NUMERIC NOT NULL,
    output_usd_per_mtok NUMERIC NOT NULL,
    cached_input_usd_per_mtok NUMERIC,
    cache_write_usd_per_mtok NUMERIC,
    first_seen TIMESTAMPTZ NOT NULL DEFAULT now()
);
"""

MIGRATIONS = (
    Migration(1, "ledger, alerts, counters, reservations", _V1),
    Migration(2, "ledger cache writes and raw usage, price versions", _V2),
)
