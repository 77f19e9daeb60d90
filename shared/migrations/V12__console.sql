-- The operator console (issue 17, "Web console"): an opt-in's timeline and the lists of
-- opt-ins at risk and of recent failures (worker/src/operate).
--
-- When the current (or last) claim moved the row to 'sending'; set by the claim's UPDATE.
-- Nullable without a default, so adding it rewrites nothing.
ALTER TABLE optins ADD COLUMN claimed_at timestamptz;

-- The timeline lists the outbox rows about one person. outbox_unpublished_person covers only
-- unpublished rows; without this index the look-up would read the whole outbox. person_key is
-- the relay's key (lc_shared::events::person_key, a length-prefixed SHA-256, not the SQL
-- person_key() of V6). Rows without one (operational page events) are left out.
CREATE INDEX outbox_by_person ON outbox (person_key, person_seq) WHERE person_key IS NOT NULL;

-- Recent failures, newest first: failed and expired rows are few among the finished ones, so
-- a small partial index instead of walking optins_finished_at through every sent row.
CREATE INDEX optins_failed_by_finished_at ON optins (finished_at)
    WHERE state IN ('failed', 'expired');
