//! The Claude Code CLI backend: runs a configurable command (by default
//! `claude -p --model opus --output-format text --permission-mode default
//! --append-system-prompt <generator instructions>`) once per batch.
//!
//! Each call runs in a fresh temporary directory (no project hooks or settings apply), the
//! prompt goes in through a temporary file on stdin, and the child runs in its own process
//! group: when the call is dropped (timeout, cancellation) the whole group is killed, so a
//! stuck CLI leaves nothing behind. With `--output-format json` the `result`, `usage` and
//! `total_cost_usd` fields of the CLI's answer are used.
//!
//! Killing the generating process with SIGKILL runs no drop code. On Linux the child is
//! therefore spawned with `PR_SET_PDEATHSIG` = SIGKILL, so the kernel kills it when its
//! parent goes away. The kernel ties that signal to the parent *thread*, and tokio spawns
//! a child on whichever thread polls the call: blocking-pool threads exit after 10 s idle,
//! and a worker that ran `block_in_place` becomes one. Children are therefore spawned from
//! one dedicated thread that lives as long as the process. What remains: the signal
//! reaches only the direct child; processes *it* started (the CLI's own helpers) are
//! reparented and keep running until they exit by themselves, since after a SIGKILL nobody
//! is left to kill the process group.

use super::{Backend, BackendOutput, BatchRequest, BoxFuture, Usage};
use crate::error::BackendError;
use serde_json::Value;
use std::process::Stdio;
use std::sync::{mpsc, OnceLock};
use tokio::sync::oneshot;

/// The placeholder in the command replaced by the generator system prompt.
pub const SYSTEM_PLACEHOLDER: &str = "{generator_system_prompt}";

/// Settings of the CLI backend.
#[derive(Debug, Clone)]
pub struct ClaudeCliConfig {
    /// Program and arguments; an argument equal to [`SYSTEM_PLACEHOLDER`] is replaced by
    /// the generator system prompt of `generation.toml`.
    pub command: Vec<String>,
}

impl Default for ClaudeCliConfig {
    fn default() -> Self {
        ClaudeCliConfig::with_model("opus")
    }
}

