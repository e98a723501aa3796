//! The claude-cli backend against a stub executable (a shell script written by the test)
//! that prints canned output, fails, or hangs: the stored dataset is right in each case,
//! every retry is counted, and a hung child's whole process group is killed. On Linux, a
//! teacher child also dies when the generating process is killed with SIGKILL.

mod common;

use common::{example_binary, line, lines};
use qatflow_core::{NoProgress, Role};
use qatflow_gates::GateProfile;
use qatflow_store::{Filter, Store};
use qatflow_teacher::backend::claude_cli::SYSTEM_PLACEHOLDER;
use qatflow_teacher::{
    run_generation, BackendConfig, CancellationToken, ClaudeCliConfig, GenerateOptions,
    GenerationReport,
};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STUB: &str = r#"#!/bin/sh
STATE="__STATE__"
n=$(cat "$STATE/count" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > "$STATE/count"
pwd > "$STATE/cwd.$n"
cat > "$STATE/stdin.$n"
printf '%s\n' "$@" > "$STATE/args.$n"
step=default
[ -f "$STATE/step.$n" ] && step=$(cat "$STATE/step.$n")
case "$step" in
  hang) echo $$ > "$STATE/hung"; sleep 30 & echo $! > "$STATE/sleeper"; wait ;;
  fail) echo "API Error: 529 overloaded" >&2; exit 1 ;;
  *) cat "$STATE/out.$step" ;;
esac
"#;

/// A stub teacher in a temporary directory.
struct Stub {
    dir: tempfile::TempDir,
}

impl Stub {
    fn new(default_output: &str) -> Stub {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("claude");
        std::fs::write(
            &script,
            STUB.replace("__STATE__", dir.path().to_str().unwrap()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let stub = Stub { dir };
        stub.output("default", default_output);
        stub
    }

    /// Sets the output named `name`.
    fn output(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(format!("out.{name}")), text).unwrap();
    }

    /// Call `n` (1-based) does `step`: an output name, `hang` or `fail`.
    fn step(&self, n: u32, step: &str) {
        std::fs::write(self.dir.path().join(format!("step.{n}")), step).unwrap();
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap()
    }

    fn calls(&self) -> u32 {
        self.file("count").trim().parse().unwrap()
    }

    fn backend(&self) -> BackendConfig {
        let script: PathBuf = self.dir.path().join("claude");
        BackendConfig::ClaudeCli(ClaudeCliConfig {
            command: vec![
                script.to_str().unwrap().to_string(),
                "-p".into(),
                "--permission-mode".into(),
                "default".into(),
                "--append-system-prompt".into(),
                SYSTEM_PLACEHOLDER.into(),
            ],
        })
    }
}

fn run(stub: &Stub, store: &Store) -> GenerationReport {
    let mut o = GenerateOptions::new(stub.backend(), GateProfile::builtin("v4").unwrap());
    o.category = Some("honest_memory".into());
    o.count = Some(3);
    o.per_batch = 3;
    o.backoff = Duration::from_millis(10);
    o.timeout = Duration::from_secs(1);
    run_generation(&o, store, &NoProgress, &CancellationToken::new()).unwrap()
}

fn user_texts(store: &Store) -> Vec<String> {
    let mut v: Vec<String> = store
        .iter(&Filter::default())
        .map(|s| {
            let c = s.unwrap().conversation().unwrap();
            let u = c.messages.iter().find(|m| m.role == Role::User).unwrap();
            u.content_str().unwrap().to_string()
        })
        .collect();
    v.sort();
    v
}

fn expected(prefix: &str, n: usize) -> Vec<String> {
    let mut v: Vec<String> = (0..n)
        .map(|i| format!("Tell me about {prefix}-{i}."))
        .collect();
    v.sort();
    v
}

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

#[test]
fn clean_output_runs_in_a_fresh_directory_with_the_prompt_on_stdin() {
    let stub = Stub::new(&lines("cli", 3));
    let (_d, store) = store();
    let report = run(&stub, &store);
    assert_eq!(report.total_retries(), 0);
    assert_eq!(user_texts(&store), expected("cli", 3));
    let stdin = stub.file("stdin.1");
    assert!(stdin.starts_with("Write 3 different"), "{stdin}");
    assert!(stdin.contains("Category: honest_memory"));
    assert!(stdin.len() < 3000);
    let args = stub.file("args.1");
    assert!(args.contains("-p\n--permission-mode\ndefault\n--append-system-prompt\n"));
    assert!(args.contains("Do NOT make a plan"), "{args}");
    let cwd = stub.file("cwd.1");
    let cwd = Path::new(cwd.trim());
    assert!(
        cwd.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("qatflow-teacher-"),
        "{cwd:?}"
    );
    assert!(!cwd.exists(), "the temporary directory was not removed");
    let s = store.iter(&Filter::default()).next().unwrap().unwrap();
    assert_eq!(
        s.record.source.as_deref(),
        Some("claude-cli:honest_memory/0")
    );
}

#[test]
fn fenced_output_is_unwrapped() {
    let stub = Stub::new(&format!("```json\n{}\n```", lines("fence", 3)));
    let (_d, store) = store();
    let report = run(&stub, &store);
    assert_eq!(report.total_retries(), 0);
    assert_eq!(user_texts(&store), expected("fence", 3));
}

#[test]
fn planning_mode_and_empty_output_are_retried() {
    let stub = Stub::new(&lines("after-plan", 3));
    stub.output(
        "plan",
        "I've drafted an approach.\nPlan is ready for your review.\n",
    );
    stub.output("empty", "\n");
    stub.step(1, "plan");
    stub.step(2, "empty");
    let (_d, store) = store();
    let report = run(&stub, &store);
    let kinds: Vec<&str> = report.retries.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["planning_mode", "empty"]);
    assert_eq!(report.categories["honest_memory"].retries, 2);
    assert_eq!(stub.calls(), 3);
    assert_eq!(user_texts(&store), expected("after-plan", 3));
}

