//! Jobs on a spark node in this process: a serve job runs the configured command, streams
//! its output and state, and stops when cancelled; training and export jobs are refused
//! with a clear status when the node has no `[trainer]` / `[exporter]` section. Serving
//! after a node restart: [`serving`].

use qatflow_node::client;
use qatflow_node::NodeConfig;
use qatflow_proto::v1::{
    job_event, CancelJobRequest, JobKind, JobState, StartJobRequest, WatchJobRequest,
};
use tokio_stream::StreamExt;

#[path = "jobs/serving.rs"]
mod serving;

#[test]
fn a_serve_job_streams_output_and_stops_on_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig::from_toml(&format!(
        "name = \"spark\"\nrole = \"spark\"\ndata_dir = {:?}\n[server]\nlisten = \"127.0.0.1:0\"\n\
         [serving]\ncommand = [\"sh\", \"-c\", \"echo serving model; sleep 30\"]\n",
        dir.path().display().to_string()
    ))
    .unwrap();
    qatflow_node::system(Some(2)).block_on(async {
        let node = qatflow_node::start(&config).await.unwrap();
        let url = format!("http://{}", node.addr);
        let mut jobs = client::jobs(&url, None).unwrap();
        let id = jobs
            .start_job(StartJobRequest {
                kind: JobKind::Serve as i32,
            })
            .await
            .unwrap()
            .into_inner()
            .job_id;
        let again = jobs
            .start_job(StartJobRequest {
                kind: JobKind::Serve as i32,
            })
            .await
            .unwrap_err();
        assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again}");

        let mut events = jobs
            .watch_job(WatchJobRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        let mut seen = Vec::new();
        let mut cancelled = false;
        while let Some(e) = tokio::time::timeout(std::time::Duration::from_secs(20), events.next())
            .await
            .expect("job events keep coming")
        {
            let e = e.unwrap().event.unwrap();
            if e == job_event::Event::Message("serving model".into()) && !cancelled {
                let r = jobs
                    .cancel_job(CancelJobRequest { job_id: id.clone() })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(r.cancelled);
                cancelled = true;
            }
            seen.push(e);
        }
        assert_eq!(
            seen.first(),
            Some(&job_event::Event::State(JobState::Running as i32))
        );
        assert_eq!(
            seen.last(),
            Some(&job_event::Event::State(JobState::Cancelled as i32)),
            "{seen:?}"
        );

        for kind in [JobKind::Train, JobKind::Export] {
            let err = jobs
                .start_job(StartJobRequest { kind: kind as i32 })
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
            assert!(err.message().contains("section"), "{err}");
        }
        node.stop().await.unwrap();
    });
}
