-- Every query on executions and execution_history.
-- Each transition is a compare-and-set on (status, attempt[, dispatches][, worker_id])
-- and writes its history row in the same statement.

-- name: insert
-- max_attempts and timeout_s, when NULL, come from the action's defaults (table actions).
-- $1 action, $2 params, $3 max_attempts, $4 timeout_s, $5 idempotency_key, $6 actor
WITH defaults AS (
    SELECT coalesce($3::int, (SELECT max_attempts FROM actions WHERE name = $1), 3)
               AS max_attempts,
           coalesce($4::int, (SELECT timeout_s FROM actions WHERE name = $1), 3600)
               AS timeout_s
), inserted AS (
    INSERT INTO executions (action, params, status, max_attempts, timeout_s, idempotency_key)
    SELECT $1, $2, 'REQUESTED', max_attempts, timeout_s, $5 FROM defaults
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id, attempt, dispatches
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor)
    SELECT id, attempt, dispatches, NULL, 'REQUESTED', 'submitted', $6 FROM inserted
)
SELECT id, true AS created FROM inserted
UNION ALL
SELECT id, false AS created FROM executions
WHERE $5::text IS NOT NULL AND idempotency_key = $5 AND NOT EXISTS (SELECT 1 FROM inserted);

-- name: get
SELECT * FROM executions WHERE id = $1;

-- name: history
SELECT * FROM execution_history WHERE execution_id = $1 ORDER BY at, id;

-- name: list
-- $1 status or NULL, $2 action or NULL, $3 limit
SELECT * FROM executions
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR action = $2)
ORDER BY created_at DESC, id
LIMIT $3;

-- name: count_by_status
SELECT status, count(*) AS n FROM executions GROUP BY status ORDER BY status;

-- name: claim_due
-- Claims, per action, at most as many due executions as there are free slots for it,
-- so one action's backlog never holds back another's. $1 actions, $2 limits.
SELECT c.id, c.action, c.attempt, c.worker_id AS previous_worker_id
FROM unnest($1::text[], $2::int[]) AS wanted(action, n)
CROSS JOIN LATERAL (
    SELECT e.id, e.action, e.attempt, e.worker_id, e.not_before
    FROM executions e
    WHERE e.status = 'REQUESTED' AND e.action = wanted.action AND e.not_before <= now()
    ORDER BY e.not_before, e.id
    LIMIT wanted.n
    FOR UPDATE SKIP LOCKED
) c
ORDER BY c.not_before, c.id;

-- name: mark_scheduled
-- $1 ids, $2 attempts, $3 worker ids, $4 actor
WITH assignment AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[]) AS a(id, attempt, worker_id)
), moved AS (
    UPDATE executions e
    SET status = 'SCHEDULED', worker_id = a.worker_id, dispatches = e.dispatches + 1,
        scheduled_at = now(), updated_at = now()
    FROM assignment a
    WHERE e.id = a.id AND e.status = 'REQUESTED' AND e.attempt = a.attempt
    RETURNING e.id, e.attempt, e.dispatches, e.worker_id
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor, worker_id)
    SELECT id, attempt, dispatches, 'REQUESTED', 'SCHEDULED', 'dispatched', $4, worker_id
    FROM moved
)
SELECT id, attempt, dispatches, worker_id FROM moved;

-- name: committed_dispatches
-- Which of these dispatches are SCHEDULED as given: after the reply to their COMMIT was
-- lost, the ones that committed. $1 ids, $2 attempts, $3 dispatches, $4 worker ids
SELECT e.id, e.attempt, e.dispatches, e.worker_id
FROM executions e
JOIN unnest($1::uuid[], $2::int[], $3::int[], $4::text[]) AS d(id, attempt, dispatch, worker_id)
  ON e.id = d.id AND e.attempt = d.attempt AND e.dispatches = d.dispatch
     AND e.worker_id = d.worker_id
WHERE e.status = 'SCHEDULED';

