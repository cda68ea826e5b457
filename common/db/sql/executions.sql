-- Every query on executions and execution_history.
-- Each transition is a compare-and-set on (status, attempt[, dispatches][, worker_id]) and
-- writes its history row in the same statement. How an attempt ends and how an unstarted
-- dispatch comes back are written once, as SQL functions that every caller shares
-- (migrations/0004_state_machine.sql: vigil_end_attempts, vigil_release_dispatches).
-- Reasons and error kinds come from common/state_machine.py as parameters. Where rows are
-- named by a list of tokens, `e.id = ANY(:ids)` repeats the join on id as a condition on
-- executions alone, so that the planner finds them by primary key rather than reading
-- every row in their state (with a deep backlog and stale statistics it would).

-- name: insert
-- Many executions in one statement. Unset limits take the action's defaults, then
-- Vigil's; a key already used returns that execution (if its row is not visible to this
-- statement yet because a racing insert just committed it, `id` is NULL: look it up
-- again with by_keys).
WITH input AS (
    SELECT vigil_uuid7() AS id, s.*
    FROM unnest(:actions::text[], :params::jsonb[], :max_attempts::int[], :timeouts_s::int[],
                :keys::text[], :delays_s::float8[], :at::timestamptz[])
         WITH ORDINALITY AS s(action, params, max_attempts, timeout_s, key, delay_s, at, n)
), inserted AS (
    INSERT INTO executions (id, action, params, status, max_attempts, timeout_s,
                            idempotency_key, not_before)
    SELECT i.id, i.action, i.params, 'REQUESTED',
           coalesce(i.max_attempts, a.max_attempts, :default_max_attempts),
           coalesce(i.timeout_s, a.timeout_s, :default_timeout_s), i.key,
           coalesce(i.at, now() + make_interval(secs => coalesce(i.delay_s, 0)))
    FROM input i LEFT JOIN actions a ON a.name = i.action
    ORDER BY i.n
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor)
    SELECT id, 1, 0, NULL, 'REQUESTED', :reason, :actor FROM inserted
)
SELECT coalesce(ins.id, existing.id) AS id, ins.id IS NOT NULL AS created, i.key
FROM input i
LEFT JOIN inserted ins ON ins.id = i.id
LEFT JOIN executions existing ON ins.id IS NULL AND existing.idempotency_key = i.key
ORDER BY i.n;

-- name: by_keys
SELECT id, idempotency_key AS key FROM executions WHERE idempotency_key = ANY(:keys::text[]);

-- name: get
SELECT * FROM executions WHERE id = :id;

-- name: history
SELECT * FROM execution_history WHERE execution_id = :id ORDER BY at, id;

-- name: list
-- Newest first; each filter may be NULL.
SELECT * FROM executions
WHERE (:status::text IS NULL OR status = :status)
  AND (:action::text IS NULL OR action = :action)
  AND (:reason::text IS NULL OR reason = :reason)
ORDER BY created_at DESC, id
LIMIT :limit;

-- name: count_by_status
SELECT status, count(*) AS n FROM executions GROUP BY status ORDER BY status;

-- name: dispatch
-- One dispatch round (vigil_dispatch): what it marked SCHEDULED, to be published.
SELECT * FROM vigil_dispatch(:round_id, :batch, :stale_after_s, :reason, :actor);

-- name: next_due
-- How long until the earliest REQUESTED execution that is not due yet (a delayed one, or
-- a retry in its backoff) of an action some worker offers becomes due; NULL if none.
SELECT extract(epoch FROM min(n.not_before) - now())::float8
FROM (SELECT DISTINCT unnest(actions) AS action FROM workers WHERE status = 'ACTIVE') wanted
CROSS JOIN LATERAL (
    SELECT e.not_before FROM executions e
    WHERE e.status = 'REQUESTED' AND e.action = wanted.action AND e.not_before > now()
    ORDER BY e.not_before
    LIMIT 1
) n;

-- name: committed_dispatches
-- What a dispatch round scheduled that is still SCHEDULED: after the reply to its COMMIT
-- was lost, what it committed.
SELECT id, attempt, dispatches AS dispatch, worker_id FROM executions
WHERE status = 'SCHEDULED' AND dispatch_round = :round_id;

