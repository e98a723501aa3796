//! Jobs of the GPU node (serving now; training and export plug in the same way): an id,
//! a cancellation token, and a broadcast of [`JobEvent`]s that `WatchJob` streams, with
//! the events so far kept for late watchers.

use qatflow_proto::v1::{job_event, JobEvent, JobState};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Events kept per job for watchers that come late.
const HISTORY: usize = 256;

struct Job {
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

    /// Registers a new job of `kind` (`serve`, `train`, `export`).
    pub fn create(&self, kind: &str) -> JobHandle {
        let n = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            *next += 1;
            *next
        };
        let id = format!("{kind}-{n}");
        let cancel = CancellationToken::new();
        let (events, _) = broadcast::channel(HISTORY);
        self.lock().insert(
            id.clone(),
            Job {
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
        let job = hub.create("serve");
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
}
