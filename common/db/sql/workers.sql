-- Every query on workers. Liveness is judged by database time only.

-- name: register
INSERT INTO workers (id, name, hostname, pid, status, runtimes, actions, capacity, prefetch)
VALUES (:id, :name, :hostname, :pid, 'ACTIVE', :runtimes, :actions, :capacity, :prefetch)
RETURNING *;

-- name: heartbeat
-- A worker the executor gave up on (LOST) that is alive after all becomes ACTIVE again:
-- its old attempts are fenced out by their tokens, so it can safely take new work.
UPDATE workers
SET last_heartbeat_at = now(), memory_bytes = :memory_bytes,
    memory_limit_bytes = :memory_limit_bytes, memory_pressure = :memory_pressure,
    status = CASE WHEN status = 'LOST' THEN 'ACTIVE' ELSE status END,
    status_reason = CASE WHEN status = 'LOST' THEN 'heartbeat resumed' ELSE status_reason END
WHERE id = :id AND status IN ('ACTIVE', 'DRAINING', 'LOST')
RETURNING status;

-- name: set_status
UPDATE workers
SET status = :status, status_reason = :reason,
    stopped_at = CASE WHEN :status IN ('INACTIVE', 'LOST') THEN now() ELSE stopped_at END
WHERE id = :id
RETURNING status;

-- name: offers_action
-- Whether any worker that is not gone offers an action.
SELECT EXISTS (
    SELECT 1 FROM workers WHERE status IN ('ACTIVE', 'DRAINING') AND :action = ANY (actions)
);

-- name: list
SELECT w.*,
       extract(epoch FROM now() - w.last_heartbeat_at)::float8 AS heartbeat_age_s,
       w.last_heartbeat_at <= now() - make_interval(secs => :stale_after_s) AS stale,
       (SELECT count(*) FROM executions e
        WHERE e.worker_id = w.id AND e.status IN ('SCHEDULED', 'RUNNING')) AS in_flight
FROM workers w
ORDER BY w.status = 'INACTIVE', w.name, w.started_at DESC;

-- name: mark_lost
-- A worker whose connection closed without a clean shutdown.
UPDATE workers
SET status = 'LOST', status_reason = :reason, stopped_at = now()
WHERE id = :id AND status IN ('ACTIVE', 'DRAINING')
RETURNING id;

-- name: mark_stale_lost
-- Heartbeat backstop: workers silent for longer than the staleness window.
UPDATE workers
SET status = 'LOST', status_reason = 'heartbeat stale', stopped_at = now()
WHERE status IN ('ACTIVE', 'DRAINING')
  AND last_heartbeat_at <= now() - make_interval(secs => :stale_after_s)
RETURNING id;

-- name: count_by_status
SELECT status, count(*) AS n FROM workers GROUP BY status;
