-- Every query on actions: the defaults of each action, as its workers declare them.

-- name: upsert
-- A worker declares the actions it offers; the latest declaration wins.
INSERT INTO actions (name, max_attempts, timeout_s)
SELECT * FROM unnest(:names::text[], :max_attempts::int[], :timeouts_s::int[])
ON CONFLICT (name) DO UPDATE
SET max_attempts = excluded.max_attempts, timeout_s = excluded.timeout_s, updated_at = now()
WHERE (actions.max_attempts, actions.timeout_s)
      IS DISTINCT FROM (excluded.max_attempts, excluded.timeout_s);