-- name: release_dispatches
-- Dispatches that never started go back to REQUESTED, or FAILED max_dispatches, each
-- fenced by its token (vigil_release_dispatches). `counted` false: it never reached a
-- willing worker (see common/state_machine.py NOT_COUNTED).
SELECT 'SCHEDULED' AS from_status, to_status, reason, count(*) AS n
FROM vigil_release_dispatches(
    :ids, :attempts, :dispatches, :worker_ids,
    array_fill(:reason::text, ARRAY[cardinality(:ids::uuid[])]), :counted, :max_dispatches,
    :exhausted, :actor)
GROUP BY to_status, reason;

-- name: release_stuck_scheduled
-- Timeout monitor: SCHEDULED past schedule-to-start, or on a worker that can no longer
-- start it, goes back to REQUESTED (FAILED schedule_timeout past max_dispatches).
WITH stuck AS (
    SELECT e.id, e.attempt, e.dispatches, e.worker_id,
           CASE WHEN e.scheduled_at <= now() - make_interval(secs => :schedule_to_start_s)
                THEN 'schedule_to_start_timeout'
                WHEN w.id IS NULL THEN 'worker_missing'
                WHEN w.status <> 'ACTIVE' THEN 'worker_' || lower(w.status)
                ELSE 'worker_stale' END AS why
    FROM executions e
    LEFT JOIN workers w ON w.id = e.worker_id
    WHERE e.status = 'SCHEDULED'
      AND (e.scheduled_at <= now() - make_interval(secs => :schedule_to_start_s)
           OR w.id IS NULL OR w.status <> 'ACTIVE'
           OR w.last_heartbeat_at <= now() - make_interval(secs => :stale_after_s))
    ORDER BY e.scheduled_at
    LIMIT :batch
    FOR UPDATE OF e SKIP LOCKED
)
SELECT 'SCHEDULED' AS from_status, r.to_status, r.reason, count(*) AS n
FROM (SELECT array_agg(id) AS ids, array_agg(attempt) AS attempts,
             array_agg(dispatches) AS dispatches, array_agg(worker_id) AS workers,
             array_agg(why) AS whys
      FROM stuck) s
CROSS JOIN LATERAL vigil_release_dispatches(s.ids, s.attempts, s.dispatches, s.workers,
                                            s.whys, true, :max_dispatches, :exhausted,
                                            :actor) r
GROUP BY r.to_status, r.reason;

-- name: sync
-- A worker's writes of one moment, in one statement (one round trip, one commit): the
-- attempts that ended (vigil_end_attempts) and the dispatches it starts, SCHEDULED ->
-- RUNNING, with what each attempt needs. Every row is fenced by its own token, and the
-- two never touch the same row. A start is idempotent for the same token: if a commit's
-- reply was lost (the database restarted), the retry finds the row already RUNNING for
-- this very dispatch and gets it again (the worker never runs one dispatch twice).
WITH ended AS (
    SELECT * FROM vigil_end_attempts(:end_ids, :end_attempts, :end_dispatches,
                                     array_fill(:worker_id::text,
                                                ARRAY[cardinality(:end_ids::uuid[])]),
                                     :outcomes, :reasons, :retryable, :killed,
                                     :retry_delays_s, :results, :errors, :usages,
                                     'worker:' || :worker_id)
), wanted AS (
    SELECT * FROM unnest(:start_ids::uuid[], :start_attempts::int[], :start_dispatches::int[])
             AS d(id, attempt, dispatch)
), started AS (
    UPDATE executions e
    SET status = 'RUNNING', started_at = now(), updated_at = now()
    FROM wanted d
    WHERE e.id = ANY(:start_ids) AND e.id = d.id AND e.status = 'SCHEDULED'
      AND e.attempt = d.attempt AND e.dispatches = d.dispatch AND e.worker_id = :worker_id
    RETURNING e.*
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor, worker_id)
    SELECT id, attempt, dispatches, 'SCHEDULED', 'RUNNING', :started_reason,
           'worker:' || :worker_id, worker_id
    FROM started
)
SELECT false AS started, id, to_status, reason, NULL AS action, NULL::jsonb AS params,
       NULL::int AS attempt, NULL::int AS dispatch, NULL::int AS timeout_s,
       NULL::jsonb AS checkpoint, NULL::int AS checkpoint_attempt
FROM ended
UNION ALL
SELECT true, id, NULL, NULL, action, params, attempt, dispatches, timeout_s, checkpoint,
       checkpoint_attempt
FROM started
UNION ALL
SELECT true, e.id, NULL, NULL, e.action, e.params, e.attempt, e.dispatches, e.timeout_s,
       e.checkpoint, e.checkpoint_attempt
FROM executions e JOIN wanted d
  ON e.id = d.id AND e.status = 'RUNNING' AND e.attempt = d.attempt
     AND e.dispatches = d.dispatch AND e.worker_id = :worker_id
