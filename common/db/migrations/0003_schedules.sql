-- Interval and cron schedules. The executors fire them (services/executor/schedules.py);
-- each firing is an execution whose idempotency key is (schedule, fire time), so two
-- executors can never fire the same time twice.
CREATE TABLE schedules (
    name              text PRIMARY KEY,
    action            text NOT NULL,
    params            jsonb NOT NULL DEFAULT '{}',
    -- For each firing's execution; NULL: the action's defaults, as for a submission.
    max_attempts      integer CHECK (max_attempts > 0),
    timeout_s         integer CHECK (timeout_s > 0),
    every_s           integer CHECK (every_s > 0),
    cron              text,
    -- When the previous firing's execution has not finished: skip this one, allow it,
    -- or cancel the previous one and fire.
    overlap           text NOT NULL CHECK (overlap IN ('skip', 'allow', 'cancel_previous')),
    paused            boolean NOT NULL DEFAULT false,
    next_fire_at      timestamptz NOT NULL,
    last_fired_at     timestamptz,
    last_execution_id uuid REFERENCES executions (id) ON DELETE SET NULL,
    -- Firings skipped for overlap since the last one that fired.
    skipped           integer NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((every_s IS NULL) <> (cron IS NULL))
);

CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE NOT paused;