-- name: release_scheduled
-- A dispatch that was never started goes back to REQUESTED, or FAILED once the attempt
-- has been delivered max_dispatches times. A dispatch whose publish failed ($8) never
-- reached a worker: it goes back to REQUESTED and does not count.
-- $1 id, $2 attempt, $3 dispatch, $4 worker id, $5 reason, $6 actor, $7 max_dispatches,
-- $8 publish failed
WITH moved AS (
    UPDATE executions
    SET status = CASE WHEN NOT $8 AND dispatches - unpublished >= $7
                      THEN 'FAILED' ELSE 'REQUESTED' END,
        unpublished = unpublished + CASE WHEN $8 THEN 1 ELSE 0 END,
        reason = CASE WHEN NOT $8 AND dispatches - unpublished >= $7 THEN 'max_dispatches' END,
        error = CASE WHEN NOT $8 AND dispatches - unpublished >= $7
                THEN jsonb_build_object('kind', 'max_dispatches', 'message',
                     format('not started after %s dispatches; last: %s',
                            dispatches - unpublished, $5::text))
                END,
        finished_at = CASE WHEN NOT $8 AND dispatches - unpublished >= $7 THEN now() END,
        updated_at = now()
    WHERE id = $1 AND status = 'SCHEDULED' AND attempt = $2 AND dispatches = $3
      AND worker_id = $4
    RETURNING id, attempt, dispatches, status, worker_id
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor, worker_id)
    SELECT id, attempt, dispatches, 'SCHEDULED', status, $5, $6, worker_id FROM moved
)
SELECT id, status FROM moved;

-- name: start
-- The worker's SCHEDULED -> RUNNING; returns what the attempt needs. Idempotent for
-- the same token: if a commit's reply was lost (the database restarted), the retry
-- finds the row already RUNNING for this very dispatch and gets it again. The worker
-- itself makes sure it never runs one dispatch twice.
-- $1 id, $2 attempt, $3 dispatch, $4 worker id
WITH moved AS (
    UPDATE executions
    SET status = 'RUNNING', started_at = now(), updated_at = now()
    WHERE id = $1 AND status = 'SCHEDULED' AND attempt = $2 AND dispatches = $3
      AND worker_id = $4
    RETURNING id, action, params, attempt, dispatches, timeout_s, checkpoint, worker_id
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor, worker_id)
    SELECT id, attempt, dispatches, 'SCHEDULED', 'RUNNING', 'started', 'worker:' || $4,
           worker_id
    FROM moved
)
SELECT id, action, params, attempt, timeout_s, checkpoint FROM moved
UNION ALL
SELECT id, action, params, attempt, timeout_s, checkpoint FROM executions
WHERE id = $1 AND status = 'RUNNING' AND attempt = $2 AND dispatches = $3 AND worker_id = $4
  AND NOT EXISTS (SELECT 1 FROM moved);

-- name: finish
-- The worker's RUNNING -> SUCCEEDED or FAILED, or back to REQUESTED for another attempt
-- when $5 (retry delay in seconds) is not NULL and attempts are left.
-- $1 id, $2 attempt, $3 worker id, $4 outcome status, $5 retry delay s or NULL,
-- $6 result, $7 error, $8 reason, $9 dispatch
WITH moved AS (
    UPDATE executions
    SET status = CASE WHEN $5::float8 IS NOT NULL AND attempt < max_attempts
                      THEN 'REQUESTED' ELSE $4 END,
        attempt = CASE WHEN $5::float8 IS NOT NULL AND attempt < max_attempts
                       THEN attempt + 1 ELSE attempt END,
        dispatches = CASE WHEN $5::float8 IS NOT NULL AND attempt < max_attempts
                          THEN 0 ELSE dispatches END,
        unpublished = CASE WHEN $5::float8 IS NOT NULL AND attempt < max_attempts
                           THEN 0 ELSE unpublished END,
        not_before = CASE WHEN $5::float8 IS NOT NULL AND attempt < max_attempts
                          THEN now() + make_interval(secs => $5::float8) ELSE not_before END,
        finished_at = CASE WHEN $5::float8 IS NOT NULL AND attempt < max_attempts
                           THEN NULL ELSE now() END,
        result = $6, error = $7, reason = $8, updated_at = now()
    WHERE id = $1 AND status = 'RUNNING' AND attempt = $2 AND dispatches = $9
      AND worker_id = $3
    RETURNING id, status, worker_id, error
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor, worker_id, error)
    -- A retry is recorded as the next attempt being requested (dispatch 0).
    SELECT id, CASE WHEN status = 'REQUESTED' THEN $2 + 1 ELSE $2 END,
           CASE WHEN status = 'REQUESTED' THEN 0 ELSE $9 END,
           'RUNNING', status, $8, 'worker:' || $3, worker_id, error
    FROM moved
)
SELECT id, status FROM moved;

