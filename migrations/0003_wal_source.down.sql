-- Reverts 0003: the DDL hooks report through NOTIFY only again, every user table gets its
-- row trigger back, and the switch is gone. What 0003 replaced is restored as 0002 had it.

-- From this commit on, DDL no longer reaches the WAL: say so in the stream, at this very
-- position, so that a running WAL source stops vouching for the database (it will refuse
-- to start again until `pgstash migrate up`).
SELECT pg_logical_emit_message(true, 'pgstash',
           pgstash.payload('uninstalled', 'pgstash migrate down', NULL, NULL))
 WHERE current_setting('wal_level') = 'logical';

CREATE OR REPLACE FUNCTION pgstash.send(kind text, op text, schema_name text, table_name text)
RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_notify('pgstash_invalidate', json_build_object(
        'v', 1, 'kind', kind, 'op', op,
        'schema', schema_name, 'table', table_name,
        'ts', extract(epoch FROM clock_timestamp()),
        'xid', pg_current_xact_id_if_assigned()::text)::text)
$$;

CREATE OR REPLACE FUNCTION pgstash.ensure_trigger(rel oid) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
BEGIN
    SELECT u.schema_name, u.rel_name INTO r
      FROM pgstash.user_relations u
     WHERE u.relid = rel AND u.relkind IN ('r', 'p');
    IF NOT FOUND OR EXISTS (
        SELECT 1 FROM pg_trigger t WHERE t.tgrelid = rel AND t.tgname = 'pgstash_notify'
    ) THEN
        RETURN false;
    END IF;
    EXECUTE format(
        'CREATE TRIGGER pgstash_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %I.%I '
        'FOR EACH STATEMENT EXECUTE FUNCTION pgstash.notify_change()',
        r.schema_name, r.rel_name);
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION pgstash.on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    obj record;
    whole_database boolean := false;
BEGIN
    FOR obj IN SELECT * FROM pg_event_trigger_dropped_objects() LOOP
        CONTINUE WHEN obj.is_temporary OR obj.schema_name = 'pgstash';
        IF obj.object_type IN ('table', 'view', 'materialized view', 'foreign table') THEN
            DELETE FROM pgstash.relation_names n WHERE n.relid = obj.objid;
            PERFORM pgstash.send('table', tg_tag, obj.schema_name, obj.object_name);
        ELSIF obj.object_type IN ('table column', 'rule', 'policy') THEN
            -- address_names: {schema, relation, column or rule or policy}
            PERFORM pgstash.send('table', tg_tag, obj.address_names[1], obj.address_names[2]);
        ELSIF obj.object_type = 'trigger' THEN
            IF obj.original AND obj.address_names[3] = 'pgstash_notify' THEN
                RAISE WARNING 'pgstash: writes to %.% no longer invalidate the pgstash cache; '
                    'run SELECT pgstash.install_triggers() to restore its trigger',
                    quote_ident(obj.address_names[1]), quote_ident(obj.address_names[2]);
            END IF;
        ELSIF obj.object_type IN ('type', 'domain', 'composite type') AND NOT obj.original THEN
            -- The row types of dropped tables; columns of a dropped type are reported above.
            CONTINUE;
        ELSIF obj.object_type NOT IN ('index', 'index column', 'sequence', 'toast table',
                                      'schema', 'table constraint', 'domain constraint',
                                      'default value', 'statistics object',
                                      'event trigger') THEN
            -- Functions, types named in casts...: reads that used them now fail.
            whole_database := true;
        END IF;
    END LOOP;
    IF whole_database THEN
        PERFORM pgstash.send('database', tg_tag, NULL, NULL);
    END IF;
EXCEPTION WHEN OTHERS THEN
    BEGIN
        RAISE WARNING 'pgstash: % (after %); invalidating the whole database', SQLERRM, tg_tag;
        PERFORM pgstash.send('database', tg_tag, NULL, NULL);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pgstash: could not notify the cache after %: %', tg_tag, SQLERRM;
    END;
END
$$;

DROP FUNCTION pgstash.set_row_triggers(boolean), pgstash.send_unwatched(),
    pgstash.payload(text, text, text, text);
DROP TABLE pgstash.options;

-- Row triggers on every table again: 0002 alone has no way to switch them off.
SELECT pgstash.install_triggers();
