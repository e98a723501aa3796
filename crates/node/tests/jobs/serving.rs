//! The ServingSupervisor after a node restart: a recorded serving process that is still
//! running (same pid, same start time) is re-adopted and stopped on cancel; a record whose
//! process is gone or whose pid now belongs to another process makes the node start the
//! serving command anew and leave the stranger alone. `sleep` plays the serving command.

use qatflow_node::actors::serving::{process_start_time, ServingRecord};
use qatflow_node::client;
use qatflow_node::NodeConfig;
use qatflow_proto::v1::{CancelJobRequest, StatusRequest};
use qatflow_store::Store;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn config(dir: &Path) -> NodeConfig {
    NodeConfig::from_toml(&format!(
        "name = \"spark\"\nrole = \"spark\"\ndata_dir = {:?}\n[server]\nlisten = \"127.0.0.1:0\"\n\
         [serving]\ncommand = [\"sleep\", \"30\"]\n",
        dir.display().to_string()
    ))
    .unwrap()
}

/// Opens the spark store under `dir` (`Store::open` waits for the lock that an instance
/// closed a moment ago in this process may still hold).
fn open_store(dir: &Path) -> Store {
    Store::open(dir.join("spark/db")).unwrap()
}

/// Writes `record` into the spark store of a node that is not running, as a node that was
/// killed would have left it.
fn leave_record(dir: &Path, record: ServingRecord) {
    let store = open_store(dir);
    record.save(&store).unwrap();
}

fn sleeper() -> (std::process::Child, ServingRecord) {
    let child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = child.id();
    let start_time = process_start_time(pid).unwrap();
    (child, ServingRecord { pid, start_time })
}

/// Polls the node's serving state until `done` accepts it (returned), failing the test after
/// `limit_s` seconds.
async fn wait_for_serving(
    status: &mut client::NodeClient<client::AuthChannel>,
    limit_s: u64,
    done: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let s = status
            .status(StatusRequest {
                include_peer: false,
            })
            .await
            .unwrap()
            .into_inner()
            .nodes[0]
            .serving
            .clone();
        if done(&s) {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(limit_s),
            "serving: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts the node, waits for its serving state to be `running`, runs `check` on it,
/// cancels job `serve-1`, waits until it stopped and stops the node.
fn with_node(dir: &Path, check: impl FnOnce(&str)) {
    let config = config(dir);
    qatflow_node::system(Some(2)).block_on(async {
        // The node opens the store the test just closed (see `open_store`).
        let node = qatflow_node::start(&config).await.unwrap();
        let url = format!("http://{}", node.addr);
        let mut status = client::node(&url, None).unwrap();
        let serving = wait_for_serving(&mut status, 10, |s| s.starts_with("running")).await;
        check(&serving);
        let r = client::jobs(&url, None)
            .unwrap()
            .cancel_job(CancelJobRequest {
                job_id: "serve-1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.cancelled, "{serving}");
        wait_for_serving(&mut status, 15, |s| s == "stopped (job serve-1)").await;
        node.stop().await.unwrap();
    });
}

#[test]
fn a_running_serving_process_is_readopted_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, record) = sleeper();
    leave_record(dir.path(), record);
    with_node(dir.path(), |serving| {
        assert!(
            serving.contains(&format!("pid {}, adopted", record.pid)),
            "{serving}"
        );
    });
    // The cancel sent SIGTERM to the adopted process.
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    let store = open_store(dir.path());
    assert_eq!(
        ServingRecord::load(&store).unwrap(),
        None,
        "the record is cleared"
    );
}

#[test]
fn a_stale_record_starts_the_command_anew_and_spares_the_stranger() {
    let dir = tempfile::tempdir().unwrap();
    let (mut stranger, record) = sleeper();
    // Same pid, other start time: the pid was reused by an unrelated process.
    leave_record(
        dir.path(),
        ServingRecord {
            start_time: record.start_time + 1,
            ..record
        },
    );
    with_node(dir.path(), |serving| {
        assert!(serving.contains(", started,"), "{serving}");
        assert!(
            !serving.contains(&format!("pid {},", record.pid)),
            "{serving}"
        );
    });
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "the unrelated process is left alone"
    );
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}
