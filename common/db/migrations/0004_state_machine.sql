-- The rules every transition shares, written once as SQL functions that the queries in
-- common/db/sql/executions.sql call (common/state_machine.py holds the vocabulary and
-- the table of allowed transitions). To change a rule, replace its function in a new
-- migration. Also: what attempts use and how they ended (seed 003), where checkpoints
-- came from (seed 004), and a dispatch wake-up only when there is something to dispatch.

-- How many of its attempts were killed (by a signal, their memory cap or the loss of
-- their worker): an execution whose every attempt was killed is a poison pill.
ALTER TABLE executions ADD COLUMN killed_attempts integer NOT NULL DEFAULT 0
    CHECK (killed_attempts >= 0);
-- The attempt that saved the current checkpoint (NULL: none was ever saved). A retry of
-- a resumable action that finds this set but no checkpoint is a bug, caught loudly.
ALTER TABLE executions ADD COLUMN checkpoint_attempt integer;
-- What the attempt a transition ended used: peak RSS, CPU seconds, wall seconds.
ALTER TABLE execution_history ADD COLUMN usage jsonb;
-- The dispatch round that last scheduled it: an executor whose round's COMMIT reply was
-- lost asks which rows the round committed, and publishes those at once.
ALTER TABLE executions ADD COLUMN dispatch_round uuid;
-- Dispatches a worker may hold beyond the attempts it runs (capacity): dispatch fills
-- capacity + prefetch, so that a worker's free child never waits for the next one.
ALTER TABLE workers ADD COLUMN prefetch integer NOT NULL DEFAULT 0 CHECK (prefetch >= 0);

