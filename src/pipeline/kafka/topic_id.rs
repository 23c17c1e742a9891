//! The id Kafka gives a topic when it is created (KIP-516): a topic deleted and created again
//! under the same name gets a new one, so the id tells one log of that name from another when
//! its offsets cannot (a recreated topic refilled past the old offsets). The Rust client does
//! not wrap `rd_kafka_DescribeTopics` (librdkafka 2.3+), so this calls it directly.

use std::ffi::{CStr, CString};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::client::Client;
use rdkafka::ClientContext;

use crate::store::recovery::TopicId;

/// Asks the brokers for `topic`'s id with `client`'s connections, waiting at most `within`.
/// `Ok(None)` when the brokers have no id for it (a cluster from before topic ids); `Err` with
/// the brokers' or librdkafka's reason otherwise (the topic unknown, no answer in time).
/// Blocking.
pub fn topic_id<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    within: Duration,
) -> Result<Option<TopicId>, String> {
    let name = CString::new(topic).map_err(|_| format!("topic name {topic:?} holds a NUL"))?;
    let timeout_ms = i32::try_from(within.as_millis()).unwrap_or(i32::MAX);
    let rk = client.native_ptr();
    // SAFETY: `rk` is alive for the call (`client` is borrowed). Every object created here
    // (queue, options, topic collection, result event) is destroyed by `Owned` on every path;
    // the names librdkafka returns point into the event and are copied before it is destroyed.
    #[allow(unsafe_code)]
    unsafe {
        let queue = Owned(rd::rd_kafka_queue_new(rk), rd::rd_kafka_queue_destroy);
        let options = Owned(
            rd::rd_kafka_AdminOptions_new(
                rk,
                rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
            ),
            rd::rd_kafka_AdminOptions_destroy,
        );
        let mut err = [0 as std::ffi::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options.0,
            timeout_ms,
            err.as_mut_ptr(),
            err.len(),
        );
        let mut names = [name.as_ptr()];
        let topics = Owned(
            rd::rd_kafka_TopicCollection_of_topic_names(names.as_mut_ptr(), 1),
            rd::rd_kafka_TopicCollection_destroy,
        );
        rd::rd_kafka_DescribeTopics(rk, topics.0, options.0, queue.0);
        // The answer, or librdkafka's own timeout error, comes within the request timeout;
        // the extra second only covers the hand-over.
        let event = Owned(
            rd::rd_kafka_queue_poll(queue.0, timeout_ms.saturating_add(1_000)),
            rd::rd_kafka_event_destroy,
        );
        if event.0.is_null() {
            return Err(format!("no answer to DescribeTopics within {within:?}"));
        }
        if rd::rd_kafka_event_error(event.0) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            return Err(text(rd::rd_kafka_event_error_string(event.0)));
        }
        let result = rd::rd_kafka_event_DescribeTopics_result(event.0);
        if result.is_null() {
            return Err("DescribeTopics answered with another event".into());
        }
        let mut count = 0_usize;
        let described = rd::rd_kafka_DescribeTopics_result_topics(result, &mut count);
        if described.is_null() || count == 0 {
            return Err(format!("DescribeTopics did not describe {topic}"));
        }
        let description = *described;
        let error = rd::rd_kafka_TopicDescription_error(description);
        if !error.is_null()
            && rd::rd_kafka_error_code(error) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            return Err(format!(
                "{topic}: {}",
                text(rd::rd_kafka_error_string(error))
            ));
        }
        let id = rd::rd_kafka_TopicDescription_topic_id(description);
        if id.is_null() {
            return Ok(None);
        }
        let high = rd::rd_kafka_Uuid_most_significant_bits(id) as u64;
        let low = rd::rd_kafka_Uuid_least_significant_bits(id) as u64;
        Ok(TopicId::from_bits(high, low))
    }
}

/// A librdkafka object destroyed with its destructor when dropped (null: nothing to destroy).
struct Owned<T>(*mut T, unsafe extern "C" fn(*mut T));

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by the matching librdkafka constructor and destroyed once, here.
            #[allow(unsafe_code)]
            unsafe {
                (self.1)(self.0)
            }
        }
    }
}

/// A C string librdkafka owns, copied (empty when null).
#[allow(unsafe_code)]
unsafe fn text(s: *const std::ffi::c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    // SAFETY: librdkafka returns NUL-terminated strings valid until their owner is destroyed;
    // this copies it at once.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}
