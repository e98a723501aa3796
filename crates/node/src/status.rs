//! The status board: what each actor last reported, read by the `Status` RPC and rendered
//! by `qatflow status`.

use qatflow_proto::v1::{NodeStatus, TrainingStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Text states the actors report.
#[derive(Debug, Clone, Default)]
struct States {
    teacher: String,
    validation: String,
    shipper: String,
    serving: String,
    serving_bench: String,
    candidate: String,
    export: String,
    training: Option<TrainingStatus>,
}

/// Shared, cheap to clone; every actor of a node writes its own fields.
#[derive(Clone)]
pub struct StatusBoard {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    role: String,
    started: Instant,
    restarts: AtomicU64,
    states: Mutex<States>,
}

/// Which actor state to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The TeacherActor.
    Teacher,
    /// The ValidatorActor (dataset gates).
    Validation,
    /// The ShardShipper.
    Shipper,
    /// The ServingSupervisor.
    Serving,
    /// The ExporterActor.
    Export,
    /// The serving model's last bench (ServingSupervisor).
    ServingBench,
    /// The last candidate's bench and verdict (ServingSupervisor).
    Candidate,
}

impl StatusBoard {
    /// A board for node `name` of `role`.
    pub fn new(name: &str, role: &str) -> StatusBoard {
        StatusBoard {
            inner: Arc::new(Inner {
                name: name.to_string(),
                role: role.to_string(),
                started: Instant::now(),
                restarts: AtomicU64::new(0),
                states: Mutex::new(States::default()),
            }),
        }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    fn states(&self) -> std::sync::MutexGuard<'_, States> {
        self.inner.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets an actor's state text.
    pub fn set(&self, field: Field, text: impl Into<String>) {
        let text = text.into();
        let mut s = self.states();
        match field {
            Field::Teacher => s.teacher = text,
            Field::Validation => s.validation = text,
            Field::Shipper => s.shipper = text,
            Field::Serving => s.serving = text,
            Field::Export => s.export = text,
            Field::ServingBench => s.serving_bench = text,
            Field::Candidate => s.candidate = text,
        }
    }

    /// Sets the training progress.
    pub fn set_training(&self, training: TrainingStatus) {
        self.states().training = Some(training);
    }

    /// Counts an actor restart after a failure.
    pub fn restarted(&self) {
        self.inner.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// Actor restarts so far.
    pub fn restarts(&self) -> u64 {
        self.inner.restarts.load(Ordering::Relaxed)
    }

    /// The board as the protocol's `NodeStatus`; counts that live in the databases are
    /// filled in by the caller.
    pub fn snapshot(&self) -> NodeStatus {
        let s = self.states().clone();
        NodeStatus {
            name: self.inner.name.clone(),
            role: self.inner.role.clone(),
            uptime_s: self.inner.started.elapsed().as_secs(),
            teacher: s.teacher,
            validation: s.validation,
            shipper: s.shipper,
            serving: s.serving,
            export: s.export,
            training: s.training,
            actor_restarts: self.restarts(),
            serving_bench: s.serving_bench,
            candidate: s.candidate,
            ..NodeStatus::default()
        }
    }
}

/// A node's link to its peer, as its `Status` answer tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerState {
    /// The peer answered.
    Up,
    /// The peer did not answer (down, unreachable, timed out); why.
    Unreachable(String),
    /// The peer refused this node's bearer token; why.
    Unauthorized(String),
}

impl PeerState {
    /// `up`, `unreachable` or `unauthorized`.
    pub fn name(&self) -> &'static str {
        match self {
            PeerState::Up => "up",
            PeerState::Unreachable(_) => "unreachable",
            PeerState::Unauthorized(_) => "unauthorized",
        }
    }

    /// Why the peer is not up (empty when it is).
    pub fn error(&self) -> &str {
        match self {
            PeerState::Up => "",
            PeerState::Unreachable(e) | PeerState::Unauthorized(e) => e,
        }
    }
}

