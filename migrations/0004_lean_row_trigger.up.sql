-- A cheaper row trigger for the NOTIFY source: same payload format as 0002, less work per
-- statement.
--
-- 0002's trigger remembered the tables it had notified in the transaction-local setting
-- `pgstash.notified` (read with current_setting, appended with set_config), so that a
-- transaction writing a table many times sent one notification. Measured with pgbench's
-- tpcb-like workload (32 clients, straight to Postgres), that bookkeeping cost about as
-- much as the notification itself: a bare pg_notify per statement kept ~0.9 of the TPS
-- without triggers, 0002's trigger ~0.75.
--
-- This one keeps the bound on notifications without any bookkeeping, by letting Postgres
-- do it: NOTIFY drops a notification identical to one already queued by the same
-- (sub)transaction. The payload is therefore made the same for every statement of a
-- transaction that writes a table the same way:
-- * "ts" is now the transaction's start, now(), instead of the time of its first write to
--   the table (clock_timestamp()). Both are upper bounds of the staleness the listener
--   measures from it; for the single-statement transactions that are most writes they are
--   the same.
-- * "op" and "xid" are as before. A transaction thus sends at most one notification per
--   table and kind of write (INSERT, UPDATE, DELETE; TRUNCATE is kind "table"), plus one
--   for writes made before it had a transaction id (statements that changed no row).
-- Savepoints keep their meaning: a notification queued inside a savepoint that rolls back
-- is dropped with it, and one queued before the savepoint stays.
--
-- plpgsql evaluates assignments as simple expressions, without the executor round trip
-- that PERFORM takes, hence `done := ...`.
CREATE OR REPLACE FUNCTION pgstash.notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    done text;
BEGIN
    done := pg_notify('pgstash_invalidate', json_build_object(
        'v', 1, 'kind', CASE WHEN TG_OP = 'TRUNCATE' THEN 'table' ELSE 'rows' END,
        'op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
        'ts', extract(epoch FROM now()),
        'xid', pg_current_xact_id_if_assigned()::text)::text)::text;
    RETURN NULL;
END
$$;
