//! What the running engine tells the outside about itself: the readiness probe, the admin API
//! and the `causal_commit_ready` gauge read it; the engine writes it. Lock-free: the engine's
//! thread stores, any task loads.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

/// See the module documentation. Share it behind an `Arc`.
#[derive(Debug, Default)]
pub struct Health {
    /// Partitions assigned to this instance by the group.
    assigned: AtomicUsize,
    /// Assigned partitions with a restored lane (the others are paused).
    restored: AtomicUsize,
    /// The stores answered the engine's last call (lookup, write, restore, commit).
    stores_ok: AtomicBool,
    /// Wall-clock time (ms) of the last committed transaction, 0 before the first.
    last_commit_ms: AtomicI64,
    /// The engine is shutting down (draining).
    stopping: AtomicBool,
}

/// A consistent-enough view of [`Health`] (each field is read atomically).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HealthView {
    pub assigned: usize,
    pub restored: usize,
    pub stores_ok: bool,
    pub last_commit_ms: i64,
    pub stopping: bool,
    /// Ready to take traffic: partitions assigned, all restored, the stores answering, not
    /// stopping.
    pub ready: bool,
}

impl Health {
    pub fn set_partitions(&self, assigned: usize, restored: usize) {
        self.assigned.store(assigned, Ordering::Relaxed);
        self.restored.store(restored, Ordering::Relaxed);
    }

    pub fn set_stores_ok(&self, ok: bool) {
        self.stores_ok.store(ok, Ordering::Relaxed);
    }

    pub fn committed(&self, at_ms: i64) {
        self.last_commit_ms.store(at_ms, Ordering::Relaxed);
        self.stores_ok.store(true, Ordering::Relaxed);
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn view(&self) -> HealthView {
        let assigned = self.assigned.load(Ordering::Relaxed);
        let restored = self.restored.load(Ordering::Relaxed);
        let stores_ok = self.stores_ok.load(Ordering::Relaxed);
        let stopping = self.stopping.load(Ordering::Relaxed);
        HealthView {
            assigned,
            restored,
            stores_ok,
            last_commit_ms: self.last_commit_ms.load(Ordering::Relaxed),
            stopping,
            ready: assigned > 0 && restored == assigned && stores_ok && !stopping,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_with_every_assigned_partition_restored_and_the_stores_answering() {
        let h = Health::default();
        assert!(!h.view().ready, "nothing assigned yet");
        h.set_partitions(3, 2);
        h.set_stores_ok(true);
        assert!(!h.view().ready, "a partition is still restoring");
        h.set_partitions(3, 3);
        assert!(h.view().ready);
        h.set_stores_ok(false);
        assert!(!h.view().ready, "a store stopped answering");
        h.committed(5);
        assert!(h.view().ready && h.view().last_commit_ms == 5);
        h.set_stopping();
        assert!(!h.view().ready, "draining");
    }
}
