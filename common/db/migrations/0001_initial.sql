-- Workers, executions and their history. Every timestamp is database time.

CREATE TABLE workers (
    id                 text PRIMARY KEY,
    name               text NOT NULL,
    hostname           text NOT NULL,
    pid                integer NOT NULL,
    status             text NOT NULL
                       CHECK (status IN ('ACTIVE', 'DRAINING', 'INACTIVE', 'LOST')),
    runtimes           text[] NOT NULL,
    actions            text[] NOT NULL,
    capacity           integer NOT NULL CHECK (capacity > 0),
    memory_bytes       bigint,
    memory_limit_bytes bigint,
    memory_pressure    boolean NOT NULL DEFAULT false,
    started_at         timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    stopped_at         timestamptz,
    status_reason      text
);

-- What workers offer, with the defaults a submission gets unless it sets them.
CREATE TABLE actions (
    name         text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
    max_attempts integer NOT NULL CHECK (max_attempts >= 1),
    timeout_s    integer NOT NULL CHECK (timeout_s > 0),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE executions (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    action          text NOT NULL CHECK (length(action) BETWEEN 1 AND 200),
    params          jsonb NOT NULL DEFAULT '{}',
    status          text NOT NULL
                    CHECK (status IN ('REQUESTED', 'SCHEDULED', 'RUNNING', 'SUCCEEDED',
                                      'FAILED', 'TIMED_OUT', 'CANCELLED')),
    -- (attempt, dispatches, worker_id) is the fencing token: every transition
    -- compares it, so a late or duplicate actor changes nothing.
    attempt         integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    max_attempts    integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    dispatches      integer NOT NULL DEFAULT 0 CHECK (dispatches >= 0),
    -- Dispatches of this attempt whose publish failed: they never reached a worker, so
    -- they don't count against max_dispatches (losing the broker costs only latency).
    unpublished     integer NOT NULL DEFAULT 0 CHECK (unpublished >= 0),
    -- The worker of the current attempt; kept on release so a retry can avoid it.
    worker_id       text,
    timeout_s       integer NOT NULL DEFAULT 3600 CHECK (timeout_s > 0),
    idempotency_key text UNIQUE,
    not_before      timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    scheduled_at    timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz,
    result          jsonb,
    error           jsonb,
    reason          text,
    checkpoint      jsonb
);

CREATE INDEX executions_due ON executions (action, not_before) WHERE status = 'REQUESTED';
CREATE INDEX executions_in_flight ON executions (worker_id, status)
    WHERE status IN ('SCHEDULED', 'RUNNING');
CREATE INDEX executions_created ON executions (created_at DESC);

CREATE TABLE execution_history (
    id           bigserial PRIMARY KEY,
    execution_id uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    dispatch     integer NOT NULL,
    from_status  text,
    to_status    text NOT NULL,
    reason       text NOT NULL,
    actor        text NOT NULL,
    worker_id    text,
    -- The error of the attempt this transition ended, so each attempt keeps its cause.
    error        jsonb,
    at           timestamptz NOT NULL DEFAULT now(),
    -- A lifecycle event happens once per (execution, attempt, dispatch, state).
    UNIQUE (execution_id, attempt, dispatch, to_status)
);

-- Wake the executors when there is something to dispatch or a slot frees up.
CREATE FUNCTION notify_dispatch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('vigil_dispatch', '');
    RETURN NULL;
END $$;

CREATE TRIGGER executions_wake_dispatch
    AFTER INSERT OR UPDATE OF status ON executions
    FOR EACH STATEMENT EXECUTE FUNCTION notify_dispatch();

CREATE TRIGGER workers_wake_dispatch
    AFTER INSERT OR UPDATE OF status, memory_pressure ON workers
    FOR EACH STATEMENT EXECUTE FUNCTION notify_dispatch();
