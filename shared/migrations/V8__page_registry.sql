-- Issue 16: the page registry, the source of truth for every replica. The pages file is
-- imported into it at start (and whenever the file changes); the admin API and the
-- `loginconnect pages` commands write it. Tokens stay in page_tokens (encrypted) or in the
-- pages file / environment of each replica; nothing here is a secret.

-- Meta apps pages belong to. Only *references* to secrets: the names of the environment
-- variables that hold them on every replica, never the secrets.
CREATE TABLE apps (
    app_id            text        PRIMARY KEY CHECK (app_id ~ '^[0-9]+$'),
    -- Name of the environment variable holding the app secret.
    app_secret_env    text        NOT NULL CHECK (app_secret_env ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    -- A separate Facebook Login app, when the client uses one.
    login_app_id      text        CHECK (login_app_id ~ '^[0-9]+$'),
    -- Name of the environment variable holding the Login app's client token.
    client_token_env  text        CHECK (client_token_env ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pages (
    page_id        text        PRIMARY KEY CHECK (page_id ~ '^[0-9]+$'),
    -- NULL: the deployment's own app (pages of the pages file, a brand's single app).
    app_id         text        REFERENCES apps (app_id),
    name           text,
    -- serde JSON of lc_meta::pages::FirstMessage, stored as is so fields added to it later
    -- travel through untouched.
    first_message  jsonb       NOT NULL,
    -- Send API calls per second; NULL: the schedulers' PAGE_RATE_LIMIT.
    rate_limit     integer     CHECK (rate_limit >= 0),
    -- Who created the page: 'file' (PAGES_FILE import) or 'api' (admin API / CLI).
    source         text        NOT NULL CHECK (source IN ('file', 'api')),
    -- SHA-256 of the pages file's definition of the page at its last import: the file's
    -- definition is applied again only when it changed, so an API edit survives restarts.
    file_hash      text,
    -- Whether the page is in the pages file as last imported. A page that left the file is
    -- kept (and reported) until deleted through the API or the CLI.
    in_file        boolean     NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pages_by_app ON pages (app_id);

-- One counter every replica polls every half second (one row, one index lookup: cheap; no
-- session of its own, unlike LISTEN, and nothing lost across a failover). Any change of apps, pages or stored
-- tokens bumps it in the same transaction, so a replica that sees the new number reads the
-- new registry.
CREATE TABLE registry_version (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version    bigint  NOT NULL
);
INSERT INTO registry_version (version) VALUES (0);

CREATE FUNCTION bump_registry_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE registry_version SET version = version + 1;
    RETURN NULL;
END $$;

-- Row-level: an upsert that changes nothing (the idempotent import) fires none.
CREATE TRIGGER apps_bump AFTER INSERT OR UPDATE OR DELETE ON apps
    FOR EACH ROW EXECUTE FUNCTION bump_registry_version();
CREATE TRIGGER pages_bump AFTER INSERT OR UPDATE OR DELETE ON pages
    FOR EACH ROW EXECUTE FUNCTION bump_registry_version();
CREATE TRIGGER page_tokens_bump AFTER INSERT OR UPDATE OR DELETE ON page_tokens
    FOR EACH ROW EXECUTE FUNCTION bump_registry_version();

-- Since when Meta's webhook subscription of the page is lost (written by the watchdog;
-- shown by the page status).
ALTER TABLE page_state ADD COLUMN IF NOT EXISTS unsubscribed_since timestamptz;

-- An operator's pause (admin API / `loginconnect pages pause`), lifted only by a resume.
ALTER TABLE page_state DROP CONSTRAINT IF EXISTS page_state_paused_reason_check;
ALTER TABLE page_state ADD CONSTRAINT page_state_paused_reason_check
    CHECK (paused_reason IN ('token_invalid', 'restricted', 'operator'));
