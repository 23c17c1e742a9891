//! One setting of some topics, with each topic's own error. The Rust client's
//! `describe_configs` drops a resource's error (`rd_kafka_ConfigResource_error`): a topic the
//! brokers do not have, or do not let this client describe, comes back as a topic without
//! settings, which cannot be told from one whose setting is simply absent. This calls
//! `rd_kafka_DescribeConfigs` directly and keeps the error.

use std::ffi::CString;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::client::Client;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientContext;

use super::admin_call::{request, text, Owned};

/// What the brokers said of one topic's setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// Its value (`None`: the brokers listed no value for it).
    Value(Option<String>),
    /// The brokers' error for this topic, with their message when they gave one.
    Refused(RDKafkaErrorCode, String),
}

/// Asks the brokers for the setting `key` of each of `topics` in one `DescribeConfigs` with
/// `client`'s connections, waiting at most `within`: one [`Setting`] per topic, in their order.
/// `Err` with the reason when the request itself fails (no answer in time). Blocking.
pub fn topic_setting<C: ClientContext>(
    client: &Client<C>,
    topics: &[&str],
    key: &str,
    within: Duration,
) -> Result<Vec<Setting>, String> {
    let names = topics
        .iter()
        .map(|t| CString::new(*t).map_err(|_| format!("topic name {t:?} holds a NUL")))
        .collect::<Result<Vec<_>, _>>()?;
    let event = request(
        client,
        rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBECONFIGS,
        within,
        |rk, options, queue| {
            // SAFETY: each resource copies its name; the request copies the resources, which
            // are destroyed after the call.
            #[allow(unsafe_code)]
            unsafe {
                let resources: Vec<_> = names
                    .iter()
                    .map(|n| {
                        Owned(
                            rd::rd_kafka_ConfigResource_new(
                                rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC,
                                n.as_ptr(),
                            ),
                            rd::rd_kafka_ConfigResource_destroy,
                        )
                    })
                    .collect();
                let mut pointers: Vec<_> = resources.iter().map(|r| r.0).collect();
                rd::rd_kafka_DescribeConfigs(
                    rk,
                    pointers.as_mut_ptr(),
                    pointers.len(),
                    options,
                    queue,
                );
            }
        },
    )
    .map_err(|e| format!("DescribeConfigs: {e}"))?;
    let mut answered: Vec<(String, Setting)> = Vec::with_capacity(topics.len());
    // SAFETY: the event is alive until the end of this function; the resources, entries and
    // strings librdkafka returns point into it and are copied before it is destroyed.
    #[allow(unsafe_code)]
    unsafe {
        let result = rd::rd_kafka_event_DescribeConfigs_result(event.0);
        if result.is_null() {
            return Err("DescribeConfigs answered with another event".into());
        }
        let mut count = 0_usize;
        let resources = rd::rd_kafka_DescribeConfigs_result_resources(result, &mut count);
        for i in 0..count {
            let resource = *resources.add(i);
            let name = text(rd::rd_kafka_ConfigResource_name(resource));
            let error = rd::rd_kafka_ConfigResource_error(resource);
            if error != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                let message = text(rd::rd_kafka_ConfigResource_error_string(resource));
                answered.push((name, Setting::Refused(error.into(), message)));
                continue;
            }
            let mut entries = 0_usize;
            let configs = rd::rd_kafka_ConfigResource_configs(resource, &mut entries);
            let value = (0..entries)
                .map(|j| *configs.add(j))
                .find(|e| text(rd::rd_kafka_ConfigEntry_name(*e)) == key)
                .and_then(|e| {
                    let v = rd::rd_kafka_ConfigEntry_value(e);
                    (!v.is_null()).then(|| text(v))
                });
            answered.push((name, Setting::Value(value)));
        }
    }
    topics
        .iter()
        .map(|t| {
            answered
                .iter()
                .find(|(name, _)| name == t)
                .map(|(_, s)| s.clone())
                .ok_or_else(|| format!("DescribeConfigs did not describe {t}"))
        })
        .collect()
}
