//! The ServingSupervisor against a fake vLLM (`examples/fake_vllm.rs`, a small HTTP server
//! whose behaviour each model directory's `fake.json` sets): the command is rendered from
//! `[serving]`, a crashed server is restarted, a stalled one (`/health` still 200, no
//! tokens) is detected and restarted, a worse candidate is rolled back while the current
//! model keeps serving, and a better one is promoted onto the serving port.

use actix::Actor;
use qatflow_node::actors::jobs::JobHub;
use qatflow_node::actors::serving::{Promote, ServingState, ServingSupervisor, StartServing};
use qatflow_node::status::StatusBoard;
use qatflow_node::NodeConfig;
use qatflow_proto::v1::{job_event, JobState, NodeStatus};
use qatflow_store::Store;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn fake_vllm() -> PathBuf {
    // target/<profile>/deps/<test> → target/<profile>/examples/fake_vllm
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/fake_vllm");
    assert!(
        path.is_file(),
        "{} is missing: `cargo test` builds examples, run the tests through cargo",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const WEATHER: &str = "What's the weather in Pune?";
const FRANCE: &str = "What is the capital of France?";
const ABOUT: &str = "Tell me about Pune.";

/// A three-prompt suite: a tool call, a fact, no markdown; every gate 100 %.
fn suite(dir: &Path) -> PathBuf {
    let s = dir.join("suite");
    std::fs::create_dir_all(&s).unwrap();
    std::fs::write(s.join("suite.toml"), "name = \"mini\"\n").unwrap();
    let cat = |name: &str, checks: &str, prompt: &str| {
        format!("[category]\nname = \"{name}\"\nchecks = [{checks}]\nmin_pass_pct = 100\n[[prompts]]\nid = \"{name}-1\"\n{prompt}\n")
    };
    std::fs::write(
        s.join("tools.toml"),
        cat(
            "tool_calling",
            "\"tool_call\", \"tool_call_in_text\"",
            &format!("user = {WEATHER:?}\nexpect_tool = {{ name = \"get_weather\", required = [\"city\"], arguments = {{ city = \"pune\" }} }}"),
        ),
    )
    .unwrap();
    std::fs::write(
        s.join("factual.toml"),
        cat(
            "factual",
            "\"answer\"",
            &format!("user = {FRANCE:?}\nexpect_answer = [\"Paris\"]"),
        ),
    )
    .unwrap();
    std::fs::write(
        s.join("markdown.toml"),
        cat("markdown", "\"markdown\"", &format!("user = {ABOUT:?}")),
    )
    .unwrap();
    s
}

fn answers(tool_ok: bool, markdown: bool) -> Value {
    let tool = if tool_ok {
        json!({"contains": "weather", "tool": ["get_weather", "{\"city\": \"Pune\"}"]})
    } else {
        json!({"contains": "weather", "content": "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pune\"}}</tool_call>"})
    };
    let about = if markdown {
        "# Pune\n- a lovely city"
    } else {
        "Pune is a lovely city."
    };
    json!([tool, {"contains": "France", "content": "It is Paris."}, {"contains": "Pune.", "content": about}])
}

/// A model directory (a Qwen3 config) with the fake's behaviour.
fn model(dir: &Path, name: &str, fake: Value) -> PathBuf {
    let m = dir.join(name);
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("config.json"),
        json!({"model_type": "qwen3"}).to_string(),
    )
    .unwrap();
    std::fs::write(m.join("hf_quant_config.json"), "{}").unwrap();
    std::fs::write(m.join("fake.json"), fake.to_string()).unwrap();
    m
}

struct Running {
    addr: actix::Addr<ServingSupervisor>,
    board: StatusBoard,
    jobs: JobHub,
    store: Store,
}

/// The fake servers' latencies are scheduler noise on a loaded machine (2 ms sleeps between
/// a few chunks), so the promotion here is decided by the gates alone: a candidate may be up
/// to 10× slower. The latency rule has its own tests in `qatflow-bench`'s `decide`.
fn start(dir: &Path, model: &Path) -> Running {
    let text = format!(
        "name = \"spark\"\nrole = \"spark\"\ndata_dir = {data:?}\n\
         [serving]\nengine = \"vllm\"\nprogram = {prog:?}\nmodel = {model:?}\nport = {port}\ncandidate_port = {cand}\n\
         max_model_len = 4096\n\
         [serving.health]\nstartup_timeout_s = 30\ninterval_ms = 100\nrequest_timeout_ms = 2000\nstall_timeout_ms = 700\n\
         failures_before_restart = 2\nmax_restarts = 3\nbackoff_initial_ms = 100\nbackoff_max_ms = 400\n\
         [serving.promote]\nsuite = {suite:?}\nidle_timeout_ms = 10000\nlatency_margin_pct = 1000\n",
        data = dir.display().to_string(),
        prog = fake_vllm().display().to_string(),
        model = model.display().to_string(),
        port = free_port(),
        cand = free_port(),
        suite = suite(dir).display().to_string(),
    );
    let config = NodeConfig::from_toml(&text).unwrap();
    let store = Store::open(dir.join("db")).unwrap();
    let board = StatusBoard::new("spark", "spark");
    let jobs = JobHub::default();
    let addr = {
        let (s, b, j) = (store.clone(), board.clone(), jobs.clone());
        let log = dir.join("serving.log");
        ServingSupervisor::new(config.serving, s, log, j, b).start()
    };
    Running {
        addr,
        board,
        jobs,
        store,
    }
}

async fn wait_for(
    board: &StatusBoard,
    limit_s: u64,
    done: impl Fn(&NodeStatus) -> bool,
) -> NodeStatus {
    let start = Instant::now();
    loop {
        let s = board.snapshot();
        if done(&s) {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(limit_s),
            "serving: {}\ncandidate: {}",
            s.serving,
            s.candidate
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The job's messages so far, and whether it ended in `state`.
fn messages(jobs: &JobHub, id: &str) -> (Vec<String>, Option<i32>) {
    let (history, _) = jobs.watch(id).unwrap();
    let mut state = None;
    let mut out = Vec::new();
    for e in history {
        match e.event {
            Some(job_event::Event::Message(m)) => out.push(m),
            Some(job_event::Event::State(s)) => state = Some(s),
            _ => {}
        }
    }
    (out, state)
}

async fn serving(r: &Running, from: &Path) -> NodeStatus {
    let want = format!("serving qatflow from {} at", from.display());
    wait_for(&r.board, 60, |s| s.serving.starts_with(&want)).await
}

fn pid_of(serving: &str) -> Option<String> {
    let rest = serving.split("(pid ").nth(1)?;
    rest.split(',').next().map(str::to_string)
}

#[test]
fn a_crashed_server_is_restarted_with_the_rendered_command() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(
        dir.path(),
        "m",
        json!({"answers": answers(true, false), "crash_once_after_ms": 1500}),
    );
    qatflow_node::system(Some(2)).block_on(async {
        let r = start(dir.path(), &m);
        let id = r.addr.send(StartServing).await.unwrap().unwrap();
        let first = serving(&r, &m).await;
        wait_for(&r.board, 30, |s| {
            s.serving.contains("restarting") || pid_of(&s.serving) != pid_of(&first.serving)
        })
        .await;
        let again = serving(&r, &m).await;
        assert_ne!(pid_of(&first.serving), pid_of(&again.serving));
        let (msgs, _) = messages(&r.jobs, &id);
        let started = msgs.iter().find(|m| m.starts_with("started: ")).unwrap();
        for flag in [
            "serve",
            "--served-model-name qatflow",
            "--quantization modelopt_fp4",
            "--reasoning-parser qwen3",
            "--enable-auto-tool-choice --tool-call-parser hermes",
            "--max-model-len 4096",
        ] {
            assert!(started.contains(flag), "{flag} in {started}");
        }
        assert!(
            msgs.iter()
                .any(|m| m.contains("restarting in") && m.contains("exited exit status: 1")),
            "{msgs:#?}"
        );
        assert!(
            msgs.iter().any(|m| m == "fake_vllm: crashing as told"),
            "the log is streamed: {msgs:#?}"
        );
        assert!(r.jobs.cancel(&id));
        wait_for(&r.board, 30, |s| s.serving.starts_with("stopped")).await;
        assert_eq!(messages(&r.jobs, &id).1, Some(JobState::Cancelled as i32));
    });
}

#[test]
fn a_stalled_engine_is_detected_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    // Request 1 is the smoke completion, 2 the first probe; the third never gets a token.
    let m = model(
        dir.path(),
        "m",
        json!({"answers": answers(true, false), "stall_once_after": 2}),
    );
    qatflow_node::system(Some(2)).block_on(async {
        let r = start(dir.path(), &m);
        let id = r.addr.send(StartServing).await.unwrap().unwrap();
        let first = serving(&r, &m).await;
        wait_for(&r.board, 30, |s| {
            pid_of(&s.serving) != pid_of(&first.serving) && s.serving.starts_with("serving")
        })
        .await;
        let (msgs, _) = messages(&r.jobs, &id);
        assert!(
            msgs.iter()
                .any(|m| m.contains("stalled: a probe completion failed")
                    && m.contains("no data for 700 ms")),
            "{msgs:#?}"
        );
        assert!(r.jobs.cancel(&id));
        wait_for(&r.board, 30, |s| s.serving.starts_with("stopped")).await;
    });
}

#[test]
fn a_worse_candidate_is_rolled_back_and_a_better_one_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let current = model(
        dir.path(),
        "current",
        json!({"answers": answers(true, true)}),
    );
    let worse = model(
        dir.path(),
        "worse",
        json!({"answers": answers(false, true)}),
    );
    let better = model(
        dir.path(),
        "better",
        json!({"answers": answers(true, false)}),
    );
    qatflow_node::system(Some(2)).block_on(async {
        let r = start(dir.path(), &current);
        r.addr.send(StartServing).await.unwrap().unwrap();
        serving(&r, &current).await;

        let id = r
            .addr
            .send(Promote {
                candidate: Some(worse.clone()),
                take: false,
            })
            .await
            .unwrap()
            .unwrap();
        let again = r
            .addr
            .send(Promote {
                candidate: Some(worse.clone()),
                take: false,
            })
            .await
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(again.contains("still running"), "{again}");
        let s = wait_for(&r.board, 60, |s| s.candidate.contains("rolled back")).await;
        assert!(
            s.candidate
                .starts_with(&format!("{}: rolled back: gate failed: ", worse.display())),
            "{}",
            s.candidate
        );
        assert!(
            s.candidate.contains("gate failed: tool_calling 0/1"),
            "{}",
            s.candidate
        );
        assert!(
            s.candidate
                .contains("tool_calling: 0% passed, the serving model 100%"),
            "{}",
            s.candidate
        );
        assert!(
            s.serving_bench.starts_with("2/3 passed"),
            "{}",
            s.serving_bench
        );
        assert!(
            s.serving
                .starts_with(&format!("serving qatflow from {}", current.display())),
            "{}",
            s.serving
        );
        let (msgs, state) = messages(&r.jobs, &id);
        assert_eq!(state, Some(JobState::Finished as i32), "{msgs:#?}");
        let missing = r
            .addr
            .send(Promote {
                candidate: Some(dir.path().join("nope")),
                take: false,
            })
            .await
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(missing.contains("no config.json"), "{missing}");

        r.addr
            .send(Promote {
                candidate: Some(better.clone()),
                take: false,
            })
            .await
            .unwrap()
            .unwrap();
        let s = wait_for(&r.board, 60, |s| s.candidate.contains(": promoted")).await;
        assert!(
            s.candidate
                .starts_with(&format!("{}: promoted: 3/3 passed", better.display())),
            "{}",
            s.candidate
        );
        let s = serving(&r, &better).await;
        assert!(
            s.serving_bench.starts_with("3/3 passed"),
            "{}",
            s.serving_bench
        );
        let text = qatflow_node::status::render(&[s], "");
        assert!(
            text.contains("candidate") && text.contains("serving bench"),
            "{text}"
        );
        assert_eq!(
            ServingState::load(&r.store).unwrap().model,
            Some(better.clone()),
            "remembered across restarts"
        );
    });
}
