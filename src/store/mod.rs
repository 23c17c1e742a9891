//! The stores around the pure sequencer: PostgreSQL (durable state, audit, fencing authority)
//! and the lock / idempotency store (Redis fast path with PostgreSQL fallback).

pub mod breaker;
pub mod lock_mode;
pub mod lock_store;
pub mod postgres;
pub mod recovery;
pub mod redis;
pub mod snapshot;