WHERE e.id = ANY(:start_ids) AND NOT EXISTS (SELECT 1 FROM started s WHERE s.id = e.id);

-- name: running_not_owned
-- Which of a worker's running attempts it no longer owns (cancelled, timed out,
-- reassigned).
SELECT a.id
FROM unnest(:ids::uuid[], :attempts::int[]) AS a(id, attempt)
LEFT JOIN executions e
       ON e.id = a.id AND e.status = 'RUNNING' AND e.attempt = a.attempt
          AND e.worker_id = :worker_id
WHERE e.id IS NULL;

-- name: running_unknown
-- Attempts the database says are RUNNING on a worker that does not know of them (it lost
-- a reply, say): the worker releases them for retry. Starts younger than :grace_s are
-- left alone, as they may still be on their way into the worker's books.
SELECT id, attempt, dispatches AS dispatch FROM executions
WHERE worker_id = :worker_id AND status = 'RUNNING' AND NOT (id = ANY(:known::uuid[]))
  AND started_at < now() - make_interval(secs => :grace_s);

-- name: save_checkpoint
UPDATE executions SET checkpoint = :checkpoint, checkpoint_attempt = attempt, updated_at = now()
WHERE id = :id AND status = 'RUNNING' AND attempt = :attempt AND worker_id = :worker_id
RETURNING id;

-- name: end_abandoned_attempts
-- Timeout monitor: attempts no worker will end. RUNNING on a worker that is LOST,
-- INACTIVE, gone or stale, the attempt ended with its worker: retried (avoiding that
-- worker) or FAILED. RUNNING past its start-to-close timeout: TIMED_OUT, and its worker
-- sees it no longer owns the attempt and kills the child. Both through vigil_end_attempts.
WITH abandoned AS (
    SELECT e.id, e.attempt, e.dispatches, e.worker_id, why.lost,
           CASE WHEN why.lost THEN jsonb_build_object('kind', :lost_kind::text, 'message',
                    format('worker %s stopped answering (%s) during attempt %s', e.worker_id,
                           lower(coalesce(w.status, 'missing')), e.attempt))
                ELSE jsonb_build_object('kind', :timeout_kind::text, 'message',
                    format('still running after %ss', e.timeout_s)) END AS error
    FROM executions e
    LEFT JOIN workers w ON w.id = e.worker_id
    CROSS JOIN LATERAL (
        SELECT w.id IS NULL OR w.status IN ('LOST', 'INACTIVE')
               OR w.last_heartbeat_at <= now() - make_interval(secs => :stale_after_s) AS lost
    ) why
    WHERE e.status = 'RUNNING'
      AND (why.lost OR e.started_at <= now() - make_interval(secs => e.timeout_s))
    LIMIT :batch
    FOR UPDATE OF e SKIP LOCKED
)
SELECT 'RUNNING' AS from_status, r.to_status, r.reason, count(*) AS n
FROM (SELECT array_agg(id) AS ids, array_agg(attempt) AS attempts,
             array_agg(dispatches) AS dispatches, array_agg(worker_id) AS workers,
             array_agg(CASE WHEN lost THEN 'FAILED' ELSE 'TIMED_OUT' END) AS outcomes,
             array_agg(CASE WHEN lost THEN :lost_kind::text ELSE :timeout_reason::text END)
                 AS reasons,
             array_agg(lost) AS retryable, array_agg(lost) AS killed,
             array_agg(CASE WHEN lost THEN :retry_delay_s::float8 END) AS retry_delays_s,
             array_agg(error) AS errors, array_agg(NULL::jsonb) AS nothing
      FROM abandoned) a
CROSS JOIN LATERAL vigil_end_attempts(a.ids, a.attempts, a.dispatches, a.workers,
                                      a.outcomes, a.reasons, a.retryable, a.killed,
                                      a.retry_delays_s, a.nothing, a.errors, a.nothing,
                                      :actor) r
GROUP BY r.to_status, r.reason;