/// The peer's state from one `Status` answer (`nodes`, `peer_error`); `None` when the
/// node has no peer (role spark or all).
pub fn peer_state(nodes: &[NodeStatus], peer_error: &str) -> Option<PeerState> {
    if let Some(e) = peer_error.strip_prefix("unauthorized: ") {
        return Some(PeerState::Unauthorized(e.to_string()));
    }
    if !peer_error.is_empty() {
        let e = peer_error
            .strip_prefix("unreachable: ")
            .unwrap_or(peer_error);
        return Some(PeerState::Unreachable(e.to_string()));
    }
    // A workstation-role node answers its own status first and its peer's after it; a
    // node of role all names its two halves `NAME/workstation` and `NAME/spark`.
    match nodes.first() {
        Some(n) if n.role == "workstation" && !n.name.ends_with("/workstation") => {
            (nodes.len() > 1).then_some(PeerState::Up)
        }
        _ => None,
    }
}

/// Renders node states as the screen `qatflow status` prints.
pub fn render(nodes: &[NodeStatus], peer_error: &str) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: &str| {
        if !v.is_empty() {
            out.push_str(&format!("  {k:<22} {v}\n"));
        }
    };
    for n in nodes {
        out.push_str(&format!("{} ({}), up {}s\n", n.name, n.role, n.uptime_s));
        line(
            &mut out,
            "conversations",
            &format!(
                "{} stored, {} accepted",
                n.stored_conversations, n.accepted_conversations
            ),
        );
        line(&mut out, "teacher", &n.teacher);
        line(&mut out, "validation", &n.validation);
        if n.role != "spark" {
            line(
                &mut out,
                "shards",
                &format!("{} sealed, {} shipped", n.shards_sealed, n.shards_shipped),
            );
            line(&mut out, "shipper", &n.shipper);
        }
        if n.role != "workstation" {
            line(
                &mut out,
                "shards committed",
                &n.shards_committed.to_string(),
            );
            let training = match &n.training {
                Some(t) => format!(
                    "{} step {}/{} loss {:.4} eta {}",
                    t.state,
                    t.step,
                    t.total_steps,
                    t.loss,
                    if t.eta_s > 0 {
                        format!("{}s", t.eta_s)
                    } else {
                        "-".into()
                    }
                ),
                None => "none".into(),
            };
            line(&mut out, "training", &training);
            line(
                &mut out,
                "export",
                if n.export.is_empty() {
                    "none"
                } else {
                    &n.export
                },
            );
            line(
                &mut out,
                "serving",
                if n.serving.is_empty() {
                    "stopped"
                } else {
                    &n.serving
                },
            );
            line(&mut out, "serving bench", &n.serving_bench);
            line(&mut out, "candidate", &n.candidate);
        }
        line(&mut out, "actor restarts", &n.actor_restarts.to_string());
    }
    if !peer_error.is_empty() {
        out.push_str(&format!("peer: {peer_error}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_screen_shows_both_roles() {
        let ws = StatusBoard::new("ws", "workstation");
        ws.set(Field::Teacher, "generating");
        let mut a = ws.snapshot();
        a.shards_sealed = 3;
        a.shards_shipped = 2;
        let spark = StatusBoard::new("gpu", "spark");
        spark.set_training(TrainingStatus {
            state: "running".into(),
            step: 5,
            total_steps: 10,
            loss: 1.5,
            eta_s: 7,
        });
        spark.set(Field::ServingBench, "10/10 passed");
        spark.set(Field::Candidate, "export: rolled back: markdown 0/10");
        let mut b = spark.snapshot();
        b.shards_committed = 2;
        let text = render(&[a, b], "");
        for needle in [
            "ws (workstation)",
            "3 sealed, 2 shipped",
            "generating",
            "gpu (spark)",
            "shards committed       2",
            "running step 5/10 loss 1.5000 eta 7s",
            "serving                stopped",
            "serving bench          10/10 passed",
            "candidate              export: rolled back: markdown 0/10",
        ] {
            assert!(text.contains(needle), "{needle:?} in\n{text}");
        }
        assert!(render(&[], "unreachable").contains("peer: unreachable"));
    }
}
