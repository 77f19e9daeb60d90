-- Page state shared by every scheduler replica (DESIGN invariants 13 and 14): the send budget
-- and the pauses of each page live here, not in a process, so the configured rate holds for
-- the page whoever calls, and a pause or its recovery reaches every replica at once.
CREATE TABLE page_state (
    page_id          text        PRIMARY KEY,
    -- Send API calls per second allowed for the page (0 = no limit).
    rate_limit       integer     NOT NULL CHECK (rate_limit >= 0),
    -- The next free send slot: each claim takes slots from here onwards, spaced so that no
    -- one-second window holds more than rate_limit calls (see scheduler::store::claim).
    next_slot_at     timestamptz NOT NULL DEFAULT '-infinity',
    -- Slows the page down (0 < factor <= 1) when Graph's usage headers near 100 %.
    rate_factor      real        NOT NULL DEFAULT 1 CHECK (rate_factor > 0 AND rate_factor <= 1),
    -- A pause until an operator or a new token lifts it.
    paused_reason    text        CHECK (paused_reason IN ('token_invalid', 'restricted')),
    paused_since     timestamptz,
    paused_detail    text,
    -- Fingerprint of the token Graph refused: a page whose current token differs resumes.
    paused_token     text,
    -- Graph throttled the page until then.
    throttled_until  timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- App-wide state (Graph code 4 throttles every page of the app). One row per app; 'default'
-- until pages are bound to apps.
CREATE TABLE app_state (
    app_id           text        PRIMARY KEY,
    throttled_until  timestamptz,
    rate_factor      real        NOT NULL DEFAULT 1 CHECK (rate_factor > 0 AND rate_factor <= 1),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
INSERT INTO app_state (app_id) VALUES ('default');

-- Page tokens set at run time (`loginconnect pages set-token`), encrypted with AES-256-GCM
-- under a key from the environment; they take precedence over the pages file. key_id names
-- the key, so keys can be rotated.
CREATE TABLE page_tokens (
    page_id          text        PRIMARY KEY,
    key_id           text        NOT NULL,
    nonce            bytea       NOT NULL,
    ciphertext       bytea       NOT NULL,
    fingerprint      text        NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Claims walk each page's due rows in deadline order, so a page's backlog is read only as far
-- as its send budget reaches and a paused page's rows are never read at all.
CREATE INDEX optins_pending_by_page ON optins (page_id, deadline) INCLUDE (next_attempt_at)
    WHERE state = 'pending';
