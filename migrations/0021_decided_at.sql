-- When the writer decided each partition's last batch, by the writer's own clock (ms since the
-- Unix epoch; NULL: written by an earlier version, or by a write that did not say).
--
-- `recovery-point resolve` without a flag looks for a partition's last batch on the output
-- topics from shortly before that batch was written. It took that time from the audit rows,
-- which carry PostgreSQL's clock, while the output records carry the timestamp the
-- processor's producer gave them, from the processor's clock. With PostgreSQL's clock more
-- than a minute ahead of the processor's, the search began after every record of the batch,
-- found none, and a committed batch was resolved as aborted: rolled back, and its effects
-- emitted again (test offsets::a_resolve_finds_the_last_batchs_outputs_whatever_postgresqls_clock_said).
-- The batch's outputs are queued after it is decided, so their timestamps are at or after
-- this time, whatever PostgreSQL's clock says.
ALTER TABLE cc_partition ADD COLUMN last_decided_ms bigint;

-- Called in the batch's write statement, after cc_apply_batch (which has locked and moved the
-- partitions' rows, or raised): one more update of rows the statement already holds.
CREATE FUNCTION cc_note_decided_at(p_topic text, p_parts integer[], p_decided_ms bigint)
RETURNS void LANGUAGE sql AS $$
    UPDATE cc_partition
       SET last_decided_ms = p_decided_ms
     WHERE topic = p_topic AND partition = ANY(p_parts)
$$;
