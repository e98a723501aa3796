//! End-to-end tests of the `qatflow` binary: exit codes, JSON output, bad input, the
//! dataset store across processes, and a kill -9 in the middle of an import.

use assert_cmd::Command;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/examples/qat_v4_example.jsonl")
}

fn qatflow(dir: &Path) -> Command {
    let mut c = Command::cargo_bin("qatflow").unwrap();
    c.current_dir(dir).env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    c
}

fn system() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/teacher/system_prompt.txt"),
    )
    .unwrap()
}

fn line(reply: &str) -> String {
    json!({"messages": [
        {"role": "system", "content": system()},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": format!("<think>\n</think>\n{reply}")},
    ]})
    .to_string()
}

#[test]
fn the_example_dataset_passes_v4() {
    let dir = tempfile::tempdir().unwrap();
    let out = qatflow(dir.path())
        .arg("validate")
        .arg(example())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("all gates pass"), "{text}");
    assert!(text.contains("conversations            1000"), "{text}");
}

/// The example dataset repeats no conversation: its 1,000 lines are 1,000 distinct message
/// lists (it had 936, the ids differing only through metadata; issue 18, defect 12).
#[test]
fn the_example_dataset_repeats_no_conversation() {
    let text = std::fs::read_to_string(example()).unwrap();
    let mut seen = std::collections::HashMap::new();
    let mut repeats = Vec::new();
    let mut lines = 0;
    for (i, l) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        lines += 1;
        let v: Value = serde_json::from_str(l).unwrap();
        if let Some(first) = seen.insert(v["messages"].to_string(), i + 1) {
            repeats.push((first, i + 1));
        }
    }
    assert_eq!(lines, 1000);
    assert!(
        repeats.is_empty(),
        "{} distinct message lists in {lines} lines; repeated (first, again): {:?}",
        seen.len(),
        &repeats[..repeats.len().min(5)]
    );
}

#[test]
fn json_report_lists_every_flagged_line_and_exit_1_on_a_failed_gate() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.jsonl");
    let lines = [
        line("Fine."),
        line("This is **bold**."),
        "{\"messages\": [".to_string(),
        line("One. Two. Three?"),
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = qatflow(dir.path())
        .args(["validate", "d.jsonl", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let flagged: Vec<(u64, Vec<String>)> = v["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["line"].as_u64().unwrap(),
                c["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        flagged,
        vec![
            (2, vec!["markdown".to_string()]),
            (3, vec!["invalid_json".to_string()]),
            (
                4,
                vec!["trailing_question".to_string(), "verbose".to_string()]
            ),
        ]
    );
    let gates = v["gates"].as_array().unwrap();
    let conv = gates.iter().find(|g| g["name"] == "conversations").unwrap();
    assert_eq!(conv["value"], json!(3.0));
    assert_eq!(conv["passed"], json!(false));
    assert_eq!(v["passed"], json!(false));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("d.jsonl:3: invalid_json"), "{stderr}");
}

#[test]
fn tools_flag_overrides_the_profile_tool_list() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.jsonl");
    let conv = json!({"messages": [
        {"role": "system", "content": system()},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "open_door", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "opened"},
        {"role": "assistant", "content": "<think>\n</think>\nThe door is open."},
    ]});
    std::fs::write(&file, conv.to_string()).unwrap();
    let flags = |extra: &[&str]| -> Value {
        let out = qatflow(dir.path())
            .args(["validate", "t.jsonl", "--json"])
            .args(extra)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["conversations"].clone()
    };
    assert_eq!(flags(&[])[0]["flags"], json!(["tool_call_malformed"]));
    assert_eq!(flags(&["--tools", "open_door,web_search"]), json!([]));
}

