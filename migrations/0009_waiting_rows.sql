-- Waiting intents in a table of their own (see docs/exactly-once.md, "Waiting intents").
--
-- A contact's state used to carry each waiting intent whole (its record included), so every
-- touch of the contact rewrote all of them, twice (the state and the previous state kept for a
-- rollback). Now an intent's row is written once, by the batch in which it starts waiting, and
-- the state names it by (commit_sequence, row): the batch that wrote the row. The batch that
-- releases it (committed, timed out, skipped) only drops the name from the state; the row is
-- deleted by the partition's next batch, when the releasing batch is known committed, so a
-- restore that rolls the releasing batch back finds it again. States written before this
-- migration keep their waiting intents inline; they are read as before, and move to rows the
-- next time their contact is written.

CREATE TABLE cc_waiting (
    contact_id       text    NOT NULL,
    commit_sequence  bigint  NOT NULL,
    -- The batch that wrote the row (the intent started waiting in it).
    batch_no         bigint  NOT NULL,
    -- The waiting intent as the sequencer exports it: commit_sequence, since, intent (with
    -- the original record, byte for byte).
    entry            jsonb   NOT NULL,
    PRIMARY KEY (contact_id, commit_sequence, batch_no)
);

-- A contact state with its waiting intents' rows put back in place (each entry also names its
-- row), the form every reader decodes. A name whose row is missing becomes null: the state
-- is then unreadable, never silently short of an intent.
CREATE FUNCTION cc_resolved_state(p_contact text, p_state jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN p_state IS NULL OR NOT jsonb_path_exists(p_state, '$.waiting[*].row') THEN p_state
        ELSE jsonb_set(p_state, '{waiting}', (
            SELECT coalesce(jsonb_agg(CASE WHEN x ? 'row'
                                           THEN w.entry || jsonb_build_object('row', w.batch_no)
                                           ELSE x END ORDER BY n), '[]'::jsonb)
              FROM jsonb_array_elements(p_state -> 'waiting') WITH ORDINALITY AS e(x, n)
              LEFT JOIN cc_waiting w
                ON w.contact_id = p_contact
               AND w.commit_sequence = (x ->> 'commit_sequence')::bigint
               AND w.batch_no = (x ->> 'row')::bigint))
    END
$$;

DROP FUNCTION cc_apply_batch(text, text, integer, integer[], bigint[], bigint[], bigint[],
    bigint[], integer[], bigint[], bigint[], text[], text[], text[], text[], text[], text[],
    text[], bigint[], bigint[], bigint[], text[], bigint[], text[], integer[], bigint[],
    jsonb[], boolean[], integer[], bigint[], bigint[], text[]);

CREATE FUNCTION cc_apply_batch(
    p_topic text, p_writer text, p_lease_ms integer,
    p_parts integer[], p_fences bigint[], p_batches bigint[], p_next_offsets bigint[],
    p_clocks bigint[],
    t_part integer[], t_batch bigint[], t_offset bigint[], t_intent text[], t_contact text[],
    t_clinic text[], t_corr text[], t_from text[], t_to text[], t_reason text[],
    t_seq bigint[], t_version bigint[], t_fp bigint[], t_detail text[], t_fence bigint[],
    c_contact text[], c_part integer[], c_batch bigint[], c_state jsonb[], c_hold boolean[],
    c_waiting integer[],
    m_id bigint[], m_batch bigint[], m_result text[],
    w_contact text[], w_seq bigint[], w_batch bigint[], w_entry jsonb[],
    g_contact text[], g_seq bigint[], g_batch bigint[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n integer;
    bad text;
BEGIN
    UPDATE cc_partition p
       SET committed_batch = p.last_batch,
           committed_next_offset = p.last_next_offset,
           committed_clock_ms = p.last_clock_ms,
           last_batch = x.b,
           last_next_offset = x.next_offset,
           last_clock_ms = x.clock,
           lease_until = now() + make_interval(secs => p_lease_ms / 1000.0),
           updated_at = now()
      FROM unnest(p_parts, p_fences, p_batches, p_next_offsets, p_clocks)
           AS x(part, fence, b, next_offset, clock)
     WHERE p.topic = p_topic AND p.partition = x.part AND p.fence = x.fence
       AND p.last_batch = x.b - 1;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n <> coalesce(cardinality(p_parts), 0) THEN
        SELECT string_agg(x.part::text, ', ') INTO bad
          FROM unnest(p_parts, p_fences) AS x(part, fence)
         WHERE NOT EXISTS (SELECT 1 FROM cc_partition p
                            WHERE p.topic = p_topic AND p.partition = x.part
                              AND p.fence = x.fence);
        IF bad IS NOT NULL THEN
            RAISE EXCEPTION 'fenced: partition(s) % of this batch have a newer owner', bad
                USING ERRCODE = 'CC001';
        END IF;
        RAISE EXCEPTION 'batch out of sequence: a partition of this batch did not last write the batch before it'
            USING ERRCODE = 'CC003';
    END IF;

    INSERT INTO cc_transition (topic, partition, batch_no, source_offset, intent_id, contact_id,
                               clinic_id, correlation_id, from_state, to_state, reason,
                               commit_sequence, contact_version, fingerprint, detail, writer,
                               fence)
    SELECT p_topic, u.part, u.b, u.off, u.intent, u.contact, u.clinic, u.corr, u.f, u.t,
           u.reason, u.seq, u.version, u.fp, u.detail, p_writer, u.fence
      FROM unnest(t_part, t_batch, t_offset, t_intent, t_contact, t_clinic, t_corr, t_from,
                  t_to, t_reason, t_seq, t_version, t_fp, t_detail, t_fence)
           AS u(part, b, off, intent, contact, clinic, corr, f, t, reason, seq, version, fp,
                detail, fence);

    -- A contact is written only by the partition that owns it (or creates it). The row lock of
    -- ON CONFLICT serialises two partitions creating the same contact: the second one sees the
    -- first one's row and is refused. (The owners are read by a second statement, whose
    -- snapshot sees a row committed while the first one waited.)
    WITH written AS (
        INSERT INTO cc_contact AS c (contact_id, topic, partition, batch_no, state, on_hold,
                                     waiting, updated_at)
        SELECT u.contact, p_topic, u.part, u.b, u.state, u.hold, u.waiting, now()
          FROM unnest(c_contact, c_part, c_batch, c_state, c_hold, c_waiting)
               AS u(contact, part, b, state, hold, waiting)
        ON CONFLICT (contact_id) DO UPDATE
           SET prev_state = c.state,
               prev_batch_no = c.batch_no,
               state = EXCLUDED.state,
               batch_no = EXCLUDED.batch_no,
               on_hold = EXCLUDED.on_hold,
               waiting = EXCLUDED.waiting,
               updated_at = now()
         WHERE c.topic = EXCLUDED.topic AND c.partition = EXCLUDED.partition
        RETURNING 1
    )
    SELECT count(*) INTO n FROM written;
    IF n <> coalesce(cardinality(c_contact), 0) THEN
        SELECT json_agg(json_build_object('partition', u.part, 'contact', u.contact,
                                          'owner', c.partition))::text
          INTO bad
          FROM unnest(c_contact, c_part) AS u(contact, part)
          JOIN cc_contact c ON c.contact_id = u.contact
         WHERE c.partition <> u.part OR c.topic <> p_topic;
        RAISE EXCEPTION 'contacts of this batch are owned by another partition'
            USING ERRCODE = 'CC004', DETAIL = coalesce(bad, '[]');
    END IF;

    UPDATE cc_command m
       SET applied_batch = x.b, result = x.result
      FROM unnest(m_id, m_batch, m_result) AS x(id, b, result)
     WHERE m.id = x.id;

    -- Intents that started waiting in this batch (their contacts were written above, so the
    -- owner check covers them too).
    INSERT INTO cc_waiting (contact_id, commit_sequence, batch_no, entry)
    SELECT u.contact, u.seq, u.b, u.entry
      FROM unnest(w_contact, w_seq, w_batch, w_entry) AS u(contact, seq, b, entry);

    -- Rows the partitions' previous batch released: that batch has committed (this one is
    -- written), so no state that a restore may load names them any more.
    DELETE FROM cc_waiting w
     USING unnest(g_contact, g_seq, g_batch) AS g(contact, seq, b)
     WHERE w.contact_id = g.contact AND w.commit_sequence = g.seq AND w.batch_no = g.b;
END;
$$;


-- Migration 0008's setting, lost with the function it was set on.
ALTER FUNCTION cc_apply_batch(text, text, integer, integer[], bigint[], bigint[], bigint[],
    bigint[], integer[], bigint[], bigint[], text[], text[], text[], text[], text[], text[],
    text[], bigint[], bigint[], bigint[], text[], bigint[], text[], integer[], bigint[],
    jsonb[], boolean[], integer[], bigint[], bigint[], text[], text[], bigint[], bigint[],
    jsonb[], text[], bigint[], bigint[]) SET work_mem = '64MB';
