-- The NOTIFY row trigger builds its payload by concatenation instead of json_build_object.
--
-- Same payload as 0004, field for field (JSON without the spaces json_build_object puts
-- around its separators, which no JSON reader minds), and still the same text for every
-- statement of a transaction that writes a table the same way, so Postgres' duplicate
-- suppression bounds the notifications as before. Names are JSON-quoted by to_json, the
-- timestamp is numeric text (never an exponent), the xid a JSON string or null.
--
-- Why: pgbench tpcb-like (W4) straight to a local Postgres, 32 clients, 8 s runs
-- interleaved over 3 rounds: no triggers ~2500 TPS, 0004's body ~1880, this body ~1990,
-- a trigger whose body does nothing ~2510. The call itself costs nothing measurable; most
-- of what is left is NOTIFY's own (queueing, and the lock that serialises the commits of
-- notifying transactions).
CREATE OR REPLACE FUNCTION pgstash.notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    done text;
BEGIN
    done := pg_notify('pgstash_invalidate',
        '{"v":1,"kind":"' || CASE WHEN TG_OP = 'TRUNCATE' THEN 'table' ELSE 'rows' END
        || '","op":"' || TG_OP
        || '","schema":' || to_json(TG_TABLE_SCHEMA)::text
        || ',"table":' || to_json(TG_TABLE_NAME)::text
        || ',"ts":' || extract(epoch FROM now())::text
        || ',"xid":' || coalesce(to_json(pg_current_xact_id_if_assigned()::text)::text, 'null')
        || '}')::text;
    RETURN NULL;
END
$$;
