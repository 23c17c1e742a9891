-- R5 across instances. Migration 0012's check reads the audit, and a statement does not see
-- what a concurrent transaction has not committed: two instances deciding one intent id at the
-- same moment (a producer gave it to two contacts, whose partitions the two consume) both found
-- nothing, and the id got two effects. So each batch claims the ids it gives a new idempotency
-- outcome, one row per id under a primary key: a second claim of an id waits for the first
-- claim's transaction and then finds it, whatever the timing. The claim names the batch that
-- decided the id, so a claim found tells "decided before" (its batch committed: CC005, as in
-- 0012) from "being decided in a batch in flight" (CC006: the batch is replayed once that one
-- has committed or rolled back). The restore deletes the claims of the batches it rolls back.
CREATE TABLE cc_decided (
    intent_id text    PRIMARY KEY,
    topic     text    NOT NULL,
    partition integer NOT NULL,
    batch_no  bigint  NOT NULL
);

-- Every id decided so far, by the batch of its first outcome (the claims of uncommitted
-- batches are deleted by their partition's restore, as their audit rows are).
INSERT INTO cc_decided (intent_id, topic, partition, batch_no)
SELECT DISTINCT ON (t.intent_id) t.intent_id, t.topic, t.partition, t.batch_no
  FROM cc_transition t
 WHERE cc_is_idempotency_row(t.to_state, t.reason, t.intent_id)
 ORDER BY t.intent_id, t.id;

-- Replaces cc_check_decided_before in the batch write (which keeps it for a binary of the
-- version before, until every instance runs this one). Volatile: after the claims, the next
-- statement's snapshot sees the claims that made them wait.
CREATE FUNCTION cc_claim_decisions(
    p_topic text, p_parts integer[], t_part integer[], t_batch bigint[],
    t_intent text[], t_to text[], t_reason text[]
) RETURNS void LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    taken text[];
    before text;
    in_flight text;
BEGIN
    -- The batch's new idempotency outcomes, but for re-submitted intents (R9: decided again
    -- on purpose), claimed in one order (two writers never deadlock on their claims). An id
    -- claimed already is taken: a concurrent claim is waited for, then found.
    WITH fresh AS (
        SELECT DISTINCT ON (u.intent) u.intent, u.part, u.batch
          FROM unnest(t_intent, t_to, t_reason, t_part, t_batch)
               AS u(intent, to_state, reason, part, batch)
         WHERE cc_is_idempotency_row(u.to_state, u.reason, u.intent)
           AND u.intent NOT IN (SELECT r.intent FROM unnest(t_intent, t_to) AS r(intent, to_state)
                                 WHERE r.to_state = 'resubmitted')
         ORDER BY u.intent
    ), claimed AS (
        INSERT INTO cc_decided (intent_id, topic, partition, batch_no)
        SELECT f.intent, p_topic, f.part, f.batch FROM fresh f ORDER BY f.intent
        ON CONFLICT (intent_id) DO NOTHING
        RETURNING intent_id
    )
    SELECT array_agg(f.intent) INTO taken
      FROM fresh f
     WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.intent_id = f.intent);
    IF taken IS NULL THEN
        RETURN;
    END IF;
    -- Committed batches (or earlier batches of a partition this batch writes, all committed)
    -- decided them before. Any other batch may still commit or roll back, and a claim gone
    -- by now was rolled back by a restore: the batch is tried again.
    SELECT json_agg(x.id ORDER BY x.id) FILTER (WHERE coalesce(s.decided, false)),
           json_agg(x.id ORDER BY x.id) FILTER (WHERE NOT coalesce(s.decided, false))
      INTO before, in_flight
      FROM unnest(taken) AS x(id)
      LEFT JOIN LATERAL (
          SELECT coalesce(cc_is_committed(d.batch_no, p.committed_batch, p.last_batch), true)
                 OR (d.topic = p_topic AND d.partition = ANY(p_parts)) AS decided
            FROM cc_decided d
            LEFT JOIN cc_partition p ON p.topic = d.topic AND p.partition = d.partition
           WHERE d.intent_id = x.id
      ) s ON true;
    IF before IS NOT NULL THEN
        RAISE EXCEPTION 'intents of this batch were decided in an earlier batch'
            USING ERRCODE = 'CC005', DETAIL = before;
    END IF;
    IF in_flight IS NOT NULL THEN
        RAISE EXCEPTION 'intents of this batch are being decided in a batch of another partition not committed yet'
            USING ERRCODE = 'CC006', DETAIL = in_flight;
    END IF;
END;
$$;
