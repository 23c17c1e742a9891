-- One definition of two conditions that the statements of the migrations and of the processor
-- share (they were written out in each).
--
-- The audit rows that make up the idempotency record (store::postgres::outcomes): terminal
-- outcomes, but invalid input and unprocessable records (their ids may be anything) and
-- IDEMPOTENCY_CONFLICT rows (they carry the conflicting content's fingerprint). A plain SQL
-- expression, inlined where it is called: a query over cc_transition still implies the
-- intent index's predicate (intent_id <> '') and probes it.
CREATE FUNCTION cc_is_idempotency_row(to_state text, reason text, intent_id text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN to_state IN ('committed_causal', 'blocked_conflict', 'manual_review')
   AND reason NOT IN ('INVALID_INTENT', 'UNPROCESSABLE', 'IDEMPOTENCY_CONFLICT')
   AND intent_id <> '';

-- A partition's batch known to have committed: at or below its committed mark, or followed by
-- a later batch of the partition (at most one batch per partition is ever uncommitted).
CREATE FUNCTION cc_is_committed(batch_no bigint, committed_batch bigint, last_batch bigint)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN batch_no <= committed_batch OR batch_no < last_batch;

-- Migration 0012's check, with the two conditions above.
CREATE OR REPLACE FUNCTION cc_check_decided_before(
    p_topic text, p_parts integer[], t_intent text[], t_to text[], t_reason text[]
) RETURNS void LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    fresh text[];
    again text;
BEGIN
    -- The batch's new idempotency outcomes, but for re-submitted intents.
    SELECT array_agg(DISTINCT u.intent) INTO fresh
      FROM unnest(t_intent, t_to, t_reason) AS u(intent, to_state, reason)
     WHERE cc_is_idempotency_row(u.to_state, u.reason, u.intent)
       AND u.intent NOT IN (SELECT r.intent FROM unnest(t_intent, t_to) AS r(intent, to_state)
                             WHERE r.to_state = 'resubmitted');
    IF fresh IS NULL THEN
        RETURN;
    END IF;
    -- One probe of the intent index for the whole array. The statement's snapshot is from
    -- before this batch's rows.
    SELECT json_agg(DISTINCT t.intent_id)::text INTO again
      FROM cc_transition t
      JOIN cc_partition p ON p.topic = t.topic AND p.partition = t.partition
     WHERE t.intent_id = ANY(fresh)
       AND cc_is_idempotency_row(t.to_state, t.reason, t.intent_id)
       -- Committed batches only, or batches of a partition this batch writes (its earlier
       -- batches all committed). A batch in flight elsewhere may still roll back.
       AND (cc_is_committed(t.batch_no, p.committed_batch, p.last_batch)
            OR (t.topic = p_topic AND t.partition = ANY(p_parts)));
    IF again IS NOT NULL THEN
        RAISE EXCEPTION 'intents of this batch were decided in an earlier batch'
            USING ERRCODE = 'CC005', DETAIL = again;
    END IF;
END;
$$;
