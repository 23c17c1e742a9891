//! The protobuf wire contract (`proto/causal_commit.proto`), compiled by prost at build time.

#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/causal_commit.v1.rs"));
