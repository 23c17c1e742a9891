-- The identity of this store (this schema's lock-store state), drawn once at random. Every
-- Redis key of the lock / idempotency store lives under `{redis.key_prefix}:{store_id}:`, so
-- two deployments pointed at one Redis with the same key prefix (each left at the default,
-- say) never read each other's outcomes as their own: both start at epoch 1 on the same Redis,
-- so the epoch key alone would have called each in sync with the other's keys, and an intent
-- id decided by one (a copy of production's traffic fed to staging) would have been a
-- duplicate, without an effect, in the other. 64 random bits (16 hex digits), from the
-- pgcrypto-free gen_random_uuid() of PostgreSQL 13+; never changed afterwards (a new id would
-- only cost one full resynchronisation, as a flushed Redis does).
ALTER TABLE cc_store_state
    ADD COLUMN store_id text NOT NULL
    DEFAULT substr(md5(gen_random_uuid()::text), 1, 16);
