-- Every query on schedules.

-- name: insert
-- $1 name, $2 action, $3 params, $4 every_s, $5 cron, $6 overlap, $7 first fire time,
-- $8 max_attempts, $9 timeout_s
INSERT INTO schedules (name, action, params, every_s, cron, overlap, next_fire_at,
                       max_attempts, timeout_s)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (name) DO NOTHING
RETURNING name;

-- name: list
-- With the state of each one's last execution. $1 one name, or NULL for all
SELECT s.*, e.status AS last_status
FROM schedules s
LEFT JOIN executions e ON e.id = s.last_execution_id
WHERE $1::text IS NULL OR s.name = $1
ORDER BY s.name;

-- name: delete
DELETE FROM schedules WHERE name = $1 RETURNING name;

-- name: set_paused
-- $1 name, $2 paused, $3 next fire time (NULL: keep it)
UPDATE schedules
SET paused = $2, next_fire_at = coalesce($3, next_fire_at), updated_at = now()
WHERE name = $1
RETURNING name;

-- name: claim_due
-- The schedules due now, locked so that another executor skips them; with their last
-- execution's state and the database's clock. $1 limit
SELECT s.*, e.status AS last_status, now() AS db_now
FROM schedules s
LEFT JOIN executions e ON e.id = s.last_execution_id
WHERE NOT s.paused AND s.next_fire_at <= now()
ORDER BY s.next_fire_at
LIMIT $1
FOR UPDATE OF s SKIP LOCKED;

-- name: advance
-- After a firing ($3 the execution it made) or a skip ($3 NULL).
-- $1 name, $2 next fire time, $3 execution id or NULL, $4 the fire time
UPDATE schedules
SET next_fire_at = $2,
    last_fired_at = CASE WHEN $3::uuid IS NULL THEN last_fired_at ELSE $4 END,
    last_execution_id = coalesce($3, last_execution_id),
    skipped = CASE WHEN $3::uuid IS NULL THEN skipped + 1 ELSE 0 END,
    updated_at = now()
WHERE name = $1;

-- name: skipped
-- For the metrics: ticks each schedule skipped in a row.
SELECT name, skipped FROM schedules;
