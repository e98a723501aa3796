//! The node's actors. Each is a thin shell: it receives a message, runs the library call
//! on a blocking thread (`spawn_blocking`) under a span, and reports to the status board.
//! A panic in library code comes back as a `JoinError`: the actor logs it, counts a
//! restart and stops, and its `Supervisor` starts it again from what sled holds.
//!
//! Workstation: [`teacher::TeacherActor`] → [`validator::ValidatorActor`] and
//! [`shipper::ShardShipper`]. Spark: [`receiver::ShardReceiver`],
//! [`trainer::TrainerActor`], [`exporter::ExporterActor`] and
//! [`serving::ServingSupervisor`] (their jobs in
//! [`jobs::JobHub`]).

pub mod exporter;
pub mod jobs;
pub mod receiver;
pub mod serving;
pub mod shipper;
pub mod teacher;
pub mod trainer;
pub mod validator;

/// Runs `f` on a blocking thread; a panic becomes `Err` with its message.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        if e.is_panic() {
            let payload = e.into_panic();
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-text panic payload".into());
            format!("panicked: {text}")
        } else {
            "cancelled".into()
        }
    })
}
