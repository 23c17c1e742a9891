//! The id Kafka gives a topic when it is created (KIP-516): a topic deleted and created again
//! under the same name gets a new one, so the id tells one log of that name from another when
//! its offsets cannot (a recreated topic refilled past the old offsets). The Rust client does
//! not wrap `rd_kafka_DescribeTopics` (librdkafka 2.3+), so this calls it directly.

use std::ffi::CString;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::client::Client;
use rdkafka::ClientContext;

use super::admin_call::{request, text, Owned};
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
    let event = request(
        client,
        rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
        within,
        |rk, options, queue| {
            let mut names = [name.as_ptr()];
            // SAFETY: the collection copies the names and is destroyed after the call, which
            // copies it in turn.
            #[allow(unsafe_code)]
            unsafe {
                let topics = Owned(
                    rd::rd_kafka_TopicCollection_of_topic_names(names.as_mut_ptr(), 1),
                    rd::rd_kafka_TopicCollection_destroy,
                );
                rd::rd_kafka_DescribeTopics(rk, topics.0, options, queue);
            }
        },
    )
    .map_err(|e| format!("DescribeTopics: {e}"))?;
    // SAFETY: the event is alive until the end of this function; the names librdkafka returns
    // point into it and are copied before it is destroyed.
    #[allow(unsafe_code)]
    unsafe {
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
