//! Blocking client calls on a thread of their own, with a deadline for the caller.
//!
//! librdkafka's transactional calls take a timeout, but one of their waits does not honour it:
//! `send_offsets_to_transaction` hands its offsets to the group coordinator through a
//! coordinator request that nothing times out, and a broker restart can leave that request
//! waiting for a broker state change that never comes (librdkafka issues 5456 and 5511, open
//! upstream; rdkafka 0.39 bundles librdkafka 2.12). The CI saw it once: after a broker restart
//! an engine sat in that call for good, its partitions went to the other instance when its poll
//! interval ran out, and SIGTERM could not stop it, the engine thread being the one blocked.
//!
//! [`CallThread`] runs such calls on a dedicated thread and waits for the answer at most as long
//! as the caller says. A call that does not answer in time leaves the handle *stuck*: it takes
//! no further call, and the caller gives the client up (the engine re-creates its producer,
//! whose `init_transactions` fences the old one, and restores its partitions from the durable
//! state, as after any transaction whose outcome is unknown). Dropped while stuck, the handle
//! leaves the client to a thread that keeps serving its events (statistics would pile up
//! unpolled) until the call returns, if it ever does, and then drops it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

type Job<C> = Box<dyn FnOnce(&C) + Send>;

/// How often an abandoned client's events are served.
const TEND_EVERY: Duration = Duration::from_secs(1);

/// A client shared by its owner and one thread that runs its blocking calls.
pub struct CallThread<C: Send + Sync + 'static> {
    target: Arc<C>,
    jobs: Option<mpsc::Sender<Job<C>>>,
    /// Set while a call is queued or running; cleared by the call thread when it returns.
    busy: Arc<AtomicBool>,
    /// A call did not answer in time.
    stuck: bool,
    /// Serves the client's events once it has been given up.
    tend: fn(&C),
    name: String,
}

impl<C: Send + Sync + 'static> CallThread<C> {
    /// Starts the call thread (`name`) for `target`. `tend` serves the client's events (a poll
    /// that does not wait) while it is given up and its call has not returned.
    pub fn spawn(name: &str, target: C, tend: fn(&C)) -> std::io::Result<Self> {
        let target = Arc::new(target);
        let busy = Arc::new(AtomicBool::new(false));
        let (jobs, inbox) = mpsc::channel::<Job<C>>();
        std::thread::Builder::new().name(name.to_owned()).spawn({
            let target = Arc::clone(&target);
            let busy = Arc::clone(&busy);
            move || {
                for job in inbox {
                    job(&target);
                    busy.store(false, Ordering::Release);
                }
            }
        })?;
        Ok(Self {
            target,
            jobs: Some(jobs),
            busy,
            stuck: false,
            tend,
            name: name.to_owned(),
        })
    }

    /// The client, for the calls that do not block (they run on the caller's thread).
    pub fn get(&self) -> &C {
        &self.target
    }

    /// Whether a call has not answered in time: the handle takes no further call.
    pub fn is_stuck(&self) -> bool {
        self.stuck
    }

    /// Runs `f` on the call thread and waits for its result at most `limit`. `None`: it has not
    /// returned by then (or the call thread is gone); the handle is stuck from now on.
    pub fn call<T: Send + 'static>(
        &mut self,
        limit: Duration,
        f: impl FnOnce(&C) -> T + Send + 'static,
    ) -> Option<T> {
        if self.stuck {
            return None;
        }
        let (answer, result) = mpsc::sync_channel(1);
        let job: Job<C> = Box::new(move |c| {
            // The caller may have stopped waiting: nobody to tell then.
            let _ = answer.send(f(c));
        });
        self.busy.store(true, Ordering::Release);
        let answered = self
            .jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .and_then(|()| result.recv_timeout(limit).ok());
        if answered.is_none() {
            self.stuck = true;
        }
        answered
    }
}

impl<C: Send + Sync + 'static> Drop for CallThread<C> {
    fn drop(&mut self) {
        // Ends the call thread once it is idle; it then drops its reference.
        self.jobs = None;
        if !self.stuck {
            return;
        }
        let target = Arc::clone(&self.target);
        let busy = Arc::clone(&self.busy);
        let tend = self.tend;
        let spawned = std::thread::Builder::new()
            .name(format!("{}-given-up", self.name))
            .spawn(move || {
                while busy.load(Ordering::Acquire) {
                    tend(&target);
                    std::thread::sleep(TEND_EVERY);
                }
                drop(target);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, thread = %self.name, "no thread to serve a given-up Kafka client's events");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    /// A client whose calls can be held: `hold` blocks until the gate opens.
    #[derive(Default)]
    struct Fake {
        gate: Mutex<bool>,
        opened: std::sync::Condvar,
        tended: AtomicUsize,
        calls: AtomicUsize,
    }

    impl Fake {
        fn hold(&self) {
            let mut open = self.gate.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }
        fn open(&self) {
            *self.gate.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    fn tend(f: &Fake) {
        f.tended.fetch_add(1, Ordering::Relaxed);
    }

    #[test]
    fn a_call_that_answers_in_time_returns_its_result_and_the_next_call_runs() {
        let mut t = CallThread::spawn("test-call", Fake::default(), tend).unwrap();
        assert_eq!(t.call(Duration::from_secs(5), |_| 7), Some(7));
        let name = t.call(Duration::from_secs(5), |_| {
            std::thread::current().name().map(str::to_owned)
        });
        assert_eq!(
            name,
            Some(Some("test-call".to_owned())),
            "runs on the call thread"
        );
        assert!(!t.is_stuck());
    }

    #[test]
    fn a_call_that_does_not_answer_leaves_the_handle_stuck_and_refusing_calls() {
        let mut t = CallThread::spawn("test-stuck", Fake::default(), tend).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(t.call(Duration::from_millis(200), |f| f.hold()), None);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(3),
            "the caller waits its limit, no longer: {waited:?}"
        );
        assert!(t.is_stuck());
        let calls = Arc::clone(&t.target);
        assert_eq!(
            t.call(Duration::from_secs(5), |f| f
                .calls
                .fetch_add(1, Ordering::Relaxed)),
            None,
            "a stuck handle takes no call"
        );
        assert_eq!(calls.calls.load(Ordering::Relaxed), 0);
        calls.open();
    }

    #[test]
    fn a_stuck_client_given_up_is_tended_until_its_call_returns_then_dropped() {
        let mut t = CallThread::spawn("test-given-up", Fake::default(), tend).unwrap();
        assert_eq!(t.call(Duration::from_millis(50), |f| f.hold()), None);
        let fake = Arc::clone(&t.target);
        drop(t);
        std::thread::sleep(Duration::from_millis(1_500));
        assert!(
            fake.tended.load(Ordering::Relaxed) >= 1,
            "its events are served while its call hangs"
        );
        fake.open();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&fake) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            Arc::strong_count(&fake),
            1,
            "once the call returns, the call thread and the tending thread let it go"
        );
    }

    #[test]
    fn a_handle_dropped_idle_lets_its_client_go() {
        let t = CallThread::spawn("test-idle", Fake::default(), tend).unwrap();
        let fake = Arc::clone(&t.target);
        drop(t);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&fake) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(Arc::strong_count(&fake), 1);
        assert_eq!(fake.tended.load(Ordering::Relaxed), 0, "nothing to tend");
    }
}
