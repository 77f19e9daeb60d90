-- The relay's per-message outcomes and per-person order (issue 14, items 12 and 13).
--
-- A row the broker refused (nack, e.g. a full downstream queue with reject-publish) is retried
-- with backoff on its own, without holding back other people's rows.
ALTER TABLE outbox
    ADD COLUMN attempts        integer     NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at timestamptz,
    ADD COLUMN last_error      text,
    -- sha256 of the (page_id, login_id) the event is about, and the event's place in that
    -- person's commit order (1, 2, ...). Rows written before this migration have neither and
    -- are not ordered.
    ADD COLUMN person_key      bytea,
    ADD COLUMN person_seq      bigint;

-- The relay publishes a person's row only when no earlier row of that person is unpublished.
CREATE INDEX outbox_unpublished_person ON outbox (person_key, person_seq)
    WHERE published_at IS NULL;

-- One counter per person. Incrementing it row-locks it until the writer commits, so two
-- transactions writing events for the same person take their numbers in commit order. Only
-- a hash of the ids is kept (the counter outlives deletion of the person's data).
CREATE TABLE outbox_person_seq (
    person_key bytea  PRIMARY KEY,
    seq        bigint NOT NULL
);