#[test]
fn half_a_line_loses_only_that_line() {
    let broken = line("cut-2");
    let stub = Stub::new(&format!(
        "{}\n{}",
        lines("cut", 2),
        &broken[..broken.len() - 9]
    ));
    let (_d, store) = store();
    let report = run(&stub, &store);
    let c = &report.categories["honest_memory"];
    assert_eq!((c.accepted, c.unparsed_lines, c.retries), (2, 1, 0));
    assert_eq!(user_texts(&store), expected("cut", 2));
}

#[test]
fn a_failing_command_is_retried() {
    let stub = Stub::new(&lines("recovered", 3));
    stub.step(1, "fail");
    let (_d, store) = store();
    let report = run(&stub, &store);
    assert_eq!(report.retries.len(), 1);
    assert_eq!(report.retries[0].kind, "process");
    assert!(
        report.retries[0].reason.contains("529 overloaded"),
        "{:?}",
        report.retries
    );
    assert_eq!(user_texts(&store), expected("recovered", 3));
}

fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Waits up to `limit` for `pid` to be gone.
fn gone_within(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !is_gone(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    is_gone(pid)
}

#[test]
fn a_hung_command_is_killed_with_its_children_and_retried() {
    // Call 1 runs `sleep 30` in a child of the stub; the 1 s timeout kills the group.
    let stub = Stub::new(&lines("after-hang", 3));
    stub.step(1, "hang");
    let (_d, store) = store();
    let t = Instant::now();
    let report = run(&stub, &store);
    let generation = t.elapsed();
    assert!(
        generation < Duration::from_secs(5),
        "generation took {generation:?}: the 1 s timeout should cut the 30 s hang"
    );
    assert_eq!(report.retries.len(), 1);
    assert_eq!(report.retries[0].kind, "timeout");
    assert_eq!(stub.calls(), 2);
    assert_eq!(user_texts(&store), expected("after-hang", 3));
    let hung: u32 = stub.file("hung").trim().parse().unwrap();
    let sleeper: u32 = stub.file("sleeper").trim().parse().unwrap();
    assert!(
        gone_within(hung, Duration::from_secs(3)),
        "the hung stub {hung} is still running"
    );
    assert!(
        gone_within(sleeper, Duration::from_secs(3)),
        "the hung stub's `sleep 30` ({sleeper}) is still running"
    );
}

#[test]
fn json_output_format_reports_usage_and_cost() {
    let result = serde_json::json!({
        "type": "result",
        "result": lines("json", 3),
        "total_cost_usd": 0.0125,
        "usage": {"input_tokens": 1200, "output_tokens": 800},
    });
    let stub = Stub::new(&result.to_string());
    let (_d, store) = store();
    let report = run(&stub, &store);
    assert_eq!(user_texts(&store), expected("json", 3));
    assert_eq!(report.usage.input_tokens, 1200);
    assert_eq!(report.usage.output_tokens, 800);
    assert_eq!(report.usage.cost_usd, Some(0.0125));
}

#[test]
fn a_missing_program_stops_the_run() {
    let (_d, store) = store();
    let mut o = GenerateOptions::new(
        BackendConfig::ClaudeCli(ClaudeCliConfig {
            command: vec!["/nonexistent/claude".into(), "-p".into()],
        }),
        GateProfile::builtin("v4").unwrap(),
    );
    o.category = Some("honest_memory".into());
    o.count = Some(3);
    let err = run_generation(&o, &store, &NoProgress, &CancellationToken::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot run `/nonexistent/claude`"), "{err}");
    assert!(store.is_empty());
}

#[cfg(target_os = "linux")]
#[test]
fn a_sigkilled_generator_takes_its_teacher_child_with_it() {
    // The stub writes its pid, then becomes `sleep 30` (same pid, the direct child).
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("teacher.pid");
    let script = dir.path().join("claude");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho $$ > '{}.tmp'\nmv '{0}.tmp' '{0}'\nexec sleep 30\n",
            pid_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = dir.path().join("db");
    let mut generator = Command::new(example_binary())
        .args(["--db", db.to_str().unwrap()])
        .args([
            "--category",
            "honest_memory",
            "--count",
            "3",
            "--per-batch",
            "3",
        ])
        .args(["--timeout", "120"])
        .args(["--teacher-command", &format!("'{}' -p", script.display())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pid_file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !pid_file.exists() {
        let _ = generator.kill();
        let _ = generator.wait();
        panic!("the generator never started the stub teacher");
    }
    let teacher: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!is_gone(teacher), "the stub teacher {teacher} exited early");
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
    let killed = unsafe { libc::kill(generator.id() as i32, libc::SIGKILL) };
    assert_eq!(killed, 0, "cannot SIGKILL the generator");
    let status = generator.wait().unwrap();
    assert!(!status.success());
    let gone = gone_within(teacher, Duration::from_secs(5));
    if !gone {
        // SAFETY: as above; do not leave the stray `sleep 30` behind a failing test.
        unsafe {
            libc::kill(teacher as i32, libc::SIGKILL);
        }
    }
    assert!(
        gone,
        "the teacher child {teacher} outlived the SIGKILLed generator"
    );
}
