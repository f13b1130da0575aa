-- Reverts 0006: the row trigger sends 0005's JSON payload again, exactly as 0005 built it.
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
