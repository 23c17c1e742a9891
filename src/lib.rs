//! causal-commit: a Kafka stream processor that gives every contact one causal sequence and
//! releases each intent's effect exactly once, in that order.
//!
//! # Layout
//!
//! - [`config`]: the TOML configuration with environment overrides, validated at start-up.
//! - [`proto`]: the protobuf wire contract (`Intent`, `SideEffect`, `ManualReview`).
//! - [`intent`]: decoding and validation of input records (the one place that trusts bytes).
//! - [`sequencer`]: the pure per-partition causal sequencer and commit gate (no I/O).
//! - [`pipeline`]: the Kafka consume-transform-produce loop and its transactions.
//! - [`store`]: PostgreSQL (durable state, audit, fencing), Redis (locks, idempotency), the
//!   circuit breaker and the fallback between them.
//! - [`telemetry`]: JSON logs, Prometheus metrics (every name in one module), OTLP traces.
//! - [`demo`]: the demo producer and the read-back summary used by `make demo`.
//! - [`admin`]: the admin HTTP API (token-protected: backlog, held contacts, one contact,
//!   release, re-submission, operator commands, health, readiness, its OpenAPI document) and
//!   the client the CLI's operator commands call it with.
//! - [`verify`]: the contract verifier (`causal-commit verify`): reads the topics and the audit,
//!   then checks every rule it can with a pure function.
//!
//! The binary (`src/main.rs`) is the CLI: `run`, `produce`, `migrate`, `summary`,
//! `wait-caught-up`, `verify`, `show-config`, and the operator commands that call the admin
//! API: `backlog`, `held`, `contact`, `release`, `resubmit`, `commands`, `health`.

#![deny(unsafe_code)]

pub mod admin;
pub mod config;
pub mod demo;
pub mod intent;
pub mod pipeline;
pub mod proto;
pub mod sequencer;
pub mod store;
pub mod telemetry;
pub mod verify;
