-- Receipts of user data deletion requests (Meta's data deletion callback), written by the
-- scheduler in the transaction that deletes the person's opt-ins and links and writes their
-- identity.deleted events. Only counts are kept, never the ids that were deleted: the row is
-- what GET /data-deletion/{code} reports. A request without a row yet is still pending.
CREATE TABLE data_deletions (
    confirmation_code text        PRIMARY KEY,
    requested_at      timestamptz NOT NULL,
    completed_at      timestamptz NOT NULL,
    -- (page, login_id) pairs derived from the request.
    identities        integer     NOT NULL,
    deleted_optins    integer     NOT NULL,
    deleted_links     integer     NOT NULL
);