impl ClaudeCliConfig {
    /// The default command with another `--model`.
    pub fn with_model(model: &str) -> ClaudeCliConfig {
        let args = [
            "claude",
            "-p",
            "--model",
            model,
            "--output-format",
            "text",
            "--permission-mode",
            "default",
            "--append-system-prompt",
            SYSTEM_PLACEHOLDER,
        ];
        ClaudeCliConfig {
            command: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Splits a command line into words: white space separates, single and double quotes
    /// group, a backslash escapes the next character (outside single quotes).
    pub fn from_command_line(line: &str) -> Result<ClaudeCliConfig, String> {
        let mut words = Vec::new();
        let mut cur = String::new();
        let mut in_word = false;
        let mut chars = line.chars();
        let mut quote: Option<char> = None;
        while let Some(c) = chars.next() {
            match (quote, c) {
                (Some('\''), '\'') | (Some('"'), '"') => quote = None,
                (Some('"') | None, '\\') => {
                    cur.push(chars.next().ok_or("a trailing backslash")?);
                    in_word = true;
                }
                (Some(_), c) => cur.push(c),
                (None, '\'' | '"') => {
                    quote = Some(c);
                    in_word = true;
                }
                (None, c) if c.is_whitespace() => {
                    if in_word {
                        words.push(std::mem::take(&mut cur));
                        in_word = false;
                    }
                }
                (None, c) => {
                    cur.push(c);
                    in_word = true;
                }
            }
        }
        if quote.is_some() {
            return Err(format!("unclosed quote in command line {line:?}"));
        }
        if in_word {
            words.push(cur);
        }
        if words.is_empty() {
            return Err("the command line is empty".into());
        }
        Ok(ClaudeCliConfig { command: words })
    }
}

/// Kills the child's process group when dropped before the child was reaped.
struct GroupKill(Option<i32>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: kill(2) has no memory-safety preconditions; the group id is the pid of
            // a child this process spawned and has not reaped, so it cannot be recycled.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

/// A command to spawn on the spawner thread, the runtime whose process driver reaps it,
/// and where to send the child.
type SpawnJob = (
    tokio::process::Command,
    tokio::runtime::Handle,
    oneshot::Sender<std::io::Result<tokio::process::Child>>,
);

/// The sender to the process-wide spawner thread, started on first use.
fn spawner() -> Result<&'static mpsc::Sender<SpawnJob>, String> {
    static SPAWNER: OnceLock<Result<mpsc::Sender<SpawnJob>, String>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnJob>();
            std::thread::Builder::new()
                .name("qatflow-teacher-spawner".into())
                .spawn(move || {
                    while let Ok((mut cmd, runtime, reply)) = rx.recv() {
                        let _entered = runtime.enter();
                        if let Err(Ok(child)) = reply.send(cmd.spawn()) {
                            // The call was dropped while spawning: kill what it started.
                            drop(GroupKill(child.id().map(|id| id as i32)));
                        }
                    }
                })
                .map(|_| tx)
                .map_err(|e| format!("cannot start the teacher spawner thread: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Spawns `cmd` from the spawner thread (see the module docs), with the parent-death
/// signal set on Linux.
async fn spawn(mut cmd: tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the hook runs in the forked child before exec and calls only prctl(2),
        // getppid(2) and non-allocating error constructors, which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let (signal, unused) = (libc::SIGKILL as libc::c_ulong, 0 as libc::c_ulong);
                if libc::prctl(libc::PR_SET_PDEATHSIG, signal, unused, unused, unused) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before prctl: nobody would ever send the signal.
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    let spawner = spawner().map_err(std::io::Error::other)?;
    let (reply, child) = oneshot::channel();
    spawner
        .send((cmd, tokio::runtime::Handle::current(), reply))
        .map_err(|_| std::io::Error::other("the teacher spawner thread is gone"))?;
    child
        .await
        .map_err(|_| std::io::Error::other("the teacher spawner thread is gone"))?
}

/// The CLI backend.
#[derive(Debug)]
pub struct ClaudeCliBackend {
    config: ClaudeCliConfig,
}

impl ClaudeCliBackend {
    /// A backend running `config.command`.
    pub fn new(config: ClaudeCliConfig) -> Self {
        ClaudeCliBackend { config }
    }

    async fn run(&self, request: &BatchRequest) -> Result<BackendOutput, BackendError> {
        let program = self
            .config
            .command
            .first()
            .ok_or_else(|| BackendError::Fatal("the teacher command is empty".into()))?;
        let dir = tempfile::Builder::new()
            .prefix("qatflow-teacher-")
            .tempdir()
            .map_err(|e| {
                BackendError::Fatal(format!("cannot create a temporary directory: {e}"))
            })?;
        let prompt_path = dir.path().join("prompt.txt");
        std::fs::write(&prompt_path, &request.prompt)
            .map_err(|e| BackendError::Fatal(format!("{}: {e}", prompt_path.display())))?;
        let stdin = std::fs::File::open(&prompt_path)
            .map_err(|e| BackendError::Fatal(format!("{}: {e}", prompt_path.display())))?;
        let args = self.config.command[1..].iter().map(|a| {
            if a == SYSTEM_PLACEHOLDER {
                request.generator_system_prompt.clone()
            } else {
                a.clone()
            }
        });
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .current_dir(dir.path())
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let child = spawn(cmd).await.map_err(|e| {
            BackendError::Fatal(format!(
                "cannot run `{program}`: {e}; install it or pass another teacher command"
            ))
        })?;
        let mut guard = GroupKill(child.id().map(|id| id as i32));
        let output = child
            .wait_with_output()
            .await
            .map_err(|e| BackendError::Transport(format!("waiting for `{program}`: {e}")))?;
        guard.0 = None;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: String = stderr
                .chars()
                .rev()
                .take(300)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(BackendError::Process {
                status: output.status.to_string(),
                stderr: tail.trim().to_string(),
            });
        }
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        Ok(interpret(stdout))
    }
}

/// Uses the `result`, `usage` and `total_cost_usd` of `--output-format json` output; any
/// other output is the text itself.
fn interpret(stdout: String) -> BackendOutput {
    let trimmed = stdout.trim();
    if trimmed.starts_with('{') {
        if let Ok(v) = serde_json::from_str::<Value>(trimmed) {
            if let Some(result) = v.get("result").and_then(Value::as_str) {
                let u = &v["usage"];
                let input = [
                    "input_tokens",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                ]
                .iter()
                .filter_map(|k| u[k].as_u64())
                .sum();
                return BackendOutput {
                    text: result.to_string(),
                    usage: Usage {
                        requests: 1,
                        input_tokens: input,
                        output_tokens: u["output_tokens"].as_u64().unwrap_or(0),
                        cost_usd: v["total_cost_usd"].as_f64(),
                    },
                };
            }
        }
    }
    BackendOutput {
        text: stdout,
        usage: Usage {
            requests: 1,
            ..Usage::default()
        },
    }
}

impl Backend for ClaudeCliBackend {
    fn name(&self) -> &str {
        "claude-cli"
    }

    fn generate<'a>(
        &'a self,
        request: &'a BatchRequest,
    ) -> BoxFuture<'a, Result<BackendOutput, BackendError>> {
        Box::pin(self.run(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_split_like_a_shell() {
        let c = ClaudeCliConfig::from_command_line(
            r#"claude -p --model 'opus 4' --append-system-prompt "say \"hi\"" x\ y"#,
        )
        .unwrap();
        assert_eq!(
            c.command,
            [
                "claude",
                "-p",
                "--model",
                "opus 4",
                "--append-system-prompt",
                "say \"hi\"",
                "x y"
            ]
        );
        assert!(ClaudeCliConfig::from_command_line("a 'b").is_err());
        assert!(ClaudeCliConfig::from_command_line("  ").is_err());
        assert_eq!(ClaudeCliConfig::default().command[9], SYSTEM_PLACEHOLDER);
    }

    #[test]
    fn json_output_reports_usage_and_cost() {
        let out = interpret(
            r#"{"type":"result","result":"{\"messages\":[]}","total_cost_usd":0.25,"usage":{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":7}}"#
                .into(),
        );
        assert_eq!(out.text, "{\"messages\":[]}");
        assert_eq!(out.usage.input_tokens, 15);
        assert_eq!(out.usage.output_tokens, 7);
        assert_eq!(out.usage.cost_usd, Some(0.25));
        let plain = interpret("{\"messages\": [1]}\n".into());
        assert_eq!(plain.text, "{\"messages\": [1]}\n");
    }
}
