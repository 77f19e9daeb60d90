-- Claims of a backlog that is mostly not yet due (delayed sends, scheduled retries) find the
-- due rows through this index instead of walking every pending row in deadline order
-- (measured in BENCHMARKS.md: claim p50 212 ms → 1.4 ms with 1M pending). When everything is
-- due the planner keeps using optins_pending_by_deadline (earliest deadline first).
CREATE INDEX optins_pending_by_next_attempt ON optins (next_attempt_at) INCLUDE (deadline)
    WHERE state = 'pending';
