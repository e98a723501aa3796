//! Jobs of the GPU node (serving now; training and export plug in the same way): an id,
//! a cancellation token, and a broadcast of [`JobEvent`]s that `WatchJob` streams, with
//! the events so far kept for late watchers.

use qatflow_proto::v1::{job_event, JobEvent, JobKind, JobState};
use qatflow_store::{Store, StoreError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// The durable intent of one of the GPU node's long jobs (`train`, `export`) in the
/// store's jobs keyspace: `running` while it runs, so a restarted node resumes it, then how
/// it ended.
#[derive(Clone, Copy)]
pub(crate) struct Intent<'a> {
    store: &'a Store,
    key: &'static str,
}

impl<'a> Intent<'a> {
    /// The intent recorded under `key`.
    pub(crate) fn new(store: &'a Store, key: &'static str) -> Self {
        Intent { store, key }
    }

    /// Records `state` durably.
    pub(crate) fn set(self, state: &str) -> Result<(), StoreError> {
        self.store.jobs()?.set(self.key, Some(state.as_bytes()))
    }

    /// The recorded state, if any.
    pub(crate) fn get(self) -> Option<String> {
        self.store.jobs().ok()?.text(self.key)
    }
}

/// Why a job did not start (the answer of the actors' start messages; `StartJob` sends
/// its text back as a failed precondition).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A job of the same kind is running.
    #[error("already {doing} as job {job}; cancel it first")]
    Busy {
        /// What the node is doing (`serving`, `training`, `exporting`).
        doing: &'static str,
        /// The running job's id.
        job: String,
    },
    /// A promotion is running.
    #[error("candidate job {job} is still running; wait for it or cancel it")]
    Promoting {
        /// The running promotion's id.
        job: String,
    },
    /// The node's config or the job's input lacks what the job needs; the text says what
    /// to set or do.
    #[error("{0}")]
    Precondition(String),
    /// The job's process could not be started.
    #[error("{0}")]
    Start(String),
}

/// Events kept per job for watchers that come late.
const HISTORY: usize = 256;

/// A job kind's name, the prefix of its ids (`serve-1`, `train-2`, ...).
fn kind_name(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Serve => "serve",
        JobKind::Train => "train",
        JobKind::Export => "export",
        JobKind::Promote => "promote",
        JobKind::Unspecified => "job",
    }
}

struct Job {
    kind: JobKind,
    cancel: CancellationToken,
    events: broadcast::Sender<JobEvent>,
    history: Vec<JobEvent>,
    ended: bool,
}

/// The node's jobs by id; cheap to clone.
#[derive(Clone, Default)]
pub struct JobHub {
    jobs: Arc<Mutex<HashMap<String, Job>>>,
    next: Arc<Mutex<u64>>,
    shutting_down: Arc<AtomicBool>,
}

/// A job's handle for the code that runs it.
#[derive(Clone)]
pub struct JobHandle {
    /// The job's id.
    pub id: String,
    /// Cancelled when someone cancels the job.
    pub cancel: CancellationToken,
    hub: JobHub,
}

