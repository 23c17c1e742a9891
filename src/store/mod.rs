//! The stores around the pure sequencer: PostgreSQL (durable state, audit, fallback locks).

pub mod postgres;
