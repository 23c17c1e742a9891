//! The recovery point: what a committed input offset's metadata says about the durable state.
//!
//! Every batch commits its consumed offsets in its Kafka transaction with metadata
//! `cc:b=<batch>;f=<fence>[;t=<clock>]`: the number of the partition's last batch whose
//! transaction committed, the fencing token of its writer and the partition's consumed-time
//! clock at that commit (milliseconds; see the sequencer's wait timeout). Rows in PostgreSQL
//! tagged with a later batch belong to a transaction that never committed. See
//! `docs/exactly-once.md`.

use std::fmt;

/// A parsed recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryPoint {
    /// The partition's last batch whose Kafka transaction committed.
    pub batch: u64,
    /// Fencing token of the writer of that batch.
    pub fence: u64,
    /// The partition's consumed-time clock at that commit (0 when not recorded).
    pub clock_ms: u64,
}

/// Offset metadata that is not empty but is not a recovery point either.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("committed offset metadata {0:?} is not a causal-commit recovery point")]
pub struct Malformed(pub String);

const PREFIX: &str = "cc:";

impl RecoveryPoint {
    /// Parses committed offset metadata: `Ok(None)` when there is none (offsets reset with the
    /// Kafka tools, expired, or written by another group), an error when it is something else.
    pub fn parse(meta: &str) -> Result<Option<Self>, Malformed> {
        if meta.is_empty() {
            return Ok(None);
        }
        let malformed = || Malformed(meta.chars().take(200).collect());
        let rest = meta.strip_prefix(PREFIX).ok_or_else(malformed)?;
        let (mut batch, mut fence, mut clock_ms) = (None, None, 0);
        for kv in rest.split(';') {
            let (k, v) = kv.split_once('=').ok_or_else(malformed)?;
            let v: u64 = v.parse().map_err(|_| malformed())?;
            match k {
                "b" => batch = Some(v),
                "f" => fence = Some(v),
                "t" => clock_ms = v,
                // Keys added by later versions are ignored.
                _ => {}
            }
        }
        match (batch, fence) {
            (Some(batch), Some(fence)) => Ok(Some(RecoveryPoint {
                batch,
                fence,
                clock_ms,
            })),
            _ => Err(malformed()),
        }
    }
}

impl fmt::Display for RecoveryPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}b={};f={};t={}",
            self.batch, self.fence, self.clock_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recovery_point_round_trips_through_its_metadata() {
        let p = RecoveryPoint {
            batch: 42,
            fence: 7,
            clock_ms: 123_456,
        };
        assert_eq!(RecoveryPoint::parse(&p.to_string()), Ok(Some(p)));
    }

    #[test]
    fn metadata_of_an_older_version_without_a_clock_parses_with_clock_zero() {
        let p = RecoveryPoint::parse("cc:b=3;f=9").unwrap().unwrap();
        assert_eq!((p.batch, p.fence, p.clock_ms), (3, 9, 0));
    }

    #[test]
    fn empty_metadata_is_no_recovery_point_not_batch_zero() {
        assert_eq!(RecoveryPoint::parse(""), Ok(None));
    }

    #[test]
    fn foreign_or_truncated_metadata_is_an_error() {
        for meta in [
            "something else",
            "cc:",
            "cc:b=1",
            "cc:b=x;f=1",
            "cc:f=1;t=2",
        ] {
            assert!(RecoveryPoint::parse(meta).is_err(), "{meta:?}");
        }
    }
}
