-- The cost of writing contact states (src/store/postgres/batch.rs, cc_apply_batch). Measured on
-- the bench's 20,000-record batches (about 3,000 contacts each): the contact upsert took 92-155 ms
-- with the defaults, 55-78 ms with these two settings.
--
-- A row is compressed (pglz) and moved out of line from about 2 kB; a contact row holds its state
-- and the previous one, so most contacts with waiting intents crossed it and every upsert paid a
-- compression. States up to a page stay inline and uncompressed.
ALTER TABLE cc_contact SET (toast_tuple_target = 8160);

-- unnest() of a batch's arrays materialises its rows; at the default work_mem (4 MB) the
-- contact states spilled to a temporary file on every batch.
ALTER FUNCTION cc_apply_batch(text, text, integer, integer[], bigint[], bigint[], bigint[],
    bigint[], integer[], bigint[], bigint[], text[], text[], text[], text[], text[], text[],
    text[], bigint[], bigint[], bigint[], text[], bigint[], text[], integer[], bigint[], jsonb[],
    boolean[], integer[], bigint[], bigint[], text[]) SET work_mem = '64MB';