-- name: running_not_owned
-- Which of a worker's running attempts it no longer owns (cancelled, timed out,
-- reassigned). $1 ids, $2 attempts, $3 worker id
SELECT a.id
FROM unnest($1::uuid[], $2::int[]) AS a(id, attempt)
LEFT JOIN executions e
       ON e.id = a.id AND e.status = 'RUNNING' AND e.attempt = a.attempt AND e.worker_id = $3
WHERE e.id IS NULL;

-- name: running_unknown
-- Attempts the database says are RUNNING on a worker that does not know of them (it lost
-- a reply, say): the worker releases them for retry. Recent starts are left alone, as
-- they may still be on their way into the worker's books. $1 worker id, $2 known ids
SELECT id, attempt, dispatches AS dispatch FROM executions
WHERE worker_id = $1 AND status = 'RUNNING' AND NOT (id = ANY($2::uuid[]))
  AND started_at < now() - interval '5 seconds';

-- name: save_checkpoint
-- $1 id, $2 attempt, $3 worker id, $4 checkpoint
UPDATE executions SET checkpoint = $4, updated_at = now()
WHERE id = $1 AND status = 'RUNNING' AND attempt = $2 AND worker_id = $3
RETURNING id;

-- name: release_stuck_scheduled
-- Timeout monitor: SCHEDULED past schedule-to-start, or on a worker that can no longer
-- start it, goes back to REQUESTED (FAILED past max_dispatches).
-- $1 schedule-to-start s, $2 stale after s, $3 max_dispatches, $4 batch, $5 actor
WITH stuck AS (
    SELECT e.id,
           CASE WHEN e.scheduled_at <= now() - make_interval(secs => $1::float8)
                THEN 'schedule_to_start_timeout'
                ELSE 'worker_' || lower(coalesce(w.status, 'missing')) END AS why
    FROM executions e
    LEFT JOIN workers w ON w.id = e.worker_id
    WHERE e.status = 'SCHEDULED'
      AND (e.scheduled_at <= now() - make_interval(secs => $1::float8)
           OR w.id IS NULL OR w.status <> 'ACTIVE'
           OR w.last_heartbeat_at <= now() - make_interval(secs => $2::float8))
    ORDER BY e.scheduled_at
    LIMIT $4
    FOR UPDATE OF e SKIP LOCKED
), moved AS (
    UPDATE executions e
    SET status = CASE WHEN e.dispatches - e.unpublished >= $3 THEN 'FAILED' ELSE 'REQUESTED' END,
        reason = CASE WHEN e.dispatches - e.unpublished >= $3 THEN 'schedule_timeout' END,
        error = CASE WHEN e.dispatches - e.unpublished >= $3
                THEN jsonb_build_object('kind', 'schedule_timeout', 'message',
                     format('not started after %s dispatches; last: %s',
                            e.dispatches - e.unpublished, s.why))
                END,
        finished_at = CASE WHEN e.dispatches - e.unpublished >= $3 THEN now() END,
        updated_at = now()
    FROM stuck s
    WHERE e.id = s.id AND e.status = 'SCHEDULED'
    RETURNING e.id, e.attempt, e.dispatches, e.status, e.worker_id, s.why
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor, worker_id)
    SELECT id, attempt, dispatches, 'SCHEDULED', status, why, $5, worker_id FROM moved
)
SELECT status, why, count(*) AS n FROM moved GROUP BY status, why;

