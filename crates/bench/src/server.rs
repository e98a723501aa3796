//! A model directory served for the benchmark: `qatflow serve MODEL_DIR --port 0` started
//! as a child process, whose address is read from the one line it prints on stdout
//! (`listening on http://127.0.0.1:PORT`). The child is killed when the handle is dropped.

use crate::BenchError;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The line prefix a server prints when it is ready.
pub const LISTENING: &str = "listening on ";

/// A server child process.
#[derive(Debug)]
pub struct LocalServer {
    child: Child,
    /// Its base URL (`http://127.0.0.1:PORT`).
    pub url: String,
}

impl LocalServer {
    /// Runs `program args…` and waits up to `timeout` for its `listening on URL` line.
    pub async fn start(
        program: &Path,
        args: &[String],
        timeout: Duration,
    ) -> Result<LocalServer, BenchError> {
        let what = format!("{} {}", program.display(), args.join(" "));
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BenchError::Server(format!("cannot start `{what}`: {e}")))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let wait = async {
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) => {
                        if let Some(url) = line.trim().strip_prefix(LISTENING) {
                            return Ok(url.trim().trim_end_matches('/').to_string());
                        }
                    }
                    Ok(None) => {
                        return Err(format!(
                            "`{what}` closed its output without printing `{LISTENING}URL`; see its errors above"
                        ))
                    }
                    Err(e) => return Err(format!("cannot read the output of `{what}`: {e}")),
                }
            }
        };
        let url = match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(url)) => url,
            Ok(Err(m)) => return Err(BenchError::Server(m)),
            Err(_) => {
                return Err(BenchError::Server(format!(
                    "`{what}` printed no `{LISTENING}URL` line within {} ms",
                    timeout.as_millis()
                )))
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(LocalServer { child, url })
    }

    /// Stops the server: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) has no memory effects; a pid that is gone gives ESRCH.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
