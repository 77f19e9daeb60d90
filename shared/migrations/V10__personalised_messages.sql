-- Personalised first messages (README "Personalised first messages").
--
-- message_ref: the opt-in webhook's `optin.ref` (else `optin.payload`), which chooses one of
-- the page's message variants. variables: the string variables the business's backend sent
-- with its login event (a JSON object), which fill the variant's placeholders. A login event
-- and the webhook opt-in of the same login arrive in either order; recording merges them
-- onto the one row while it is pending.
ALTER TABLE optins
    ADD COLUMN message_ref text,
    ADD COLUMN variables   jsonb;

-- The variables are personal data needed only until the first message is sent: they are
-- erased in the same statement that moves the row to any final state (sent, replied, failed,
-- expired), whichever code path does it, so they never outlive their use (the row itself is
-- pruned after OPTIN_RETENTION_DAYS and deleted at once by a data deletion request). The WHEN
-- clause keeps the trigger free for every other update of this busy table.
CREATE FUNCTION optins_erase_variables() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.variables := NULL;
    RETURN NEW;
END;
$$;

CREATE TRIGGER optins_erase_variables_when_final
    BEFORE INSERT OR UPDATE ON optins
    FOR EACH ROW
    WHEN (NEW.variables IS NOT NULL AND NEW.state NOT IN ('pending', 'sending'))
    EXECUTE FUNCTION optins_erase_variables();