-- name: recover_lost_running
-- Timeout monitor: RUNNING on a worker that is LOST, INACTIVE, gone or stale is retried
-- (attempt + 1, avoiding that worker) or, with no attempts left, FAILED worker_lost.
-- $1 stale after s, $2 retry delay s, $3 batch, $4 actor
WITH lost AS (
    SELECT e.id, 'worker_' || lower(coalesce(w.status, 'missing')) AS why
    FROM executions e
    LEFT JOIN workers w ON w.id = e.worker_id
    WHERE e.status = 'RUNNING'
      AND (w.id IS NULL OR w.status IN ('LOST', 'INACTIVE')
           OR w.last_heartbeat_at <= now() - make_interval(secs => $1::float8))
    LIMIT $3
    FOR UPDATE OF e SKIP LOCKED
), moved AS (
    UPDATE executions e
    SET status = CASE WHEN e.attempt < e.max_attempts THEN 'REQUESTED' ELSE 'FAILED' END,
        attempt = CASE WHEN e.attempt < e.max_attempts THEN e.attempt + 1 ELSE e.attempt END,
        dispatches = CASE WHEN e.attempt < e.max_attempts THEN 0 ELSE e.dispatches END,
        unpublished = CASE WHEN e.attempt < e.max_attempts THEN 0 ELSE e.unpublished END,
        not_before = CASE WHEN e.attempt < e.max_attempts
                          THEN now() + make_interval(secs => $2::float8) ELSE e.not_before END,
        finished_at = CASE WHEN e.attempt < e.max_attempts THEN NULL ELSE now() END,
        reason = 'worker_lost',
        error = jsonb_build_object('kind', 'worker_lost', 'message',
                format('worker %s stopped answering (%s) during attempt %s',
                       e.worker_id, l.why, e.attempt)),
        updated_at = now()
    FROM lost l
    WHERE e.id = l.id AND e.status = 'RUNNING'
    -- The new row: a retry is recorded as the next attempt requested (dispatch 0).
    RETURNING e.id, e.attempt, e.dispatches, e.status, e.worker_id, e.error, l.why
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor, worker_id, error)
    SELECT id, attempt, dispatches, 'RUNNING', status, 'worker_lost', $4, worker_id, error
    FROM moved
)
SELECT status, why, count(*) AS n FROM moved GROUP BY status, why;

-- name: time_out_running
-- Timeout monitor: RUNNING past its start-to-close timeout. The worker sees it no longer
-- owns the attempt and kills the child. $1 batch, $2 actor
WITH late AS (
    SELECT id FROM executions
    WHERE status = 'RUNNING' AND started_at <= now() - make_interval(secs => timeout_s)
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE executions e
    SET status = 'TIMED_OUT', reason = 'start_to_close_timeout', finished_at = now(),
        error = jsonb_build_object('kind', 'timeout', 'message',
                format('still running after %ss', e.timeout_s)),
        updated_at = now()
    FROM late
    WHERE e.id = late.id AND e.status = 'RUNNING'
    RETURNING e.id, e.attempt, e.dispatches, e.worker_id
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor, worker_id)
    SELECT id, attempt, dispatches, 'RUNNING', 'TIMED_OUT', 'start_to_close_timeout', $2,
           worker_id
    FROM moved
)
SELECT count(*) AS n FROM moved;

-- name: fail_unassignable
-- Timeout monitor: REQUESTED for longer than the queue timeout: no worker ever took it.
-- $1 queue timeout s, $2 batch, $3 actor
WITH waiting AS (
    SELECT id FROM executions
    WHERE status = 'REQUESTED' AND not_before <= now() - make_interval(secs => $1::float8)
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE executions e
    SET status = 'FAILED', reason = 'no_worker', finished_at = now(),
        error = jsonb_build_object('kind', 'no_worker', 'message',
                format('no eligible worker took it within %ss', $1::float8)),
        updated_at = now()
    FROM waiting
    WHERE e.id = waiting.id AND e.status = 'REQUESTED'
    RETURNING e.id, e.attempt, e.dispatches
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor)
    SELECT id, attempt, dispatches, 'REQUESTED', 'FAILED', 'no_worker', $3 FROM moved
)
SELECT count(*) AS n FROM moved;

