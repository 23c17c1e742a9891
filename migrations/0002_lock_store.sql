-- The lock / idempotency store's bookkeeping: when Redis may be trusted for idempotency misses.
-- See docs/redis-fallback.md and src/store/lock_store.rs.
--
-- Redis holds a copy of every recent terminal outcome (`{prefix}:idem:<intent_id>`) and an epoch
-- key (`{prefix}:idem:epoch` = "<epoch>:<redis run_id>"). A Redis miss means "never seen" only
-- while that key equals this table's epoch (and the server is the one that was synchronised).
-- Every switch of an instance to PostgreSQL bumps the epoch, so no Redis that missed outcomes
-- decided during a fallback is trusted again before it has been re-synchronised.

CREATE TABLE cc_store_state (
    id          integer     PRIMARY KEY CHECK (id = 1),
    -- Bumped by every fallback to PostgreSQL; never decreases.
    epoch       bigint      NOT NULL,
    -- The last mode change of any instance ('redis' | 'postgres'), for operators.
    mode        text        NOT NULL,
    changed_by  text        NOT NULL DEFAULT '',
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO cc_store_state (id, epoch, mode) VALUES (1, 1, 'redis');

-- One row per instance that switched to PostgreSQL and whose decisions may be missing from
-- Redis: terminal outcomes with cc_transition.id > since_id. A resynchronisation copies them and
-- deletes the row. A row whose instance stopped renewing it (crash) is dead after alive_until;
-- while any other instance's row is alive, Redis is not marked in sync.
CREATE TABLE cc_store_fallback (
    instance     text        PRIMARY KEY,
    since_id     bigint      NOT NULL,
    since        timestamptz NOT NULL DEFAULT now(),
    alive_until  timestamptz NOT NULL
);

-- The smallest cc_transition.id whose row was written at or after p_at (max(id) + 1 when none,
-- 1 for an empty table), by binary search over the primary key: about 2*log2(rows) index
-- probes instead of a scan. `at` is the writing transaction's start, so it grows with `id` up
-- to the length of one transaction; callers subtract a margin larger than that.
CREATE FUNCTION cc_transition_id_at(p_at timestamptz) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    lo  bigint;
    hi  bigint;
    mid bigint;
    t   timestamptz;
BEGIN
    SELECT min(id), max(id) INTO lo, hi FROM cc_transition;
    IF lo IS NULL THEN
        RETURN 1;
    END IF;
    hi := hi + 1;
    -- Invariant: the answer is in [lo, hi].
    WHILE lo < hi LOOP
        mid := lo + (hi - lo) / 2;
        SELECT c.at INTO t FROM cc_transition c WHERE c.id >= mid ORDER BY c.id LIMIT 1;
        IF t IS NULL OR t >= p_at THEN
            hi := mid;
        ELSE
            lo := mid + 1;
        END IF;
    END LOOP;
    RETURN lo;
END;
$$;
