//! One assigned input partition's lane: its sequencer, its fencing token and its recovery
//! point (the last batch committed in Kafka, and the offset after it).

use crate::sequencer::Sequencer;
use crate::store::snapshot::Held;

/// The state of one assigned partition.
pub struct Lane {
    pub partition: i32,
    /// Fencing token of this writer for this partition.
    pub fence: u64,
    /// The last batch known committed (the recovery point).
    pub batch_no: u64,
    /// One past the last record consumed and committed (-1: nothing ever committed).
    pub next_offset: i64,
    pub seq: Sequencer<Held>,
    /// Paused by the sequencer's backpressure.
    pub backpressure: bool,
}
