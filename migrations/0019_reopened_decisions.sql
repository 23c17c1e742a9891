-- An intent an operator re-submitted (R9) that has to wait is decided again in a later batch
-- than the one that re-submitted it. Migration 0015's claims exempted a re-submitted id only
-- in the batch that carries its `resubmitted` row, so that later decision found the id's claim
-- from its first decision and was refused as decided before (CC005); the engine replayed the
-- batch, which decided it again, and the partition stalled for good: a re-submitted intent
-- whose predecessor had not come could neither commit nor time out again (test
-- admin::a_resubmitted_intent_that_waits_again_times_out_again_and_commits_once_its_predecessor_comes).
-- Now a claimed id is also free to be decided when its latest reopening (a `resubmitted` row
-- of a committed batch, or of a partition this batch writes) has no idempotency row after it:
-- the operator reopened its decision and nothing has decided it since. Its claim stays as it
-- was (the batch of its first decision): a restore, which deletes the claims and audit rows of
-- the batches it rolls back, leaves it untouched, and a replay finds the reopening again. Only
-- ids whose claim is taken are looked at, through the audit's intent index: nothing is added
-- to a batch without such ids.
CREATE OR REPLACE FUNCTION cc_claim_decisions(
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
    -- Reopened and not decided since: decided again on purpose, in a later batch.
    SELECT array_agg(x.id) INTO taken
      FROM unnest(taken) AS x(id)
     WHERE NOT EXISTS (
         SELECT 1
           FROM cc_transition r
           JOIN cc_partition rp ON rp.topic = r.topic AND rp.partition = r.partition
          WHERE r.intent_id = x.id AND r.to_state = 'resubmitted'
            AND (cc_is_committed(r.batch_no, rp.committed_batch, rp.last_batch)
                 OR (r.topic = p_topic AND r.partition = ANY(p_parts)))
            AND NOT EXISTS (
                SELECT 1 FROM cc_transition o
                 WHERE o.intent_id = x.id AND o.id > r.id
                   AND cc_is_idempotency_row(o.to_state, o.reason, o.intent_id)
            )
     );
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
