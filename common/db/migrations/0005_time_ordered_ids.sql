-- Keeping a big executions table cheap to work on (bench/w5.py measures it).

-- Execution ids are time-ordered: UUID version 7 (48 bits of Unix milliseconds, then
-- random bits; RFC 9562), which PostgreSQL 15 does not have. Rows written together get
-- neighbouring ids, so a dispatch round's updates and history rows land on a few
-- pages of the primary key and of the history index at their right edge. With random
-- ids each row was a random page: with 1M finished executions kept, dispatch ran
-- 25-40% slower, reading and writing back ~120 index pages per round. (`at` is for
-- rows made with a time of their own, as bench/w5.py's fills.)
CREATE FUNCTION vigil_uuid7(at timestamptz DEFAULT clock_timestamp()) RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT encode(
        set_bit(set_bit(  -- version 7: the version nibble 0100 (random) becomes 0111
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(
                        extract(epoch FROM at) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;
ALTER TABLE executions ALTER COLUMN id SET DEFAULT vigil_uuid7();

-- Dispatch claims the oldest due rows through executions_due. A claimed row's entry
-- stays at the front of that index until a vacuum removes it, and every claim walks
-- over those entries: vacuum executions by the number of dead rows rather than by a
-- share of a table that retention keeps days of history in (20% of 1M rows is 200k
-- dead entries), and always clean its indexes (a vacuum that finds few dead rows per
-- page would otherwise skip them, leaving the claim to walk them).
ALTER TABLE executions SET (autovacuum_vacuum_scale_factor = 0,
                            autovacuum_vacuum_threshold = 20000,
                            vacuum_index_cleanup = on);
