-- Durable state and audit of causal-commit. See docs/exactly-once.md for how these tables are
-- kept consistent with the Kafka transactions (recovery points tagged with a batch number).

-- Fencing tokens: strictly increasing, never reused.
CREATE SEQUENCE cc_fence_seq;

-- One row per input partition: who owns it (fence) and the last batch it wrote.
CREATE TABLE cc_partition (
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    fence       bigint      NOT NULL,
    owner       text        NOT NULL,
    last_batch  bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now(),
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
