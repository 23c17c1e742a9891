//! Sequencer limits and policies.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Error, Result};

/// What happens when a contact's gap outlives `wait_timeout` (contract R7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutPolicy {
    /// Waiting intents go to manual review and the contact goes on hold (the default).
    #[default]
    Hold,
    /// The missing sequences are skipped (audited) and the waiting intents go on.
    Skip,
}

/// Sequencer configuration. [`Config::default`] holds the contract's defaults. (The service's
/// config file has its own typed schema and maps into this.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// How long a contact's gap may last before [`TimeoutPolicy`] applies (default 5 min).
    pub wait_timeout: Duration,
    pub on_timeout: TimeoutPolicy,
    /// Waiting intents one contact may have; the next one overflows (default 64).
    pub max_pending_per_contact: u32,
    /// Waiting intents in the partition at which it is paused (default 10,000).
    pub max_pending_per_partition: usize,
    /// A paused partition resumes once fewer intents than this wait (default 8,000).
    pub resume_pending_below: usize,
    /// Bytes of waiting intents ([`super::IntentMeta::size`]) at which the partition is
    /// paused (default 256 MiB) ...
    pub max_pending_bytes_per_partition: u64,
    /// ... and below which it resumes (default 192 MiB); both marks must be met.
    pub resume_pending_bytes_below: u64,
    /// How many recent outcomes the in-memory idempotency window remembers (default 32,768,
    /// about 3 MiB). It must be at least the number of outcomes decided between two flushes of
    /// the durable store, which covers everything older: one batch of records plus every
    /// waiting intent (a timeout can send them all to review at once), i.e. batch size plus
    /// `max_pending_per_partition`.
    pub recent_outcomes_capacity: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            wait_timeout: Duration::from_secs(5 * 60),
            on_timeout: TimeoutPolicy::Hold,
            max_pending_per_contact: 64,
            max_pending_per_partition: 10_000,
            resume_pending_below: 8_000,
            max_pending_bytes_per_partition: 256 << 20,
            resume_pending_bytes_below: 192 << 20,
            recent_outcomes_capacity: 32_768,
        }
    }
}

impl Config {
    /// Checks the values against each other; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        let invalid =
            |key: &'static str, detail: &'static str| Err(Error::InvalidConfig { key, detail });
        if self.wait_timeout.is_zero() {
            return invalid("wait_timeout", "must be positive");
        }
        if u64::try_from(self.wait_timeout.as_millis()).is_err() {
            return invalid("wait_timeout", "must fit in u64 milliseconds");
        }
        if self.max_pending_per_contact == 0 {
            return invalid("max_pending_per_contact", "must be at least 1");
        }
        if self.max_pending_per_partition == 0 {
            return invalid("max_pending_per_partition", "must be at least 1");
        }
        if self.resume_pending_below == 0
            || self.resume_pending_below > self.max_pending_per_partition
        {
            return invalid(
                "resume_pending_below",
                "must be between 1 and max_pending_per_partition",
            );
        }
        if self.max_pending_bytes_per_partition == 0 {
            return invalid("max_pending_bytes_per_partition", "must be at least 1");
        }
        if self.resume_pending_bytes_below == 0
            || self.resume_pending_bytes_below > self.max_pending_bytes_per_partition
        {
            return invalid(
                "resume_pending_bytes_below",
                "must be between 1 and max_pending_bytes_per_partition",
            );
        }
        if self.recent_outcomes_capacity == 0
            || self.recent_outcomes_capacity > super::recent::MAX_CAPACITY
        {
            return invalid("recent_outcomes_capacity", "must be between 1 and 2^30");
        }
        Ok(())
    }

    /// `wait_timeout` in milliseconds (valid after [`Config::validate`]).
    pub(crate) fn wait_timeout_ms(&self) -> u64 {
        u64::try_from(self.wait_timeout.as_millis()).unwrap_or(u64::MAX)
    }
}
