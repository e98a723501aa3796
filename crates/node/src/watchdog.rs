//! Heartbeats and the watchdog: an actor doing long work (a shipping round, a shard
//! import) hands a [`Heartbeat`] to that work, which beats whenever it makes progress; the
//! watchdog ([`watch`]) runs in the actor's own context, and when the work has not beaten
//! for the configured time it logs the stall, aborts the work and stops the actor, which
//! its actix `Supervisor` then restarts from what sled holds.

use actix::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::AbortHandle;

/// Progress reports of one actor's long work; cheap to clone.
#[derive(Clone)]
pub struct Heartbeat {
    inner: Arc<Inner>,
}

struct Inner {
    origin: Instant,
    last_ms: AtomicU64,
    busy: AtomicBool,
    work: Mutex<Option<AbortHandle>>,
}

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        Heartbeat {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                last_ms: AtomicU64::new(0),
                busy: AtomicBool::new(false),
                work: Mutex::new(None),
            }),
        }
    }
}

impl Heartbeat {
    /// Work started (its task is `work`, aborted when it stalls): the watchdog is armed.
    pub fn start(&self, work: AbortHandle) {
        self.beat();
        *self.work() = Some(work);
        self.inner.busy.store(true, Ordering::SeqCst);
    }

    /// The work made progress.
    pub fn beat(&self) {
        let now = self.inner.origin.elapsed().as_millis() as u64;
        self.inner.last_ms.store(now, Ordering::SeqCst);
    }

    /// The work ended: the watchdog is disarmed.
    pub fn finish(&self) {
        self.inner.busy.store(false, Ordering::SeqCst);
        *self.work() = None;
    }

    /// How long the running work has gone without a beat; `None` when idle.
    pub fn stalled_for(&self) -> Option<Duration> {
        if !self.inner.busy.load(Ordering::SeqCst) {
            return None;
        }
        let now = self.inner.origin.elapsed().as_millis() as u64;
        Some(Duration::from_millis(
            now.saturating_sub(self.inner.last_ms.load(Ordering::SeqCst)),
        ))
    }

    fn work(&self) -> std::sync::MutexGuard<'_, Option<AbortHandle>> {
        self.inner.work.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Aborts the running work, if any, and disarms the watchdog.
    fn abort(&self) {
        if let Some(work) = self.work().take() {
            work.abort();
        }
        self.inner.busy.store(false, Ordering::SeqCst);
    }
}

/// Checks `heartbeat` several times per `timeout` from the context of actor `actor` of node
/// `node`; when its work has not beaten for `timeout`, logs an error in an
/// `{actor}.Watchdog` span (so the trace records the stall), aborts the work and stops the
/// actor for its supervisor to restart.
pub fn watch<A>(
    ctx: &mut Context<A>,
    node: &str,
    actor: &'static str,
    heartbeat: Heartbeat,
    timeout: Duration,
) where
    A: Actor<Context = Context<A>>,
{
    let node = node.to_string();
    let period = (timeout / 4).max(Duration::from_millis(10));
    ctx.run_interval(period, move |_act, ctx| {
        let Some(stalled) = heartbeat.stalled_for() else {
            return;
        };
        if stalled >= timeout {
            let span =
                crate::trace::actor_span_in(&tracing::Span::none(), &node, actor, "Watchdog");
            let _entered = span.enter();
            tracing::error!(
                actor,
                stalled_ms = stalled.as_millis() as u64,
                "no progress for {stalled:?} (limit {timeout:?}); aborting the work and restarting"
            );
            heartbeat.abort();
            ctx.stop();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn beats_reset_the_stall_and_finish_disarms() {
        let hb = Heartbeat::default();
        assert!(hb.stalled_for().is_none());
        let task = tokio::spawn(std::future::pending::<()>());
        hb.start(task.abort_handle());
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(hb.stalled_for().unwrap() >= Duration::from_millis(30));
        hb.beat();
        assert!(hb.stalled_for().unwrap() < Duration::from_millis(30));
        hb.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert!(hb.stalled_for().is_none());
    }
}
