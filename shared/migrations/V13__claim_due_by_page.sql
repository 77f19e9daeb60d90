-- The claim finds a page's due rows through this index when they are few (issue 18, "claim
-- p99 with 1M pending, incl. 300k on a paused page"). optins_pending_by_page gives a page's
-- rows in deadline order, but when most of them are not yet due (delayed sends, scheduled
-- retries) and the few due ones are the newest, walking it reads the whole page for a handful
-- of rows: 0.6–1.4 s per claim with 1M pending of which 300k were due on one paused page,
-- because those due rows made the planner believe 30 % of every page's rows were due. With
-- this index the claim counts a page's due rows (bounded, index only) and, when there are
-- few, reads exactly them (worker/src/scheduler/store/claim.rs).
--
-- Migrations run in a transaction, so this is not CREATE INDEX CONCURRENTLY: it blocks writes
-- to optins while it builds (about 1.5 s per million pending rows on the bench machine; the
-- index covers pending rows only).
CREATE INDEX optins_pending_due_by_page ON optins (page_id, next_attempt_at) INCLUDE (deadline)
    WHERE state = 'pending';
