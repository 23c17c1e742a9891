-- R5 says an intent id with an outcome produces no second effect, ever. Redis keeps outcomes
-- for redis.idempotency_ttl and a miss there, while Redis is in sync, is taken for an intent
-- never seen: an intent sent again after its outcome left Redis (and the engine's in-memory
-- window) was decided a second time. PostgreSQL keeps every outcome, so the batch write checks
-- each new idempotency outcome against it, in the same statement (one round trip), and
-- refuses the batch naming the intents decided before (SQLSTATE CC005); the engine puts their
-- outcomes back into Redis and replays the batch, which then finds them.
--
-- Idempotency rows as store::postgres::outcomes::IDEMPOTENCY_ROWS defines them, of committed
-- batches only (a batch in flight may roll back, and its intents must then be decided anew).
-- A batch's own rows do not count (the check may run after its insert in the same statement),
-- nor does an intent the batch re-submits for an operator (R9: it is decided again on purpose).
CREATE FUNCTION cc_check_decided_before(
    p_topic text, p_parts integer[], t_intent text[], t_to text[], t_reason text[]
) RETURNS void LANGUAGE plpgsql STABLE
-- Planned for each call with the batch's own array: a plan cached while the audit was young
-- (a scan looked cheapest then) would be kept as it grows.
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    fresh text[];
    again text;
BEGIN
    -- The batch's new idempotency outcomes, but for re-submitted intents.
    SELECT array_agg(DISTINCT u.intent) INTO fresh
      FROM unnest(t_intent, t_to, t_reason) AS u(intent, to_state, reason)
     WHERE u.to_state IN ('committed_causal', 'blocked_conflict', 'manual_review')
       AND u.reason NOT IN ('INVALID_INTENT', 'UNPROCESSABLE', 'IDEMPOTENCY_CONFLICT')
       AND u.intent <> ''
       AND u.intent NOT IN (SELECT r.intent FROM unnest(t_intent, t_to) AS r(intent, to_state)
                             WHERE r.to_state = 'resubmitted');
    IF fresh IS NULL THEN
        RETURN;
    END IF;
    -- One probe of the intent index for the whole array, like the PostgreSQL lookup. The
    -- statement's snapshot is from before this batch's rows.
    SELECT json_agg(DISTINCT t.intent_id)::text INTO again
      FROM cc_transition t
      JOIN cc_partition p ON p.topic = t.topic AND p.partition = t.partition
     WHERE t.intent_id = ANY(fresh)
       -- (Implies the intent index's predicate: the probe uses it. Without it, a scan of
       -- the whole audit compared each row with the array: 43 s for a batch of 25,000.)
       AND t.intent_id <> ''
       AND t.to_state IN ('committed_causal', 'blocked_conflict', 'manual_review')
       AND t.reason NOT IN ('INVALID_INTENT', 'UNPROCESSABLE', 'IDEMPOTENCY_CONFLICT')
       -- Committed batches only: known committed, followed by a later batch of their
       -- partition (at most one batch per partition is ever uncommitted), or of a partition
       -- this batch writes (its earlier batches all committed). A batch in flight elsewhere
       -- may still roll back.
       AND (t.batch_no <= p.committed_batch OR t.batch_no < p.last_batch
            OR (t.topic = p_topic AND t.partition = ANY(p_parts)));
    IF again IS NOT NULL THEN
        RAISE EXCEPTION 'intents of this batch were decided in an earlier batch'
            USING ERRCODE = 'CC005', DETAIL = again;
    END IF;
END;
$$;
