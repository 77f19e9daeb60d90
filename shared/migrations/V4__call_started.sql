-- When the current claim's Send API call was about to start (NULL from the claim until then).
-- A lease that expires before it is set proves no call was made, so the rescuer returns
-- such a row to 'pending' whatever UNKNOWN_OUTCOME says: only a started call has an
-- unknown outcome. Nullable without a default, so adding it rewrites nothing.
ALTER TABLE optins ADD COLUMN call_started_at timestamptz;
