//! A partition's log start and high watermark as a consumer last heard them, without a request:
//! librdkafka keeps both from each fetch response; the Rust client does not wrap
//! `rd_kafka_get_watermark_offsets`, so this calls it directly.
//!
//! A `read_committed` consumer stops at the partition's last stable offset: records of a
//! producer's transaction still open, and every record after them, are in the log (below the
//! high watermark) but not yet readable. Records deleted before they were consumed show as a
//! log start past where the consumer expected to read.

use std::ffi::CString;

use rdkafka::bindings as rd;
use rdkafka::client::Client;
use rdkafka::ClientContext;

/// The cached offsets of one topic's partitions (the topic's name kept NUL-terminated, made
/// once rather than at each look).
#[derive(Debug, Clone)]
pub struct CachedWatermarks {
    topic: CString,
}

impl CachedWatermarks {
    /// `None` for a topic name holding a NUL (no such topic can exist).
    pub fn of(topic: &str) -> Option<Self> {
        CString::new(topic).ok().map(|topic| Self { topic })
    }

    /// The first offset of `partition`'s log; `None` while `client` knows none.
    pub fn log_start<C: ClientContext>(&self, client: &Client<C>, partition: i32) -> Option<i64> {
        self.offsets(client, partition).0
    }

    /// The high watermark of `partition` (the log's end, open transactions' records included);
    /// `None` while `client` knows none.
    pub fn high<C: ClientContext>(&self, client: &Client<C>, partition: i32) -> Option<i64> {
        self.offsets(client, partition).1
    }

    fn offsets<C: ClientContext>(
        &self,
        client: &Client<C>,
        partition: i32,
    ) -> (Option<i64>, Option<i64>) {
        let (mut low, mut high) = (-1_i64, -1_i64);
        // SAFETY: the handle belongs to `client`, alive for this call; librdkafka reads the
        // partition's cached offsets under its lock, only reads the NUL-terminated name (not
        // kept), and writes the two out-parameters, without blocking.
        #[allow(unsafe_code)]
        let error = unsafe {
            rd::rd_kafka_get_watermark_offsets(
                client.native_ptr(),
                self.topic.as_ptr(),
                partition,
                &mut low,
                &mut high,
            )
        };
        if error != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return (None, None);
        }
        ((low >= 0).then_some(low), (high >= 0).then_some(high))
    }
}
