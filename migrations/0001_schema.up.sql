-- The schema that holds everything pgstash installs in a database.
--
-- The migration runner creates this schema itself before the first migration, because its
-- bookkeeping table (pgstash.schema_migrations) lives here; from then on the schema belongs
-- to this migration. No privileges are granted on it: ordinary roles never need to name
-- anything in it (triggers call their functions by OID, and the DDL hooks run as their owner).
CREATE SCHEMA IF NOT EXISTS pgstash;
COMMENT ON SCHEMA pgstash IS 'Installed by pgstash, a caching proxy; manage with `pgstash migrate`.';
