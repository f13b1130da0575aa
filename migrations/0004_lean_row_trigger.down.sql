-- Reverts 0004: the row trigger remembers what it notified in `pgstash.notified` again,
-- exactly as 0002 installed it.
CREATE OR REPLACE FUNCTION pgstash.notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    kind text := CASE WHEN TG_OP = 'TRUNCATE' THEN 'table' ELSE 'rows' END;
    marker text := ',' || kind || ':' || TG_RELID::text || ',';
    sent text := coalesce(current_setting('pgstash.notified', true), '');
BEGIN
    IF strpos(sent, marker) > 0 THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('pgstash.notified', sent || marker, true);
    PERFORM pg_notify('pgstash_invalidate', json_build_object(
        'v', 1, 'kind', kind, 'op', TG_OP,
        'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
        'ts', extract(epoch FROM clock_timestamp()),
        'xid', pg_current_xact_id_if_assigned()::text)::text);
    RETURN NULL;
END
$$;
