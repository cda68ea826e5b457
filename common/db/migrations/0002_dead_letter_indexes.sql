-- `vigil dead-letters` reads two small slices of big tables: the history rows of dead
-- letters, and the executions FAILED because their last delivery was dead-lettered.
CREATE INDEX execution_history_dead_letters ON execution_history (at DESC)
    WHERE starts_with(reason, 'dead_letter_');
CREATE INDEX executions_failed_dead_lettered ON executions (finished_at DESC)
    WHERE status = 'FAILED' AND reason = 'max_dispatches';