/// Each kind of unusable or broken input gives one clear line naming the file (and line),
/// never a panic.
#[test]
fn bad_input_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let full = std::fs::read_to_string(example()).unwrap();
    std::fs::write(d.join("truncated.jsonl"), &full[..5000]).unwrap();
    std::fs::write(
        d.join("utf8.jsonl"),
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}\n",
    )
    .unwrap();
    let mut big = b"{\"messages\": \"".to_vec();
    big.resize(50 * 1024 * 1024, b'a');
    big.extend_from_slice(b"\"}\n");
    std::fs::write(d.join("big.jsonl"), big).unwrap();
    std::fs::write(d.join("empty.jsonl"), b"").unwrap();
    std::fs::create_dir(d.join("adir")).unwrap();

    // Files with no usable conversation at all are unusable input (2), not failed gates.
    let cases: [(&str, i32, &str, bool); 6] = [
        (
            "truncated.jsonl",
            1,
            "truncated.jsonl:2: invalid_json: EOF while parsing",
            false,
        ),
        (
            "utf8.jsonl",
            2,
            "utf8.jsonl:1: invalid_json: invalid UTF-8 at byte",
            false,
        ),
        (
            "big.jsonl",
            2,
            "big.jsonl:1: invalid_json: line is 52428802 bytes, longer than the 32 MiB limit",
            false,
        ),
        ("empty.jsonl", 2, "empty.jsonl: empty file", true),
        ("adir", 2, "adir: is a directory", true),
        ("missing.jsonl", 2, "missing.jsonl: cannot open", true),
    ];
    for (file, code, expected, one_line) in cases {
        let out = qatflow(d).args(["validate", file]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{file}: {stderr}");
        assert!(stderr.contains(expected), "{file}: {stderr}");
        assert!(!stderr.contains("panicked"), "{file}: {stderr}");
        if one_line {
            assert_eq!(
                stderr.trim_end().lines().count(),
                1,
                "{file}: one line: {stderr}"
            );
        }
    }
    let out = qatflow(d)
        .args(["validate", "empty.jsonl", "--profile", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("gate profile `nope` not found"));
}

#[test]
fn dataset_import_is_idempotent_and_export_filters() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        let out = qatflow(d).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let ex = example().display().to_string();
    let first = run(&["dataset", "import", &ex]);
    assert!(
        first.contains("1000 new conversations, 0 already stored"),
        "{first}"
    );
    let again = run(&["dataset", "import", &ex]);
    assert!(
        again.contains("0 new conversations, 1000 already stored"),
        "{again}"
    );

    std::fs::write(
        d.join("extra.jsonl"),
        [line("Hi there."), line("Use `ls`.")].join("\n"),
    )
    .unwrap();
    run(&["dataset", "import", "extra.jsonl", "--category", "misc"]);
    let stats: Value = serde_json::from_str(&run(&["dataset", "stats", "--json"])).unwrap();
    assert_eq!(stats["conversations"], json!(1002));
    assert_eq!(stats["clean"], json!(1001));
    assert_eq!(
        stats["by_category"]["misc"],
        json!({"total": 2, "clean": 1})
    );
    assert_eq!(stats["by_category"]["concise_voice"]["total"], json!(200));
    assert_eq!(stats["by_flag"]["markdown"], json!(1));

    run(&[
        "dataset",
        "export",
        "--out",
        "misc.jsonl",
        "--category",
        "misc",
        "--clean-only",
    ]);
    let exported = std::fs::read_to_string(d.join("misc.jsonl")).unwrap();
    assert_eq!(exported.lines().collect::<Vec<_>>(), [line("Hi there.")]);

    run(&["dataset", "export", "--out", "all.jsonl"]);
    let all = std::fs::read_to_string(d.join("all.jsonl")).unwrap();
    let original = std::fs::read_to_string(example()).unwrap();
    // Import order is kept and every line (unknown fields included) round-trips exactly.
    let exported: Vec<&str> = all.lines().take(1000).collect();
    let first_difference = exported
        .iter()
        .zip(original.lines())
        .position(|(a, b)| *a != b);
    assert_eq!(
        first_difference, None,
        "exported line differs from the example"
    );
    assert_eq!(exported.len(), 1000);

    let out = qatflow(d)
        .args(["dataset", "export", "--out", "all.jsonl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists; pass --force"));
}

