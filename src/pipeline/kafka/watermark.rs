//! The high watermark a consumer last saw for a partition, without a request. A
//! `read_committed` consumer stops at the partition's last stable offset: records of a
//! producer's transaction still open, and every record after them, are in the log but not yet
//! readable. librdkafka keeps both offsets from each fetch response; the Rust client does not
//! wrap `rd_kafka_get_watermark_offsets`, so this calls it directly.

use std::ffi::CString;

use rdkafka::bindings as rd;
use rdkafka::client::Client;
use rdkafka::ClientContext;

/// The high watermark of `topic`'s `partition` from `client`'s last fetch response (the log's
/// end, open transactions' records included); `None` when it has none yet.
pub fn cached_high_watermark<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let name = CString::new(topic).ok()?;
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the handle belongs to `client`, alive for this call; librdkafka only reads the
    // NUL-terminated name and writes the two offsets, from its cache, without blocking.
    #[allow(unsafe_code)]
    let error = unsafe {
        rd::rd_kafka_get_watermark_offsets(
            client.native_ptr(),
            name.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (error == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}
