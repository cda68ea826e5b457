-- Dispatch rounds of a useful size, and no write when a round has nothing to do.
--
-- A round has a fixed cost (lock the workers, count their slots, claim, one commit, one
-- message per worker) whatever it carries; topping a worker up one dispatch at a time,
-- as each attempt ended, paid it for ~5 rows. Now a worker is eligible only while more
-- than half of its prefetch is free: under load its rounds carry at least prefetch / 2 + 1
-- dispatches, and a worker with an idle child (free > prefetch) is always eligible, so
-- latency at low load is unchanged. With prefetch 0 or 1 the rule is the old one.
--
-- Locking the workers makes a round a write (a transaction id, a commit to flush), so a
-- round first looks, without locks, whether an eligible worker offers an action with due
-- work. Most wake-ups find none: under load the workers are full, and at low load the
-- wake-up after an attempt ends finds nothing waiting. Looking without the lock is safe:
-- a concurrent round can only take slots and work away, and whatever adds either (a
-- submit, an attempt ending, a worker joining) notifies the executors again after it
-- commits, while work that only becomes due with time is the executor's timer's.
-- Otherwise vigil_dispatch is as in 0004, whose comment describes it.

-- The eligible workers and their free slots, as of this statement. (A LATERAL aggregate
-- counts each worker's executions once; as a scalar subquery, the planner evaluated the
-- count again for every place `free` is used.)
CREATE FUNCTION vigil_free_slots(p_stale_after_s float8)
RETURNS TABLE (id text, free integer)
LANGUAGE sql STABLE AS $$
    SELECT w.id, slots.free
    FROM workers w
    CROSS JOIN LATERAL (
        SELECT (w.capacity + w.prefetch - count(*))::integer AS free
        FROM executions e
        WHERE e.worker_id = w.id AND e.status IN ('SCHEDULED', 'RUNNING')) slots
    WHERE w.status = 'ACTIVE' AND NOT w.memory_pressure
      AND w.last_heartbeat_at > now() - make_interval(secs => p_stale_after_s)
      AND slots.free > w.prefetch / 2
$$;

CREATE OR REPLACE FUNCTION vigil_dispatch(p_round uuid, p_batch integer, p_stale_after_s float8,
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
    -- One index probe per offered action (LATERAL ... LIMIT 1: as a semi-join, the
    -- planner may hash every due row instead).
    IF NOT EXISTS (
        SELECT 1
        FROM vigil_free_slots(p_stale_after_s) f
        JOIN workers w ON w.id = f.id
        CROSS JOIN LATERAL unnest(w.actions) AS offered(action)
        CROSS JOIN LATERAL (SELECT 1 FROM executions e
                            WHERE e.status = 'REQUESTED' AND e.action = offered.action
                              AND e.not_before <= now()
                            LIMIT 1) due
    ) THEN
        RETURN;
    END IF;
    PERFORM 1 FROM workers WHERE status = 'ACTIVE' ORDER BY workers.id FOR UPDATE;

    SELECT array_agg(w.id ORDER BY w.id), array_agg(w.free ORDER BY w.id) INTO ids, free
    FROM vigil_free_slots(p_stale_after_s) w;
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