/// `kill -9` in the middle of an import leaves a database that opens, holds only whole
/// conversations, and takes a re-import that completes the set without duplicates.
#[test]
fn an_import_killed_midway_loses_nothing_on_reimport() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let original = std::fs::read_to_string(example()).unwrap();
    let mut big = String::new();
    for copy in 0..20 {
        for l in original.lines() {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v["copy"] = json!(copy);
            big.push_str(&v.to_string());
            big.push('\n');
        }
    }
    std::fs::write(d.join("big.jsonl"), &big).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("qatflow");
    let mut child = std::process::Command::new(&bin)
        .current_dir(d)
        .args(["dataset", "import", "big.jsonl"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once the database exists and has some data.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if d.join("qatflow-data/db/conf").exists() {
            std::thread::sleep(Duration::from_millis(300));
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let stats = qatflow(d)
        .args(["dataset", "stats", "--json"])
        .output()
        .unwrap();
    assert!(
        stats.status.success(),
        "{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    let before: Value = serde_json::from_slice(&stats.stdout).unwrap();
    let n_before = before["conversations"].as_u64().unwrap();
    assert!(
        n_before < 20_000,
        "the import was not interrupted ({n_before})"
    );

    let out = qatflow(d)
        .args(["dataset", "import", "big.jsonl"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let after: Value = serde_json::from_slice(
        &qatflow(d)
            .args(["dataset", "stats", "--json"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(after["conversations"], json!(20_000));
    qatflow(d)
        .args(["dataset", "export", "--out", "all.jsonl"])
        .assert()
        .success();
    let exported = std::fs::read_to_string(d.join("all.jsonl")).unwrap();
    let mut a: Vec<&str> = exported.lines().collect();
    let mut b: Vec<&str> = big.lines().collect();
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a.len(), b.len());
    assert!(
        a == b,
        "the export holds exactly the input conversations, each once"
    );
}

#[test]
fn help_explains_every_command() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["--help"],
        vec!["validate", "--help"],
        vec!["dataset", "--help"],
        vec!["dataset", "import", "--help"],
        vec!["dataset", "stats", "--help"],
        vec!["dataset", "export", "--help"],
        vec!["bench-gates", "--help"],
    ] {
        let out = qatflow(dir.path()).args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8(out.stdout).unwrap().len() > 200,
            "{args:?}"
        );
    }
    let out = qatflow(dir.path()).arg("--version").output().unwrap();
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .starts_with("qatflow "));
}

/// Files with nothing importable: `dataset import` and `validate` both say so and exit 2.
#[test]
fn nothing_importable_is_unusable_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files: [(&str, &[u8]); 5] = [
        ("binary.jsonl", b"\x00\x01\x02\xff\xfe\n\x7fELF\x02\n"),
        (
            "gzip.jsonl.gz",
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xcb\x48\xcd\xc9\xc9\x07\x00",
        ),
        ("types.jsonl", b"{\"messages\": 3}\n[1,2]\n\"text\"\n"),
        (
            "truncated.jsonl",
            b"{\"messages\": [{\"role\": \"user\", \"con",
        ),
        ("bom_only.jsonl", b"\xEF\xBB\xBF"),
    ];
    for (name, bytes) in files {
        std::fs::write(d.join(name), bytes).unwrap();
        for args in [vec!["dataset", "import", name], vec!["validate", name]] {
            let out = qatflow(d).args(&args).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
            assert!(stderr.contains(name), "{args:?} names the file: {stderr}");
        }
    }
}

/// One bad line never aborts an import halfway: every valid line is imported and every
/// bad one is reported with its line number.
#[test]
fn a_bad_line_is_reported_by_number_and_the_rest_imported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut text = String::new();
    for i in 1..=1200 {
        let mut v: Value = serde_json::from_str(&line(&format!("Reply {i}."))).unwrap();
        v["category"] = json!(if i == 551 { "bad\u{0}cat" } else { "ok" });
        text.push_str(&v.to_string());
        text.push('\n');
    }
    std::fs::write(d.join("d.jsonl"), text).unwrap();
    let out = qatflow(d)
        .args(["dataset", "import", "d.jsonl"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("d.jsonl:551: skipped: category contains a NUL byte"),
        "{stderr}"
    );
    assert!(stdout.contains("1199 new conversations"), "{stdout}");
}

/// A UTF-8 byte order mark does not cost line 1.
#[test]
fn a_byte_order_mark_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend_from_slice(line("Hello.").as_bytes());
    bytes.push(b'\n');
    std::fs::write(d.join("bom.jsonl"), bytes).unwrap();
    let out = qatflow(d)
        .args(["validate", "bom.jsonl", "--json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["stats"]["conversations"], json!(1), "{report}");
    let out = qatflow(d)
        .args(["dataset", "import", "bom.jsonl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 new conversations"));
}

/// A reader that closes the pipe ends the command quietly, as Unix tools do.
#[test]
fn a_closed_pipe_is_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Enough flagged lines that the JSON report is far larger than a pipe's buffer.
    let text: Vec<String> = (0..3000).map(|i| line(&format!("**bold {i}**"))).collect();
    std::fs::write(d.join("d.jsonl"), text.join("\n")).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("qatflow");
    for args in [
        vec!["validate", "d.jsonl", "--json"],
        vec!["dataset", "import", "d.jsonl"],
        vec!["dataset", "stats", "--json"],
    ] {
        let mut child = std::process::Command::new(&bin)
            .current_dir(d)
            .args(&args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(101), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// `validate /dev/zero` (no line end, ever) returns with a clear error.
#[test]
fn an_endless_line_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = qatflow(dir.path())
        .args(["validate", "/dev/zero"])
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("/dev/zero:1: no line end within"),
        "{stderr}"
    );
}

/// A temporary directory whose store (`qatflow-data`) holds the one conversation `line(reply)`.
fn store_of_one(reply: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("one.jsonl"), line(reply)).unwrap();
    let out = qatflow(dir.path())
        .args(["dataset", "import", "one.jsonl"])
        .output()
        .unwrap();
    assert!(out.status.success());
    dir
}

/// `dataset export --out DIR/FILE` creates a missing DIR (the demo writes `data/all.jsonl`
/// into a fresh working directory).
#[test]
fn export_creates_missing_parent_directories() {
    let dir = store_of_one("Hi.");
    let d = dir.path();
    let out = qatflow(d)
        .args(["dataset", "export", "--out", "new/deeper/all.jsonl"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(d.join("new/deeper/all.jsonl")).unwrap(),
        format!("{}\n", line("Hi."))
    );
}

/// `dataset export --force` replaces only regular files: a symlink keeps pointing at its
/// (replaced) target, a FIFO is written through and stays a FIFO.
#[test]
fn export_follows_symlinks_and_writes_through_special_files() {
    use std::os::unix::fs::FileTypeExt;
    let dir = store_of_one("Hi.");
    let d = dir.path();

    std::fs::write(d.join("target.jsonl"), "old\n").unwrap();
    std::os::unix::fs::symlink("target.jsonl", d.join("link.jsonl")).unwrap();
    let out = qatflow(d)
        .args(["dataset", "export", "--out", "link.jsonl", "--force"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta = std::fs::symlink_metadata(d.join("link.jsonl")).unwrap();
    assert!(meta.file_type().is_symlink(), "the link is kept");
    assert_eq!(
        std::fs::read_to_string(d.join("target.jsonl")).unwrap(),
        format!("{}\n", line("Hi."))
    );

    let fifo = d.join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    let out = qatflow(d)
        .args(["dataset", "export", "--out", "fifo", "--force"])
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(reader.join().unwrap(), format!("{}\n", line("Hi.")));
    let kind = std::fs::symlink_metadata(&fifo).unwrap().file_type();
    assert!(kind.is_fifo(), "the FIFO is not replaced by a file");
}

/// A node whose `auth.token_env` names an unset variable refuses to start (exit 2) and
/// names the variable, instead of running without authentication.
#[test]
fn an_unset_token_variable_stops_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("spark.toml"),
        "name = \"spark\"\nrole = \"spark\"\ndata_dir = \"data\"\n[server]\nlisten = \"127.0.0.1:0\"\n[auth]\ntoken_env = \"QATFLOW_TEST_TOKEN_NOT_SET\"\n",
    )
    .unwrap();
    let out = qatflow(d)
        .env_remove("QATFLOW_TEST_TOKEN_NOT_SET")
        .args(["node", "--config", "spark.toml"])
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("QATFLOW_TEST_TOKEN_NOT_SET"), "{stderr}");
    assert!(stderr.contains("unset or empty"), "{stderr}");
}
