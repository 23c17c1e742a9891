//! Integration tests against the real Kafka, Redis and PostgreSQL of the local stack
//! (`make up`), in one binary. Each test makes its own topics, consumer group, PostgreSQL schema
//! and Redis key prefix, so most run in parallel; a test that stops, freezes or flushes a
//! shared service, or loads the machine heavily, takes the stack exclusively
//! ([`common::TestEnv::exclusive`]) and waits until no other test holds it.

mod common;

mod admin;
mod brokers;
mod chaos;
mod failures;
mod growth;
mod hardening;
mod lock_store;
mod offsets;
mod passthrough;
mod replays;
mod runbook;
mod secure;
mod seed;
mod sequencer_model;
mod skeleton;
mod stalls;
mod telemetry;
mod verify;