-- name: fail_unassignable
-- Timeout monitor: REQUESTED and due for longer than the queue timeout: no worker took it.
WITH waiting AS (
    SELECT id FROM executions
    WHERE status = 'REQUESTED'
      AND not_before <= now() - make_interval(secs => :queue_timeout_s)
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE executions e
    SET status = 'FAILED', reason = :reason, finished_at = now(),
        error = jsonb_build_object('kind', :kind::text, 'message',
                format('no eligible worker took it within %ss', :queue_timeout_s::float8)),
        updated_at = now()
    FROM waiting
    WHERE e.id = waiting.id AND (e.status = 'REQUESTED') IS TRUE  -- see mark_scheduled
    RETURNING e.id, e.attempt, e.dispatches, e.error
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor, error)
    SELECT id, attempt, dispatches, 'REQUESTED', 'FAILED', :reason, :actor, error FROM moved
)
SELECT 'REQUESTED' AS from_status, 'FAILED' AS to_status, :reason::text AS reason,
       count(*) AS n
FROM moved HAVING count(*) > 0;

-- name: cancel
-- Cancellation works in every non-terminal state; a running child is killed by its
-- worker, which sees it no longer owns the attempt.
WITH before AS (
    SELECT id, status FROM executions
    WHERE id = :id AND status IN ('REQUESTED', 'SCHEDULED', 'RUNNING')
    FOR UPDATE
), moved AS (
    UPDATE executions e
    SET status = 'CANCELLED', reason = :reason, finished_at = now(), updated_at = now(),
        error = jsonb_build_object('kind', :kind::text, 'message', 'cancelled by ' || :actor::text)
    FROM before b
    WHERE e.id = b.id AND e.status = b.status
    RETURNING e.id, e.attempt, e.dispatches, e.worker_id, e.error, b.status AS from_status
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor, worker_id, error)
    SELECT id, attempt, dispatches, from_status, 'CANCELLED', :reason, :actor, worker_id,
           error
    FROM moved
)
SELECT from_status FROM moved;

-- name: retry
-- Finished executions that did not succeed run again, each as a new attempt; only those
-- FAILED for :only_reason if it is not NULL.
WITH before AS (
    SELECT id, status FROM executions
    WHERE id = ANY(:ids::uuid[]) AND (status IN ('FAILED', 'TIMED_OUT', 'CANCELLED')) IS TRUE
      AND (:only_reason::text IS NULL OR (status = 'FAILED' AND reason = :only_reason))
    FOR UPDATE
), moved AS (
    UPDATE executions e
    SET status = 'REQUESTED', attempt = e.attempt + 1,
        max_attempts = greatest(e.max_attempts, e.attempt + 1), dispatches = 0,
        unpublished = 0, not_before = now(), finished_at = NULL,
        reason = NULL, updated_at = now()
    FROM before b
    WHERE e.id = b.id AND e.status = b.status
    RETURNING e.id, e.attempt, b.status AS from_status
), history AS (
    INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                                   reason, actor)
    SELECT id, attempt, 0, from_status, 'REQUESTED', :reason, :actor FROM moved
)
SELECT id, attempt, from_status FROM moved;

-- name: prune
-- Retention: finished executions older than :older_than_s and their history, oldest
-- first, at most :batch at a time. SKIP LOCKED lets executors share the work.
WITH old AS (
    SELECT id FROM executions
    WHERE status IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED')
      AND finished_at < now() - make_interval(secs => :older_than_s)
    ORDER BY finished_at
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
), history AS (
    DELETE FROM execution_history h USING old WHERE h.execution_id = old.id
), gone AS (
    DELETE FROM executions e USING old WHERE e.id = old.id RETURNING e.id
)
SELECT count(*) FROM gone;

-- name: dead_letters
-- Dead letters, newest first: the history rows the executor wrote for dispatches a
-- worker queue dead-lettered (index execution_history_dead_letters). Each filter may be
-- NULL: only the last :since_s seconds, only one execution's.
SELECT h.at, h.execution_id, e.action, h.attempt, h.dispatch, h.worker_id,
       substr(h.reason, length('dead_letter_') + 1) AS cause, h.to_status AS outcome,
       e.status AS status_now
FROM execution_history h
JOIN executions e ON e.id = h.execution_id
WHERE starts_with(h.reason, 'dead_letter_')
  AND (:since_s::float8 IS NULL OR h.at > now() - make_interval(secs => :since_s::float8))
  AND (:execution_id::uuid IS NULL OR h.execution_id = :execution_id)
ORDER BY h.at DESC, h.id DESC
LIMIT :limit;

-- name: failed_dead_lettered
-- Executions FAILED when their last of max_dispatches deliveries was dead-lettered
-- (reason :reason, set by release_dispatches), newest first.
SELECT id FROM executions
WHERE status = 'FAILED' AND reason = :reason
  AND finished_at > now() - make_interval(secs => :since_s)
  AND (:action::text IS NULL OR action = :action)
ORDER BY finished_at DESC
LIMIT :limit;

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
