-- Invalidation by NOTIFY (DESIGN.md "Freshness"): every committed change to a user table
-- reaches pgstash as a notification on channel `pgstash_invalidate`, including the changes
-- the SQL text does not show (ON DELETE/UPDATE CASCADE, triggers, functions and procedures
-- that write, other applications). NOTIFY is delivered when the transaction commits and
-- dropped when it (or the savepoint that sent it) rolls back: exactly when the cache must,
-- and must not, invalidate.
--
-- Requirements and limits:
-- * Run as a superuser: only superusers may create event triggers.
-- * PostgreSQL 13 or later (pg_current_xact_id_if_assigned).
-- * A transaction that sent a notification cannot be prepared: PREPARE TRANSACTION fails
--   with "cannot PREPARE a transaction that has executed LISTEN, UNLISTEN, or NOTIFY".
--   Applications that use two-phase commit need the logical replication source instead.
-- * Statement triggers do not fire for rows applied by logical replication, nor while
--   triggers are disabled (session_replication_role = replica, ALTER TABLE ... DISABLE
--   TRIGGER); such writes are not seen.
--
-- Payload, a JSON object well below NOTIFY's 8000-byte limit:
--   {"v": 1,                                      format version
--    "kind": "rows" | "table" | "database" | "uninstalled",
--    "op": "INSERT" | "UPDATE" | "DELETE" | "TRUNCATE" | a DDL command tag,
--    "schema": "public", "table": "t",            for "rows" and "table", else null
--    "ts": 1700000000.123456,                     clock_timestamp() as epoch seconds
--    "xid": "1234"}                               the writing transaction, null if none
-- "rows": rows of the table changed, which ones is not known. "table": the table as a whole
-- (TRUNCATE, DDL, REFRESH MATERIALIZED VIEW). "database": a change that cannot be
-- attributed to tables. "uninstalled": these triggers were removed (down migration).
--
-- Several statements of one transaction writing the same table send one notification, not
-- one each: a batch job doing a million single-row INSERTs would otherwise queue a million
-- notifications (held in the writer's memory until commit). The statement trigger remembers
-- what it sent in the transaction-local setting `pgstash.notified`. Setting changes are
-- undone with the (sub)transaction that made them, just like its notifications, so a rolled
-- back savepoint cannot leave a table marked as sent while its notification is gone. Postgres
-- itself only collapses identical payloads, and ours differ by `ts`; a collapse would be
-- harmless anyway, since identical payloads carry identical information. `ts` is therefore
-- the time of the transaction's first write to the table: the staleness the listener
-- measures from it is an upper bound.

-- The trigger on every user table. It runs as whoever writes the table, so it must not name
-- anything in schema pgstash (ordinary roles have no USAGE on it): it builds the payload
-- itself, with the same shape as pgstash.send below.
CREATE FUNCTION pgstash.notify_change() RETURNS trigger
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

-- One notification from the DDL hooks below; `schema_name` and `table_name` are null for
-- kind "database".
CREATE FUNCTION pgstash.send(kind text, op text, schema_name text, table_name text)
RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_notify('pgstash_invalidate', json_build_object(
        'v', 1, 'kind', kind, 'op', op,
        'schema', schema_name, 'table', table_name,
        'ts', extract(epoch FROM clock_timestamp()),
        'xid', pg_current_xact_id_if_assigned()::text)::text)
$$;

-- The relations whose contents the cache may hold: tables (plain and partitioned), views,
-- materialized views and foreign tables, except temporary ones (private to a session, never
-- cached) and the system's and pgstash's own.
CREATE VIEW pgstash.user_relations AS
SELECT c.oid AS relid, n.nspname::text AS schema_name, c.relname::text AS rel_name, c.relkind
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
   AND c.relpersistence <> 't'
   AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgstash')
   AND n.nspname NOT LIKE 'pg\_toast%'
   AND n.nspname NOT LIKE 'pg\_temp\_%';

-- The name each user relation had when pgstash last saw it. DDL hooks only see a relation's
-- new name, but after ALTER ... RENAME or SET SCHEMA the reads cached under the old name are
-- the ones that must go (Postgres would now fail them).
CREATE TABLE pgstash.relation_names (
    relid oid PRIMARY KEY,
    schema_name text NOT NULL,
    rel_name text NOT NULL
);

-- Installs the statement trigger on one table unless it has it. Partitions get their own:
-- a statement trigger fires only for the table a statement names, so the parent's covers
-- writes through the parent and the partition's covers writes straight to the partition.
CREATE FUNCTION pgstash.ensure_trigger(rel oid) RETURNS boolean
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

-- DDL changed relation `rel` as a whole: tell the listener (under its old name too if it was
-- renamed or moved), remember its name, and make sure a new table gets its trigger.
CREATE FUNCTION pgstash.relation_changed(rel oid, op text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cur_schema text;
    cur_name text;
    old_schema text;
    old_name text;
BEGIN
    SELECT u.schema_name, u.rel_name INTO cur_schema, cur_name
      FROM pgstash.user_relations u WHERE u.relid = rel;
    SELECT n.schema_name, n.rel_name INTO old_schema, old_name
      FROM pgstash.relation_names n WHERE n.relid = rel;
    IF old_name IS NOT NULL
       AND (old_schema, old_name) IS DISTINCT FROM (cur_schema, cur_name) THEN
        PERFORM pgstash.send('table', op, old_schema, old_name);
    END IF;
    IF cur_name IS NULL THEN
        -- Temporary, system, or moved out of sight (e.g. SET SCHEMA pgstash).
        DELETE FROM pgstash.relation_names n WHERE n.relid = rel;
        RETURN;
    END IF;
    INSERT INTO pgstash.relation_names AS n (relid, schema_name, rel_name)
    VALUES (rel, cur_schema, cur_name)
    ON CONFLICT (relid) DO UPDATE
        SET schema_name = EXCLUDED.schema_name, rel_name = EXCLUDED.rel_name;
    PERFORM pgstash.send('table', op, cur_schema, cur_name);
    PERFORM pgstash.ensure_trigger(rel);
END
$$;

-- Installs the trigger on every user table that lacks it and records every user relation's
-- name; returns how many triggers it installed. Idempotent: run it again after restoring
-- tables with event triggers disabled, or after someone dropped a trigger.
CREATE FUNCTION pgstash.install_triggers() RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    installed integer := 0;
BEGIN
    FOR r IN SELECT u.relid, u.schema_name, u.rel_name FROM pgstash.user_relations u LOOP
        INSERT INTO pgstash.relation_names AS n (relid, schema_name, rel_name)
        VALUES (r.relid, r.schema_name, r.rel_name)
        ON CONFLICT (relid) DO UPDATE
            SET schema_name = EXCLUDED.schema_name, rel_name = EXCLUDED.rel_name;
        IF pgstash.ensure_trigger(r.relid) THEN
            installed := installed + 1;
        END IF;
    END LOOP;
    RETURN installed;
END
$$;

-- After every DDL command: the relations it created or changed, REFRESH MATERIALIZED VIEW
-- included, become "table" changes, and new tables get their trigger; what cannot be
-- attributed to relations becomes a "database" change. SECURITY DEFINER because the DDL may
-- come from any role that owns a table, and installing the trigger and remembering names
-- needs pgstash's schema; search_path is pinned so nobody can slip in their own objects.
--
-- This runs inside the user's DDL command, and an error here would abort it: every failure
-- is caught, reported as a WARNING and turned into a "database" change instead (wider, never
-- narrower).
CREATE FUNCTION pgstash.on_ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cmd record;
    kind "char";
    target oid;
    whole_database boolean := false;
BEGIN
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        CONTINUE WHEN cmd.schema_name = 'pgstash';
        target := NULL;
        kind := NULL;
        IF cmd.classid = 'pg_class'::regclass THEN
            SELECT c.relkind INTO kind FROM pg_class c WHERE c.oid = cmd.objid;
            IF kind IN ('r', 'p', 'v', 'm', 'f') THEN
                target := cmd.objid;
            ELSIF kind IN ('i', 'I', 'S', 't') THEN
                -- Indexes, sequences and TOAST tables do not change what a read returns.
                CONTINUE;
            ELSE
                -- Composite types (their rows may live in table columns), vanished relations.
                whole_database := true;
            END IF;
        ELSIF cmd.classid = 'pg_rewrite'::regclass THEN
            SELECT r.ev_class INTO target FROM pg_rewrite r WHERE r.oid = cmd.objid;
        ELSIF cmd.classid = 'pg_policy'::regclass THEN
            SELECT p.polrelid INTO target FROM pg_policy p WHERE p.oid = cmd.objid;
        ELSIF cmd.classid IN ('pg_trigger'::regclass, 'pg_constraint'::regclass,
                              'pg_attrdef'::regclass, 'pg_statistic_ext'::regclass,
                              'pg_event_trigger'::regclass)
              OR (cmd.classid = 'pg_namespace'::regclass AND cmd.command_tag = 'CREATE SCHEMA') THEN
            -- They change what future writes do or how reads are planned, not what is stored.
            CONTINUE;
        ELSE
            -- GRANT/REVOKE (no object), functions (CREATE OR REPLACE changes their results),
            -- types, schemas renamed, extensions...: not attributable to tables.
            whole_database := true;
        END IF;
        IF target IS NOT NULL THEN
            PERFORM pgstash.relation_changed(target, cmd.command_tag);
        ELSE
            whole_database := true;
        END IF;
    END LOOP;
    -- A command that collected nothing changed nothing this hook must report: DROP (the
    -- sql_drop hook reports what went), IF [NOT] EXISTS that found nothing to do, and the
    -- temporary tables REFRESH MATERIALIZED VIEW CONCURRENTLY works with (it hides them).
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

-- After objects are dropped: dropped relations, and the relations whose columns, rules or
-- policies were dropped, become "table" changes. Objects whose loss changes no read that
-- still succeeds (indexes, sequences, constraints, defaults, triggers, schemas: whatever
-- they held is reported on its own) are skipped; anything else (functions, types...) is a
-- "database" change. Defensive like the hook above.
CREATE FUNCTION pgstash.on_sql_drop() RETURNS event_trigger
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

-- Only the hooks and the migration call these (as a superuser); nobody else needs to.
REVOKE ALL ON FUNCTION pgstash.send(text, text, text, text), pgstash.ensure_trigger(oid),
    pgstash.relation_changed(oid, text), pgstash.install_triggers(),
    pgstash.on_ddl_command_end(), pgstash.on_sql_drop() FROM PUBLIC;

SELECT pgstash.install_triggers();

CREATE EVENT TRIGGER pgstash_ddl_command_end ON ddl_command_end
    EXECUTE FUNCTION pgstash.on_ddl_command_end();
CREATE EVENT TRIGGER pgstash_sql_drop ON sql_drop
    EXECUTE FUNCTION pgstash.on_sql_drop();
