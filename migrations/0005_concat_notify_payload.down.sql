-- Reverts 0005: the row trigger builds its payload with json_build_object again, exactly
-- as 0004 installed it.
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
