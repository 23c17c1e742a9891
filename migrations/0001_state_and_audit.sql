-- Durable state and audit of causal-commit. See docs/exactly-once.md for how these tables are
-- kept consistent with the Kafka transactions (recovery points tagged with a batch number).

-- Fencing tokens: strictly increasing, never reused.
CREATE SEQUENCE cc_fence_seq;

-- One row per input partition: its lease (owner, lease_until), the owner's fencing token, and
-- the last batch it wrote. Every batch write checks the token: a writer whose lease moved on
-- cannot change durable state.
CREATE TABLE cc_partition (
    topic        text        NOT NULL,
    partition    integer     NOT NULL,
    fence        bigint      NOT NULL,
    owner        text        NOT NULL,
    lease_until  timestamptz NOT NULL,
    last_batch   bigint      NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- The sequencer's state per contact (high-water mark, version, hold, waiting intents), with the
-- previous version kept until the batch that wrote the current one is known to be committed.
CREATE TABLE cc_contact (
    contact_id     text        PRIMARY KEY,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    batch_no       bigint      NOT NULL,
    state          jsonb       NOT NULL,
    prev_batch_no  bigint,
    prev_state     jsonb,
    on_hold        boolean     NOT NULL DEFAULT false,
    waiting        integer     NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cc_contact_partition ON cc_contact (topic, partition);
CREATE INDEX cc_contact_on_hold ON cc_contact (on_hold) WHERE on_hold;

-- Append-only audit of every transition of every consumed record; also the durable
-- idempotency record (the terminal outcome of an intent_id).
CREATE TABLE cc_transition (
    id               bigserial   PRIMARY KEY,
    topic            text        NOT NULL,
    partition        integer     NOT NULL,
    batch_no         bigint      NOT NULL,
    source_offset    bigint      NOT NULL,
    intent_id        text        NOT NULL,
    contact_id       text        NOT NULL,
    clinic_id        text        NOT NULL,
    correlation_id   text        NOT NULL,
    from_state       text        NOT NULL,
    to_state         text        NOT NULL,
    reason           text        NOT NULL DEFAULT '',
    commit_sequence  bigint      NOT NULL DEFAULT 0,
    contact_version  bigint      NOT NULL DEFAULT 0,
    fingerprint      bigint      NOT NULL DEFAULT 0,
    detail           text        NOT NULL DEFAULT '',
    writer           text        NOT NULL,
    fence            bigint      NOT NULL,
    at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cc_transition_intent ON cc_transition (intent_id) WHERE intent_id <> '';
CREATE INDEX cc_transition_batch ON cc_transition (topic, partition, batch_no);
CREATE INDEX cc_transition_contact ON cc_transition (contact_id, id);

-- Every operator action (admin API / CLI) and every lock-store mode change.
CREATE TABLE cc_admin_audit (
    id          bigserial   PRIMARY KEY,
    actor       text        NOT NULL,
    action      text        NOT NULL,
    contact_id  text        NOT NULL DEFAULT '',
    detail      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    at          timestamptz NOT NULL DEFAULT now()
);

-- Operator commands (release a held contact) for the instance that owns the contact's
-- partition; applied inside a batch, so `applied_batch` rolls back with it.
CREATE TABLE cc_command (
    id             bigserial   PRIMARY KEY,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    contact_id     text        NOT NULL,
    action         text        NOT NULL,
    skip_to        bigint      NOT NULL DEFAULT 0,
    actor          text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    applied_batch  bigint,
    result         text
);
CREATE INDEX cc_command_pending ON cc_command (topic, partition) WHERE applied_batch IS NULL;

-- Writes one batch of one writer in one round trip: checks and renews the writer's lease on
-- every partition of the batch (fencing), appends the transitions, upserts the contacts (the
-- previous version is kept until the batch is known committed) and marks applied commands.
-- Raises SQLSTATE CC001 when any partition's fencing token has moved on.
CREATE FUNCTION cc_apply_batch(
    p_topic text, p_writer text, p_lease_ms integer,
    p_parts integer[], p_fences bigint[], p_batches bigint[],
    t_part integer[], t_batch bigint[], t_offset bigint[], t_intent text[], t_contact text[],
    t_clinic text[], t_corr text[], t_from text[], t_to text[], t_reason text[],
    t_seq bigint[], t_version bigint[], t_fp bigint[], t_detail text[], t_fence bigint[],
    c_contact text[], c_part integer[], c_batch bigint[], c_state jsonb[], c_hold boolean[],
    c_waiting integer[],
    m_id bigint[], m_batch bigint[], m_result text[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    UPDATE cc_partition p
       SET last_batch = x.b,
           lease_until = now() + make_interval(secs => p_lease_ms / 1000.0),
           updated_at = now()
      FROM unnest(p_parts, p_fences, p_batches) AS x(part, fence, b)
     WHERE p.topic = p_topic AND p.partition = x.part AND p.fence = x.fence;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n <> coalesce(cardinality(p_parts), 0) THEN
        RAISE EXCEPTION 'fenced: a partition of this batch has a newer owner'
            USING ERRCODE = 'CC001';
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
           partition = EXCLUDED.partition,
           on_hold = EXCLUDED.on_hold,
           waiting = EXCLUDED.waiting,
           updated_at = now();

    UPDATE cc_command m
       SET applied_batch = x.b, result = x.result
      FROM unnest(m_id, m_batch, m_result) AS x(id, b, result)
     WHERE m.id = x.id;
END;
$$;
