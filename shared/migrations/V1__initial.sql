-- Opt-ins: one row per (page, login_id). A new opt-in after the previous window closed starts a
-- new cycle on the same row (cycle + 1); the public events of earlier cycles stay in the outbox.
CREATE TABLE optins (
    page_id            text        NOT NULL,
    login_id           text        NOT NULL,
    cycle              integer     NOT NULL DEFAULT 1,
    source             text        NOT NULL DEFAULT 'webhook',
    opted_in_at        timestamptz NOT NULL,
    deadline           timestamptz NOT NULL,
    send_at            timestamptz NOT NULL,
    state              text        NOT NULL
        CHECK (state IN ('pending', 'sending', 'sent', 'replied', 'failed', 'expired')),
    attempts           integer     NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz NOT NULL,
    lease_owner        text,
    lease_expires_at   timestamptz,
    fence              bigint      NOT NULL DEFAULT 0,
    message_id         text,
    sent_at            timestamptz,
    failure_reason     text,
    last_error_code    bigint,
    last_error_subcode bigint,
    last_error_message text,
    last_error_fbtrace text,
    traceparent        text,
    -- When the person's first reply arrived (set whatever the state; the state becomes
    -- 'replied' only if no first message had been sent yet).
    replied_at         timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz,
    PRIMARY KEY (page_id, login_id)
) WITH (fillfactor = 80);

-- Claiming due work walks this index in deadline order (earliest deadline first); the
-- INCLUDE lets the next_attempt_at filter run on the index alone.
CREATE INDEX optins_pending_by_deadline ON optins (deadline) INCLUDE (next_attempt_at)
    WHERE state = 'pending';
-- Rescuing leases of workers that died.
CREATE INDEX optins_sending_by_lease ON optins (lease_expires_at) WHERE state = 'sending';
-- The one-page-per-login_id rule looks a login_id up across pages.
CREATE INDEX optins_login_id ON optins (login_id);
-- Pruning terminal rows by age.
CREATE INDEX optins_finished_at ON optins (finished_at) WHERE finished_at IS NOT NULL;

-- Queue-like table: frequent updates; vacuum early so dead tuples do not pile up.
ALTER TABLE optins SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_limit = 2000
);

-- Identity links made by the correlator: (page, login_id) -> PSID. The first link wins.
CREATE TABLE links (
    page_id          text        NOT NULL,
    login_id         text        NOT NULL,
    psid             text        NOT NULL,
    linked_at        timestamptz NOT NULL,
    first_reply_mid  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (page_id, login_id)
);
CREATE INDEX links_psid ON links (psid);

-- A reply that named a login_id already linked to a different PSID.
CREATE TABLE link_conflicts (
    id               bigserial   PRIMARY KEY,
    page_id          text        NOT NULL,
    login_id         text        NOT NULL,
    linked_psid      text        NOT NULL,
    conflicting_psid text        NOT NULL,
    mid              text,
    seen_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (page_id, login_id, conflicting_psid)
);

-- Transactional outbox of public events: written in the same transaction as the state change
-- it announces, published by the relay, then marked.
CREATE TABLE outbox (
    id           bigserial   PRIMARY KEY,
    event_id     uuid        NOT NULL UNIQUE,
    event_type   text        NOT NULL,
    page_id      text        NOT NULL,
    cloudevent   jsonb       NOT NULL,
    traceparent  text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);

-- Wake relays at once on insert; they poll as a fallback.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('loginconnect_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
