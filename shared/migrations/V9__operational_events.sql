-- Operational events (issue 16): page.paused / page.resumed for throttles, and
-- subscription.lost / subscription.restored, each announced once per change.

-- Set when `page.paused` (reason throttled) was announced for a throttle, cleared when
-- `page.resumed` announced its end: whichever replica first sees the throttle over clears it
-- (guarded by `IS NOT NULL`), so the end is announced once.
ALTER TABLE page_state ADD COLUMN IF NOT EXISTS throttle_announced_at timestamptz;
CREATE INDEX IF NOT EXISTS page_state_announced_throttles ON page_state (throttled_until)
    WHERE throttle_announced_at IS NOT NULL;

-- Since when the app's webhook subscription of the page is missing (NULL: subscribed); set
-- when the watchdog announces `subscription.lost`, cleared with `subscription.restored`.
-- (The page registry may create the same column the same way.)
ALTER TABLE page_state ADD COLUMN IF NOT EXISTS unsubscribed_since timestamptz;

-- The app id the scheduler was given (META_APP_ID), shared with every process for the
-- `appid` attribute of events until pages are bound to apps (see events::APP_OF_PAGE_SQL).
ALTER TABLE app_state ADD COLUMN IF NOT EXISTS meta_app_id text;
