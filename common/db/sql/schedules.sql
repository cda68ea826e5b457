-- Every query on schedules.

-- name: insert
INSERT INTO schedules (name, action, params, every_s, cron, overlap, next_fire_at,
                       max_attempts, timeout_s)
VALUES (:name, :action, :params, :every_s, :cron, :overlap, :first_fire_at, :max_attempts,
        :timeout_s)
ON CONFLICT (name) DO NOTHING
RETURNING name;

-- name: list
-- With the state of each one's last execution; one, or (:name NULL) all.
SELECT s.*, e.status AS last_status
FROM schedules s
LEFT JOIN executions e ON e.id = s.last_execution_id
WHERE :name::text IS NULL OR s.name = :name
ORDER BY s.name;

-- name: delete
DELETE FROM schedules WHERE name = :name RETURNING name;

-- name: set_paused
-- :next_fire_at NULL keeps the next fire time.
UPDATE schedules
SET paused = :paused, next_fire_at = coalesce(:next_fire_at, next_fire_at), updated_at = now()
WHERE name = :name
RETURNING name;

-- name: claim_due
-- The schedules due now, locked so that another executor skips them; with their last
-- execution's state and the database's clock.
SELECT s.*, e.status AS last_status, now() AS db_now
FROM schedules s
LEFT JOIN executions e ON e.id = s.last_execution_id
WHERE NOT s.paused AND s.next_fire_at <= now()
ORDER BY s.next_fire_at
LIMIT :limit
FOR UPDATE OF s SKIP LOCKED;

-- name: advance
-- After a firing (:execution_id the execution it made) or a skip (:execution_id NULL).
UPDATE schedules
SET next_fire_at = :next_fire_at,
    last_fired_at = CASE WHEN :execution_id::uuid IS NULL THEN last_fired_at
                         ELSE :fired_at END,
    last_execution_id = coalesce(:execution_id, last_execution_id),
    skipped = CASE WHEN :execution_id::uuid IS NULL THEN skipped + 1 ELSE 0 END,
    updated_at = now()
WHERE name = :name;

-- name: skipped
-- For the metrics: ticks each schedule skipped in a row.
SELECT name, skipped FROM schedules;
