-- Removes the notify triggers: event triggers first, so the drops below report nothing.
DROP EVENT TRIGGER pgstash_ddl_command_end;
DROP EVENT TRIGGER pgstash_sql_drop;
DROP FUNCTION pgstash.on_ddl_command_end(), pgstash.on_sql_drop(), pgstash.install_triggers(),
    pgstash.relation_changed(oid, text), pgstash.ensure_trigger(oid);
-- CASCADE: the trigger named pgstash_notify on every table depends on it.
DROP FUNCTION pgstash.notify_change() CASCADE;
DROP TABLE pgstash.relation_names;
DROP VIEW pgstash.user_relations;
-- From now on nothing tells a running listener about writes: say so (at commit), so that it
-- stops vouching for this database instead of silently serving stale reads.
SELECT pgstash.send('uninstalled', 'pgstash migrate down', NULL, NULL);
DROP FUNCTION pgstash.send(text, text, text, text);