-- An idempotency key is optional: only the rows that have one need the unique index.
ALTER TABLE executions DROP CONSTRAINT executions_idempotency_key_key;
CREATE UNIQUE INDEX executions_idempotency_key ON executions (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Dispatch takes due executions oldest first, ties by id (a batch submitted in one
-- transaction shares its not_before): the index hands them over in exactly that order,
-- instead of a sort of every tied row.
DROP INDEX executions_due;
CREATE INDEX executions_due ON executions (action, not_before, id) WHERE status = 'REQUESTED';
-- Retention deletes finished executions oldest first.
CREATE INDEX executions_finished ON executions (finished_at)
    WHERE status IN ('SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED');
-- History rows are deleted with their execution (by retention, which does both in one
-- statement), so the foreign key's per-row check on every transition is dropped. The
-- unique (execution_id, ...) constraint still finds an execution's history.
ALTER TABLE execution_history DROP CONSTRAINT execution_history_execution_id_fkey;

-- What an ended attempt leads to. `outcome` is the status it asks for (SUCCEEDED,
-- FAILED, TIMED_OUT) and `ended_for` the reason to record. A failure that may be
-- retried (the caller knows: common/state_machine.py NEVER_RETRY) gets another attempt
-- while attempts are left: REQUESTED again, attempt + 1, its dispatch count reset, not
-- before the backoff. Any other end is final; a FAILED one whose every attempt was
-- killed (the caller knows: KILLED) is a poison pill and ends `poison` (seed 003).
CREATE FUNCTION vigil_after_attempt(
    e executions, outcome text, ended_for text, retryable boolean, killed boolean,
    retry_delay_s float8)
RETURNS TABLE (status text, reason text, attempt integer, dispatches integer,
               unpublished integer, not_before timestamptz, finished_at timestamptz,
               killed_attempts integer)
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN again THEN 'REQUESTED' ELSE outcome END,
           CASE WHEN NOT again AND outcome = 'FAILED' AND killed_now = e.attempt
                THEN 'poison' ELSE ended_for END,
           e.attempt + again::int,
           CASE WHEN again THEN 0 ELSE e.dispatches END,
           CASE WHEN again THEN 0 ELSE e.unpublished END,
           CASE WHEN again THEN now() + make_interval(secs => coalesce(retry_delay_s, 0))
                ELSE e.not_before END,
           CASE WHEN again THEN NULL ELSE now() END,
           killed_now
    FROM (SELECT outcome = 'FAILED' AND retryable AND e.attempt < e.max_attempts AS again,
                 e.killed_attempts + killed::int AS killed_now) AS decision
$$;

-- What a dispatch that never started leads to: back to REQUESTED for another one, or
-- FAILED (`exhausted`) once the attempt has been delivered max_dispatches times. A
-- dispatch that never reached a willing worker (`counted` false: the publish failed,
-- or the worker gave it back while stopping or short of memory) does not count.
CREATE FUNCTION vigil_after_dispatch(
    e executions, counted boolean, max_dispatches integer, exhausted text, why text)
RETURNS TABLE (status text, reason text, unpublished integer, finished_at timestamptz,
               error jsonb)
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN failed THEN 'FAILED' ELSE 'REQUESTED' END,
           CASE WHEN failed THEN exhausted END,
           e.unpublished + (NOT counted)::int,
           CASE WHEN failed THEN now() END,
           CASE WHEN failed THEN jsonb_build_object(
               'kind', exhausted, 'message',
               format('not started after %s dispatches; last: %s',
                      e.dispatches - e.unpublished, why)) END
    FROM (SELECT counted AND e.dispatches - e.unpublished >= max_dispatches AS failed) AS d
$$;

-- Attempts that ended, each fenced by its token (id, attempt, dispatch, worker): what
-- each leads to is vigil_after_attempt's rule; the history row is written with the move.
-- (PL/pgSQL rather than SQL, so that the statement's plan is kept between calls.)
-- Used by the workers (outcomes) and the timeout monitor (lost workers, timeouts), so an
-- attempt ends the same way whoever ends it.
CREATE FUNCTION vigil_end_attempts(
    p_ids uuid[], p_attempts integer[], p_dispatches integer[], p_workers text[],
    p_outcomes text[], p_reasons text[], p_retryable boolean[], p_killed boolean[],
    p_retry_delays_s float8[], p_results jsonb[], p_errors jsonb[], p_usages jsonb[],
    p_actor text)
RETURNS TABLE (id uuid, to_status text, reason text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    IF cardinality(p_ids) = 0 THEN  -- a worker's sync with starts only
        RETURN;
    END IF;
    RETURN QUERY
    WITH moved AS (
        UPDATE executions e
        SET (status, reason, attempt, dispatches, unpublished, not_before, finished_at,
             killed_attempts)
                = (SELECT * FROM vigil_after_attempt(e, o.outcome, o.reason, o.retryable,
                                                     o.killed, o.retry_delay_s)),
            result = o.result, error = o.error, updated_at = now()
        FROM unnest(p_ids, p_attempts, p_dispatches, p_workers, p_outcomes, p_reasons,
                    p_retryable, p_killed, p_retry_delays_s, p_results, p_errors, p_usages)
             AS o(id, attempt, dispatch, worker_id, outcome, reason, retryable, killed,
                  retry_delay_s, result, error, usage)
        WHERE e.id = ANY(p_ids) AND e.id = o.id AND e.status = 'RUNNING'
          AND e.attempt = o.attempt AND e.dispatches = o.dispatch AND e.worker_id = o.worker_id
        RETURNING e.id, e.attempt, e.dispatches, e.status, e.reason, e.worker_id, e.error,
                  o.usage
    ), history AS (
        INSERT INTO execution_history (execution_id, attempt, dispatch, from_status,
                                       to_status, reason, actor, worker_id, error, usage)
        SELECT id, attempt, dispatches, 'RUNNING', status, reason, p_actor, worker_id,
               error, usage
        FROM moved
    )
    SELECT m.id, m.status, m.reason FROM moved m;
END $$;

-- Dispatches that never started, each fenced by its token: back to REQUESTED, or FAILED
-- (vigil_after_dispatch's rule); the history row records why each came back. Used by the
-- executors (failed publishes, dead letters), the workers (deliveries they gave back)
-- and the timeout monitor (SCHEDULED too long, or on a worker that is gone).
CREATE FUNCTION vigil_release_dispatches(
    p_ids uuid[], p_attempts integer[], p_dispatches integer[], p_workers text[],
    p_reasons text[], p_counted boolean, p_max_dispatches integer, p_exhausted text,
    p_actor text)
RETURNS TABLE (id uuid, to_status text, reason text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH moved AS (
        UPDATE executions e
        SET (status, reason, unpublished, finished_at, error)
                = (SELECT * FROM vigil_after_dispatch(e, p_counted, p_max_dispatches,
                                                      p_exhausted, d.reason)),
            updated_at = now()
        FROM unnest(p_ids, p_attempts, p_dispatches, p_workers, p_reasons)
             AS d(id, attempt, dispatch, worker_id, reason)
        WHERE e.id = ANY(p_ids) AND e.id = d.id AND e.status = 'SCHEDULED'
          AND e.attempt = d.attempt AND e.dispatches = d.dispatch
          AND e.worker_id = d.worker_id
        RETURNING e.id, e.attempt, e.dispatches, e.status, e.worker_id, d.reason
    ), history AS (
        INSERT INTO execution_history (execution_id, attempt, dispatch, from_status,
                                       to_status, reason, actor, worker_id)
        SELECT id, attempt, dispatches, 'SCHEDULED', status, reason, p_actor, worker_id
        FROM moved
    )
    SELECT m.id, m.status, m.reason FROM moved m;
END $$;

-- One dispatch round in one call (so one round trip and one commit), `p_round` naming it:
-- 1. lock the ACTIVE workers, in id order, so that concurrent executors serialise their
--    slot accounting and never deadlock;
-- 2. count each eligible worker's free slots (ACTIVE, fresh heartbeat by database time,
--    not short of memory: capacity + prefetch - what is SCHEDULED or RUNNING on it), in a
--    statement of its own, so that it sees what the round before this one committed;
-- 3. claim, per action, at most as many due REQUESTED executions as there are free slots
--    for it (oldest first, SKIP LOCKED), so that one action's backlog never holds back
--    another's;
-- 4. give each claimed execution to the worker offering its action with the most free
--    slots, avoiding the worker of its previous attempt when another can take it;
-- 5. mark them SCHEDULED, with their history rows. Claimed executions no worker could
--    take stay REQUESTED.
CREATE FUNCTION vigil_dispatch(p_round uuid, p_batch integer, p_stale_after_s float8,
                               p_reason text, p_actor text)
RETURNS TABLE (id uuid, attempt integer, dispatch integer, worker_id text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    ids text[];  -- the eligible workers, and what each may still take
    free integer[];
    offer_worker integer[];  -- (worker, action) pairs: who offers what
    offer_action text[];
    claimed record;
    best integer;
    best_rank integer;
    rank integer;
    chosen_ids uuid[] := '{}';
    chosen_attempts integer[] := '{}';
    chosen_workers text[] := '{}';
BEGIN
    PERFORM 1 FROM workers WHERE status = 'ACTIVE' ORDER BY workers.id FOR UPDATE;

    SELECT array_agg(w.id ORDER BY w.id), array_agg(w.free ORDER BY w.id) INTO ids, free
    FROM (SELECT w.id, w.capacity + w.prefetch - (
                     SELECT count(*) FROM executions e
                     WHERE e.worker_id = w.id AND e.status IN ('SCHEDULED', 'RUNNING')) AS free
          FROM workers w
          WHERE w.status = 'ACTIVE' AND NOT w.memory_pressure
            AND w.last_heartbeat_at > now() - make_interval(secs => p_stale_after_s)) w
    WHERE w.free > 0;
    IF ids IS NULL THEN
        RETURN;
    END IF;
    SELECT array_agg(o.n), array_agg(o.action) INTO offer_worker, offer_action
    FROM (SELECT t.n, unnest(w.actions) AS action
          FROM unnest(ids) WITH ORDINALITY AS t(id, n) JOIN workers w ON w.id = t.id) o;

    FOR claimed IN
        SELECT c.id, c.action, c.attempt, c.worker_id AS previous
        FROM (SELECT o.action, least(p_batch, sum(free[o.n]))::int AS n
              FROM unnest(offer_worker, offer_action) AS o(n, action)
              GROUP BY o.action) AS wanted
        CROSS JOIN LATERAL (
            SELECT e.id, e.action, e.attempt, e.worker_id, e.not_before
            FROM executions e
            WHERE e.status = 'REQUESTED' AND e.action = wanted.action AND e.not_before <= now()
            ORDER BY e.not_before, e.id
            LIMIT wanted.n
            FOR UPDATE SKIP LOCKED
        ) c
        ORDER BY c.not_before, c.id
        LIMIT p_batch
    LOOP
        best := NULL;
        best_rank := -1;
        FOR k IN 1 .. cardinality(offer_worker) LOOP
            CONTINUE WHEN offer_action[k] <> claimed.action OR free[offer_worker[k]] = 0;
            -- Not its previous worker first, then the most free slots.
            rank := free[offer_worker[k]]
                    + CASE WHEN ids[offer_worker[k]] IS DISTINCT FROM claimed.previous
                           THEN 1000000 ELSE 0 END;
            IF rank > best_rank THEN
                best := offer_worker[k];
                best_rank := rank;
            END IF;
        END LOOP;
        CONTINUE WHEN best IS NULL;
        free[best] := free[best] - 1;
        chosen_ids := chosen_ids || claimed.id;
        chosen_attempts := chosen_attempts || claimed.attempt;
        chosen_workers := chosen_workers || ids[best];
    END LOOP;

    RETURN QUERY
    WITH moved AS (
        UPDATE executions e
        SET status = 'SCHEDULED', worker_id = a.worker_id, dispatches = e.dispatches + 1,
            dispatch_round = p_round, scheduled_at = now(), updated_at = now()
        FROM unnest(chosen_ids, chosen_attempts, chosen_workers) AS a(id, attempt, worker_id)
        -- By primary key: (...) IS TRUE keeps the planner off the index of every
        -- REQUESTED row (a plan kept from when the table was small would read them all).
        WHERE e.id = ANY(chosen_ids) AND e.id = a.id AND (e.status = 'REQUESTED') IS TRUE
          AND e.attempt = a.attempt
        RETURNING e.id, e.attempt, e.dispatches, e.worker_id
    ), history AS (
        INSERT INTO execution_history (execution_id, attempt, dispatch, from_status,
                                       to_status, reason, actor, worker_id)
        SELECT m.id, m.attempt, m.dispatches, 'REQUESTED', 'SCHEDULED', p_reason, p_actor,
               m.worker_id
        FROM moved m
    )
    SELECT m.id, m.attempt, m.dispatches, m.worker_id FROM moved m;
END $$;

-- Wake the executors when there is something to dispatch: new work, or a slot freed by
-- an execution leaving SCHEDULED or RUNNING. A start (SCHEDULED -> RUNNING) or a
-- checkpoint changes neither, so it wakes nobody.
DROP TRIGGER executions_wake_dispatch ON executions;

CREATE FUNCTION notify_dispatch_if_due() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM changed WHERE status NOT IN ('SCHEDULED', 'RUNNING')) THEN
        PERFORM pg_notify('vigil_dispatch', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER executions_wake_dispatch_on_insert
    AFTER INSERT ON executions
    FOR EACH STATEMENT EXECUTE FUNCTION notify_dispatch();
CREATE TRIGGER executions_wake_dispatch_on_update
    AFTER UPDATE ON executions REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION notify_dispatch_if_due();
