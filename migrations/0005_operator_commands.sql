-- Operator commands through the admin API and the CLI (src/admin/, src/store/postgres/commands.rs).
--
-- A command is queued here by the API and applied by the partition's owner inside a batch
-- (`cc_apply_batch` sets `applied_batch` and `result`; a restore that rolls the batch back makes it
-- pending again). It reads as applied only once its batch is committed in Kafka, that is at or
-- below `cc_partition.committed_batch`. An operator may cancel a command while it is pending.

-- Re-submission of a manual-review item: the review record's coordinates on the manual-review
-- topic, the intent it names, and the original record (key and value, byte for byte) the owner
-- feeds to its sequencer. Cancellation: when and by whom.
ALTER TABLE cc_command
    ADD COLUMN intent_id         text        NOT NULL DEFAULT '',
    ADD COLUMN review_partition  integer,
    ADD COLUMN review_offset     bigint,
    ADD COLUMN source_partition  integer,
    ADD COLUMN source_offset     bigint,
    ADD COLUMN record_key        bytea,
    ADD COLUMN record_value      bytea,
    ADD COLUMN correlation_id    text        NOT NULL DEFAULT '',
    ADD COLUMN cancelled_at      timestamptz,
    ADD COLUMN cancelled_by      text;

-- Before this migration `release --skip-to N` with N above 2^63-1 was stored negative (and would
-- have been applied as a resume), and 0 was accepted: such commands, still pending, are cancelled
-- and the cancellation audited.
INSERT INTO cc_admin_audit (actor, action, contact_id, detail)
SELECT 'migration 0005', 'cancel_command', contact_id,
       jsonb_build_object('command', id, 'skip_to', skip_to,
                          'result', 'cancelled: skip_to out of range 1..2^63-1')
  FROM cc_command
 WHERE applied_batch IS NULL AND action = 'skip_to' AND skip_to < 1;
UPDATE cc_command
   SET cancelled_at = now(), cancelled_by = 'migration 0005: skip_to out of range'
 WHERE applied_batch IS NULL AND action = 'skip_to' AND skip_to < 1;

-- The vocabulary of commands (CommandAction::as_str and CommandResult in commands.rs). NOT VALID:
-- rows written before this migration are not re-checked; every new or updated row is.
ALTER TABLE cc_command
    ADD CONSTRAINT cc_command_action CHECK (action IN ('resume', 'skip_to', 'resubmit')) NOT VALID,
    ADD CONSTRAINT cc_command_skip_to CHECK (
        CASE action WHEN 'skip_to' THEN skip_to >= 1 ELSE skip_to = 0 END) NOT VALID,
    ADD CONSTRAINT cc_command_resubmit CHECK (
        action <> 'resubmit'
        OR (intent_id <> '' AND review_partition IS NOT NULL AND review_offset IS NOT NULL
            AND source_partition IS NOT NULL AND source_offset IS NOT NULL
            AND record_value IS NOT NULL)) NOT VALID,
    ADD CONSTRAINT cc_command_result CHECK (
        result IS NULL OR result = 'applied' OR result LIKE 'refused: %') NOT VALID,
    ADD CONSTRAINT cc_command_cancelled CHECK (
        cancelled_at IS NULL OR applied_batch IS NULL) NOT VALID;

-- A cancelled command is never applied: a batch that tries (its owner read the command before
-- the cancellation committed) fails as a whole with SQLSTATE CC004, its owner restores the
-- partition from the committed state and carries on without the command. The check runs on the
-- row version the batch's UPDATE finally locks, so a cancellation that commits first always wins;
-- one that comes second finds the command applied and changes nothing.
CREATE FUNCTION cc_refuse_cancelled_command() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.applied_batch IS NOT NULL AND OLD.cancelled_at IS NOT NULL THEN
        RAISE EXCEPTION 'operator command % was cancelled before the batch that applies it was written', OLD.id
            USING ERRCODE = 'CC004';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER cc_command_not_cancelled
    BEFORE UPDATE OF applied_batch ON cc_command
    FOR EACH ROW EXECUTE FUNCTION cc_refuse_cancelled_command();

CREATE INDEX cc_command_intent ON cc_command (intent_id) WHERE action = 'resubmit';

-- The audit learns the operator's re-submission (Transition::Resubmitted in
-- src/store/postgres/batch.rs): a manual-review intent reopened, keyed by its intent id, which
-- the verifier reads (`to_state = 'resubmitted'`).
ALTER TABLE cc_transition
    DROP CONSTRAINT cc_transition_from_state,
    DROP CONSTRAINT cc_transition_to_state;
ALTER TABLE cc_transition
    ADD CONSTRAINT cc_transition_from_state CHECK (
        from_state IN ('received', 'waiting_previous_commit', 'contact', 'manual_review')),
    ADD CONSTRAINT cc_transition_to_state CHECK (
        to_state IN ('committed_causal', 'waiting_previous_commit', 'duplicate',
                     'blocked_conflict', 'manual_review', 'skipped', 'held', 'released',
                     'resubmitted'));
