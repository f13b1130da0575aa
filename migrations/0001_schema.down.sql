-- Reverting the first migration leaves nothing of pgstash in the database. The runner has
-- already dropped its bookkeeping table (it does so when the last applied migration is
-- reverted, in this same transaction), so the schema is empty unless someone put their own
-- objects in it: RESTRICT (the default) then fails instead of dropping them.
DROP SCHEMA pgstash;
