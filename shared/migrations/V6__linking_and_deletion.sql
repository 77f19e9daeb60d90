-- Issue 14, items 1, 8 and 9: who may link, never a second first message, never a deleted
-- person back.
--
-- Person keys below are `person_key(page_id, login_id)` = sha256(page_id || LF || login_id),
-- so these records keep no ids in the clear (ids never hold control characters: the workers
-- refuse them before the database, so the separator is unambiguous).
CREATE FUNCTION person_key(page_id text, login_id text) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT sha256(convert_to(page_id || E'\n' || login_id, 'UTF8')) $$;

-- Replies whose `prior_message` came from a source that may not link (anything but the
-- allow-list CORRELATOR_LINK_SOURCES, default `login_connect`; e.g. a checkbox plugin's
-- client-chosen `user_ref`). Never linked; kept here for inspection, once per
-- (page, login_id, psid, mid). Deleted with the person by a data deletion request.
CREATE TABLE foreign_prior_messages (
    id          bigserial   PRIMARY KEY,
    page_id     text        NOT NULL,
    login_id    text        NOT NULL,
    psid        text        NOT NULL,
    mid         text,
    source      text,
    replied_at  timestamptz NOT NULL,
    seen_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX foreign_prior_messages_once
    ON foreign_prior_messages (page_id, login_id, psid, COALESCE(mid, ''));

-- The permanent record of people who were sent a first message (or may have been: an
-- unknown outcome) or who replied, written when housekeeping prunes their finished opt-in
-- after OPTIN_RETENTION_DAYS. It stands in for the pruned row: a login event never opens a
-- window over it, and a webhook opt-in only after `deadline` (Meta sends one again only
-- after `reset_messenger_state`). Linked people are found in `links`, which is never pruned.
CREATE TABLE contacted (
    person      bytea       PRIMARY KEY,
    -- The latest deadline of a pruned window.
    deadline    timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- Tombstones of data deletion requests: an opt-in or reply of the person that happened
-- before `deleted_at` (a redelivery, a replay) is dropped, so it cannot recreate them. A
-- later one is a new consent (the person logged in again) and is recorded as usual.
CREATE TABLE deleted_people (
    person      bytea       PRIMARY KEY,
    deleted_at  timestamptz NOT NULL
);

-- Receipts say what matched, not only that the request completed: how many of the request's
-- (page, login_id) pairs had anything stored, and the rows of each kind deleted. NULL in
-- receipts written before this migration (not counted then).
ALTER TABLE data_deletions
    ADD COLUMN matched_identities      integer,
    ADD COLUMN deleted_link_conflicts  integer,
    ADD COLUMN deleted_foreign_replies integer,
    ADD COLUMN deleted_contact_records integer,
    ADD COLUMN deleted_outbox_events   integer;
