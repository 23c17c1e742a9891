-- Rolled-back batches and the Redis idempotency cache. See docs/redis-fallback.md, "Only
-- committed outcomes".
--
-- Redis is filled only from batches PostgreSQL knows committed, but a restore that rolls a batch
-- back must still be able to tell Redis: the intent ids whose rows it deleted are noted here, in
-- the restore's own transaction (a trigger, so that no crash between the restore and the
-- lock store's call can lose them), and the rollback counter moves. The lock store makes Redis
-- agree with PostgreSQL for those ids and then deletes the notes; a resynchronisation applies
-- every pending note before it marks Redis in sync, and refuses to mark it if the counter moved
-- after it read the notes.

ALTER TABLE cc_store_state ADD COLUMN rollbacks bigint NOT NULL DEFAULT 0;

CREATE TABLE cc_store_correction (
    id         bigserial   PRIMARY KEY,
    topic      text        NOT NULL,
    partition  integer     NOT NULL,
    intent_id  text        NOT NULL,
    noted_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cc_store_correction_partition ON cc_store_correction (topic, partition);

-- Every deleted row's intent id is noted (a superset of the idempotency rows: a note for an id
-- without an outcome only costs a lookup). The counter moves under the cc_store_state row lock,
-- which the resynchronisation's mark holds while it checks it.
CREATE FUNCTION cc_note_rolled_back() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO cc_store_correction (topic, partition, intent_id)
    SELECT DISTINCT topic, partition, intent_id FROM rolled_back WHERE intent_id <> '';
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        UPDATE cc_store_state SET rollbacks = rollbacks + 1 WHERE id = 1;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER cc_transition_rolled_back
    AFTER DELETE ON cc_transition
    REFERENCING OLD TABLE AS rolled_back
    FOR EACH STATEMENT EXECUTE FUNCTION cc_note_rolled_back();