-- name: cancel
-- Cancellation works in every non-terminal state; a running child is killed by its
-- worker, which sees it no longer owns the attempt. $1 id, $2 actor
WITH moved AS (
    UPDATE executions
    SET status = 'CANCELLED', reason = 'cancelled', finished_at = now(), updated_at = now(),
        error = jsonb_build_object('kind', 'cancelled', 'message', 'cancelled by ' || $2)
    WHERE id = $1 AND status IN ('REQUESTED', 'SCHEDULED', 'RUNNING')
    -- RETURNING's sub-select still sees the row as it was before this statement.
    RETURNING id, attempt, dispatches, worker_id,
              (SELECT status FROM executions WHERE id = $1) AS from_status
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor, worker_id)
    SELECT id, attempt, dispatches, from_status, 'CANCELLED', 'cancelled', $2, worker_id
    FROM moved
)
SELECT from_status FROM moved;

-- name: retry
-- Finished executions that did not succeed run again, each as a new attempt.
-- $1 ids, $2 actor, $3 reason recorded in the history,
-- $4 only those FAILED for this reason (NULL: any FAILED, TIMED_OUT or CANCELLED)
WITH moved AS (
    UPDATE executions e
    SET status = 'REQUESTED', attempt = e.attempt + 1,
        max_attempts = greatest(e.max_attempts, e.attempt + 1), dispatches = 0,
        unpublished = 0, not_before = now(), finished_at = NULL, reason = NULL,
        updated_at = now()
    WHERE e.id = ANY($1::uuid[]) AND e.status IN ('FAILED', 'TIMED_OUT', 'CANCELLED')
      AND ($4::text IS NULL OR (e.status = 'FAILED' AND e.reason = $4))
    -- RETURNING's sub-select still sees the row as it was before this statement.
    RETURNING e.id, e.attempt, (SELECT status FROM executions x WHERE x.id = e.id) AS from_status
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor)
    SELECT id, attempt, 0, from_status, 'REQUESTED', $3, $2 FROM moved
)
SELECT id, attempt FROM moved;

-- name: dead_letters
-- Dead letters, newest first: the history rows the executor wrote for dispatches a
-- worker queue dead-lettered (index execution_history_dead_letters).
-- $1 only the last this many seconds (NULL: all), $2 one execution's (NULL: all), $3 limit
SELECT h.at, h.execution_id, e.action, h.attempt, h.dispatch, h.worker_id,
       substr(h.reason, length('dead_letter_') + 1) AS cause, h.to_status AS outcome,
       e.status AS status_now
FROM execution_history h
JOIN executions e ON e.id = h.execution_id
WHERE starts_with(h.reason, 'dead_letter_')
  AND ($1::float8 IS NULL OR h.at > now() - make_interval(secs => $1::float8))
  AND ($2::uuid IS NULL OR h.execution_id = $2)
ORDER BY h.at DESC, h.id DESC
LIMIT $3;

-- name: failed_dead_lettered
-- Executions FAILED when their last of max_dispatches deliveries was dead-lettered
-- (reason max_dispatches, set by release_scheduled), newest first.
-- $1 finished in the last this many seconds, $2 action or NULL, $3 limit
SELECT id FROM executions
WHERE status = 'FAILED' AND reason = 'max_dispatches'
  AND finished_at > now() - make_interval(secs => $1::float8)
  AND ($2::text IS NULL OR action = $2)
ORDER BY finished_at DESC
LIMIT $3;

-- name: non_terminal_by_action
-- For the metrics: work in flight per state and action, and how long the oldest has been
-- in that state. Terminal states are counted by the transitions counter instead.
SELECT status, action, count(*) AS n,
       extract(epoch FROM now() - min(updated_at))::float8 AS oldest_s
FROM executions
WHERE status IN ('REQUESTED', 'SCHEDULED', 'RUNNING')
GROUP BY status, action;

-- name: recent_activity
-- For `vigil stats`: what finished in the last minute, and the oldest unfinished.
SELECT (SELECT count(*) FROM executions WHERE finished_at > now() - interval '1 minute')
           AS finished_last_minute,
       (SELECT extract(epoch FROM now() - min(created_at))::float8 FROM executions
        WHERE status IN ('REQUESTED', 'SCHEDULED', 'RUNNING')) AS oldest_non_terminal_s;