impl JobHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new job of `kind`.
    pub fn create(&self, kind: JobKind) -> JobHandle {
        let n = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            *next += 1;
            *next
        };
        let id = format!("{}-{n}", kind_name(kind));
        let cancel = CancellationToken::new();
        let (events, _) = broadcast::channel(HISTORY);
        self.lock().insert(
            id.clone(),
            Job {
                kind,
                cancel: cancel.clone(),
                events,
                history: Vec::new(),
                ended: false,
            },
        );
        JobHandle {
            id,
            cancel,
            hub: self.clone(),
        }
    }

    /// Cancels a job; false when it is unknown or already ended.
    pub fn cancel(&self, id: &str) -> bool {
        match self.lock().get(id) {
            Some(job) if !job.ended => {
                job.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// The node is shutting down: cancels every running job of the given kinds (their
    /// code stops at its next check and saves what it must) and returns their ids. Jobs
    /// cancelled this way keep their recorded intent, so a restarted node resumes them.
    pub fn shut_down(&self, kinds: &[JobKind]) -> Vec<String> {
        self.shutting_down.store(true, Ordering::SeqCst);
        let jobs = self.lock();
        jobs.iter()
            .filter(|(_, j)| !j.ended && kinds.contains(&j.kind))
            .map(|(id, j)| {
                j.cancel.cancel();
                id.clone()
            })
            .collect()
    }

    /// True once [`JobHub::shut_down`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Waits until every job in `ids` has ended, for at most `limit`; the ids still
    /// running then (empty when all ended).
    pub async fn wait_ended(&self, ids: &[String], limit: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let running: Vec<String> = {
                let jobs = self.lock();
                ids.iter()
                    .filter(|id| jobs.get(*id).is_some_and(|j| !j.ended))
                    .cloned()
                    .collect()
            };
            if running.is_empty() || tokio::time::Instant::now() >= deadline {
                return running;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The events so far and a receiver of the rest; `None` for an unknown job.
    pub fn watch(
        &self,
        id: &str,
    ) -> Option<(Vec<JobEvent>, Option<broadcast::Receiver<JobEvent>>)> {
        let jobs = self.lock();
        let job = jobs.get(id)?;
        let live = (!job.ended).then(|| job.events.subscribe());
        Some((job.history.clone(), live))
    }
}

impl JobHandle {
    /// Publishes an event.
    pub fn emit(&self, event: job_event::Event) {
        let e = JobEvent {
            job_id: self.id.clone(),
            event: Some(event),
        };
        let ended = matches!(
            e.event,
            Some(job_event::Event::State(s)) if s != JobState::Running as i32
        );
        let mut jobs = self.hub.lock();
        if let Some(job) = jobs.get_mut(&self.id) {
            if job.history.len() == HISTORY {
                job.history.remove(0);
            }
            job.history.push(e.clone());
            job.ended |= ended;
            let _ = job.events.send(e);
        }
    }

    /// Publishes a state change.
    pub fn state(&self, state: JobState) {
        self.emit(job_event::Event::State(state as i32));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchers_see_history_and_live_events() {
        let hub = JobHub::default();
        let job = hub.create(JobKind::Serve);
        assert_eq!(job.id, "serve-1");
        job.state(JobState::Running);
        let (history, live) = hub.watch("serve-1").unwrap();
        assert_eq!(history.len(), 1);
        let mut live = live.unwrap();
        job.emit(job_event::Event::Message("hello".into()));
        assert_eq!(
            live.try_recv().unwrap().event,
            Some(job_event::Event::Message("hello".into()))
        );
        assert!(hub.cancel("serve-1"));
        assert!(job.cancel.is_cancelled());
        job.state(JobState::Cancelled);
        assert!(!hub.cancel("serve-1"), "ended jobs are not cancelled again");
        assert!(hub.watch("serve-1").unwrap().1.is_none());
        assert!(hub.watch("nope").is_none());
    }

    #[tokio::test]
    async fn shutting_down_cancels_the_named_kinds_and_waits_for_them() {
        let hub = JobHub::default();
        let train = hub.create(JobKind::Train);
        train.state(JobState::Running);
        let serve = hub.create(JobKind::Serve);
        serve.state(JobState::Running);
        let ids = hub.shut_down(&[JobKind::Train, JobKind::Export]);
        assert_eq!(ids, vec![train.id.clone()]);
        assert!(hub.is_shutting_down());
        assert!(train.cancel.is_cancelled());
        assert!(
            !serve.cancel.is_cancelled(),
            "a server survives a node restart"
        );
        let left = hub.wait_ended(&ids, Duration::from_millis(100)).await;
        assert_eq!(left, ids, "still running");
        let t = train.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            t.state(JobState::Cancelled);
        });
        assert!(hub
            .wait_ended(&ids, Duration::from_secs(5))
            .await
            .is_empty());
    }
}
