-- What invalidation.source = "wal" needs beyond the logical replication stream
-- (DESIGN.md "Freshness"), and a switch that spares its users the row triggers of 0002.
--
-- DDL and REFRESH MATERIALIZED VIEW are not in pgoutput's stream: catalog changes are not
-- decoded, and materialized views are not published. Yet after `ALTER TABLE t ADD COLUMN`
-- a cached `SELECT * FROM t` has the wrong shape, and after a refresh the view's cached
-- rows are stale. The DDL hooks of 0002 see all of this and report it through
-- pgstash.send; from here on send also writes its payload into the WAL as a transactional
-- logical decoding message with prefix 'pgstash' (pg_logical_emit_message(true, ...)).
-- Transactional means: decoded as part of its transaction, at its commit, in commit order,
-- and dropped with the transaction (or the savepoint it was sent in) when that rolls back,
-- exactly like the transaction's row changes. The WAL source confirms a transaction to its
-- slot only once it applied it, so a crash replays the message instead of losing it. The
-- notification is still sent as well: the NOTIFY source listens to the same hooks.
--
-- Requirements and limits, beyond those of 0002:
-- * The message is written only when wal_level = logical (checked at each call); without
--   logical decoding nobody could read it.
-- * The WAL source asks pgoutput for messages (option `messages`, PostgreSQL 14 or later).
-- * Like every event trigger, the hooks do not fire for DDL on objects shared by all
--   databases (roles, tablespaces) nor in sessions with session_replication_role = replica.
-- * Any role may call pg_logical_emit_message, as any role may NOTIFY, so anyone can send
--   a 'pgstash' message. The sources only ever invalidate more (or stop vouching) on what
--   they hear, never less, so that costs cache hits at worst.
-- * The hooks still NOTIFY too (a NOTIFY source may watch a database that has no tables, so
--   no row triggers to miss), so a transaction with DDL still cannot be PREPAREd; with the
--   row triggers off, every other transaction can.
--
-- Row triggers: the statement trigger pgstash_notify on every table is how the NOTIFY source
-- hears about writes. The WAL source reads writes from the stream and has no use for it,
-- yet it queues a notification for every transaction that writes a table. So:
--   SELECT pgstash.set_row_triggers(false);  -- drop them; new tables get none either
--   SELECT pgstash.set_row_triggers(true);   -- (the default) put them back on every table
-- The choice is kept in pgstash.options. Without the triggers the NOTIFY source refuses to
-- vouch for the database: it checks that every user table has an enabled trigger, and the
-- functions below tell it at once (a notification of kind "uninstalled") when a table is
-- left without one, instead of at its next check.

-- Settings of this installation, in one row (the key admits only true).
CREATE TABLE pgstash.options (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- Whether every user table carries the pgstash_notify trigger (set_row_triggers).
    row_triggers boolean NOT NULL
);
INSERT INTO pgstash.options (row_triggers) VALUES (true);

-- A payload in the format described at the top of 0002_notify_triggers.up.sql.
CREATE FUNCTION pgstash.payload(kind text, op text, schema_name text, table_name text)
RETURNS text
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT json_build_object(
        'v', 1, 'kind', kind, 'op', op,
        'schema', schema_name, 'table', table_name,
        'ts', extract(epoch FROM clock_timestamp()),
        'xid', pg_current_xact_id_if_assigned()::text)::text
$$;

-- One report from the DDL hooks, now to both sources. Same signature as 0002's, so the
-- hooks call this one without being replaced themselves.
CREATE OR REPLACE FUNCTION pgstash.send(kind text, op text, schema_name text, table_name text)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    msg text := pgstash.payload(kind, op, schema_name, table_name);
BEGIN
    PERFORM pg_notify('pgstash_invalidate', msg);
    IF current_setting('wal_level') = 'logical' THEN
        PERFORM pg_logical_emit_message(true, 'pgstash', msg);
    END IF;
END
$$;

-- Tells a NOTIFY listener that writes to some table are no longer reported, so that it
-- stops vouching for the database now rather than at its next check (which then says
-- why). NOTIFY only: the WAL source has no use for the row triggers. The payload is the same
-- every time, so Postgres delivers it once per transaction however often this runs.
CREATE FUNCTION pgstash.send_unwatched() RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_notify('pgstash_invalidate',
        '{"v": 1, "kind": "uninstalled", "op": "row triggers off", '
        '"schema": null, "table": null, "ts": null, "xid": null}')
$$;

-- 0002's, except that while the row triggers are switched off it installs nothing and
-- warns a listener instead (a NOTIFY source would not hear this table's writes).
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
    IF NOT (SELECT o.row_triggers FROM pgstash.options o) THEN
        PERFORM pgstash.send_unwatched();
        RETURN false;
    END IF;
    EXECUTE format(
        'CREATE TRIGGER pgstash_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %I.%I '
        'FOR EACH STATEMENT EXECUTE FUNCTION pgstash.notify_change()',
        r.schema_name, r.rel_name);
    RETURN true;
END
$$;

-- Switches the row triggers on (every user table gets an enabled pgstash_notify trigger,
-- including ones someone disabled) or off (every one is dropped); returns how many tables
-- it changed. Dropping a trigger takes an exclusive lock on its table until commit, so run
-- it when the tables are quiet.
CREATE FUNCTION pgstash.set_row_triggers(enabled boolean) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    changed integer := 0;
BEGIN
    IF enabled IS NULL THEN
        RAISE EXCEPTION 'pgstash.set_row_triggers takes true or false, not null';
    END IF;
    -- First, so that the drop hook below knows these drops are wanted.
    UPDATE pgstash.options SET row_triggers = enabled;
    IF enabled THEN
        -- A disabled trigger reports nothing: the NOTIFY source would go on refusing.
        FOR r IN SELECT t.tgrelid::regclass AS rel
                   FROM pg_trigger t JOIN pgstash.user_relations u ON u.relid = t.tgrelid
                  WHERE t.tgname = 'pgstash_notify' AND t.tgenabled NOT IN ('O', 'A') LOOP
            EXECUTE format('ALTER TABLE %s ENABLE TRIGGER pgstash_notify', r.rel);
            changed := changed + 1;
        END LOOP;
        RETURN changed + pgstash.install_triggers();
    END IF;
    FOR r IN SELECT t.tgrelid::regclass AS rel
               FROM pg_trigger t
              WHERE t.tgname = 'pgstash_notify'
                AND t.tgfoid = 'pgstash.notify_change()'::regprocedure LOOP
        -- regclass prints schema-qualified, quoted names under this search_path.
        EXECUTE format('DROP TRIGGER pgstash_notify ON %s', r.rel);
        changed := changed + 1;
    END LOOP;
    PERFORM pgstash.send_unwatched();
    RETURN changed;
END
$$;

-- 0002's, except for dropped pgstash_notify triggers: wanted while the row triggers are
-- off; otherwise a table is now unwatched, which a listener must hear at once.
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
            IF obj.original AND obj.address_names[3] = 'pgstash_notify'
               AND (SELECT o.row_triggers FROM pgstash.options o) THEN
                RAISE WARNING 'pgstash: writes to %.% no longer invalidate the pgstash cache; '
                    'run SELECT pgstash.set_row_triggers(true) to restore its trigger',
                    quote_ident(obj.address_names[1]), quote_ident(obj.address_names[2]);
                PERFORM pgstash.send_unwatched();
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

-- Only the hooks, the migrations and a superuser call these.
REVOKE ALL ON FUNCTION pgstash.payload(text, text, text, text), pgstash.send_unwatched(),
    pgstash.set_row_triggers(boolean) FROM PUBLIC;
