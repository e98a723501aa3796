//! `qatflow dataset import | stats | export`: the sled dataset store from the command line.

use crate::cmd::validate::load_profile;
use crate::output::table;
use crate::progress::Bar;
use anyhow::{bail, Context};
use qatflow_core::{Conversation, JsonlReader, Progress};
use qatflow_gates::{Check, Checker};
use qatflow_store::{Filter, InsertOutcome, NewConversation, Store, DEFAULT_DB_PATH};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Conversations written per flush during import.
const IMPORT_BATCH: usize = 500;

/// The `dataset` subcommands.
#[derive(clap::Subcommand)]
pub enum DatasetCommand {
    /// Check every line of a JSONL file against the gates and store it, keyed by content
    /// hash (re-importing a line is a no-op). Lines that are not valid JSON (or whose
    /// category or source holds a NUL byte) are skipped and listed by line number, and every
    /// other line is imported; conversations with gate flags are stored with their flags.
    /// Exit status 2 when nothing in the file is importable.
    Import(ImportArgs),
    /// Counts per category and per gate flag.
    Stats(StatsArgs),
    /// Write stored conversations to a JSONL file, in import order.
    Export(ExportArgs),
}

/// The database location, shared by every subcommand.
#[derive(clap::Args)]
pub struct DbArg {
    /// The sled database directory (created on first import).
    #[arg(long, default_value = DEFAULT_DB_PATH, value_name = "DIR")]
    pub db: PathBuf,
}

/// Arguments of `dataset import`.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// The JSONL file to import.
    pub file: PathBuf,
    /// Category for every conversation (default: each line's own "category" field).
    #[arg(long)]
    pub category: Option<String>,
    /// Source label (default: each line's own "source" field, else the file name).
    #[arg(long)]
    pub source: Option<String>,
    /// Gate profile whose checks flag the conversations.
    #[arg(long, default_value = "v4")]
    pub profile: String,
    /// Allowed tool names, comma-separated; replaces the profile's tool list.
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub tools: Option<Vec<String>>,
    #[command(flatten)]
    pub db: DbArg,
}

/// Arguments of `dataset stats`.
#[derive(clap::Args)]
pub struct StatsArgs {
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub db: DbArg,
}

/// Arguments of `dataset export`.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// Output JSONL file (written to a temporary file, then renamed into place). A symlink
    /// is followed (its target is replaced, the link kept); a special file such as
    /// /dev/stdout or a FIFO is written to directly.
    #[arg(long)]
    pub out: PathBuf,
    /// Only this category.
    #[arg(long)]
    pub category: Option<String>,
    /// Only conversations that no check flagged.
    #[arg(long)]
    pub clean_only: bool,
    /// Only conversations with this flag (a check name such as markdown, or
    /// duplicate_messages: the same messages as a conversation stored before).
    #[arg(long)]
    pub flag: Option<String>,
    /// Replace --out if it is an existing regular file (atomically, keeping its
    /// permissions).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub db: DbArg,
}

/// Runs a `dataset` subcommand.
pub fn run(cmd: DatasetCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DatasetCommand::Import(a) => import(a),
        DatasetCommand::Stats(a) => stats(a),
        DatasetCommand::Export(a) => export(a),
    }
}

fn open_store(db: &Path) -> anyhow::Result<Store> {
    Ok(Store::open(db)?)
}

struct Pending {
    conversation: Conversation,
    category: Option<String>,
    source: Option<String>,
    flags: Vec<String>,
}

fn import(a: ImportArgs) -> anyhow::Result<ExitCode> {
    let profile = load_profile(&a.profile, a.tools)?;
    let checker = Checker::new(&profile);
    let reader = JsonlReader::open(&a.file)?;
    let store = open_store(&a.db.db)?;
    let _span = tracing::info_span!("dataset_import", file = %a.file.display()).entered();
    let file_label = a
        .file
        .file_name()
        .map(|n| format!("file:{}", n.to_string_lossy()))
        .unwrap_or_else(|| "file".into());
    let bar = Bar::bytes("importing");
    bar.set_total(std::fs::metadata(&a.file).map(|m| m.len()).unwrap_or(0));
    let (mut inserted, mut duplicates, mut lines) = (0u64, 0u64, 0u64);
    let mut skipped: Vec<(usize, String)> = Vec::new();
    let mut pending: Vec<Pending> = Vec::with_capacity(IMPORT_BATCH);
    let mut commit = |pending: &mut Vec<Pending>| -> anyhow::Result<()> {
        let outcomes = store.insert_batch(pending.iter().map(|p| NewConversation {
            conversation: &p.conversation,
            category: p.category.as_deref(),
            source: p.source.as_deref(),
            flags: &p.flags,
        }))?;
        for o in outcomes {
            match o {
                InsertOutcome::Inserted(_) => inserted += 1,
                InsertOutcome::Duplicate(_) => duplicates += 1,
            }
        }
        pending.clear();
        Ok(())
    };
    for line in reader {
        let line = line?;
        lines += 1;
        let text = match line.text {
            Ok(t) => t,
            Err(problem) => {
                skipped.push((line.number, problem.to_string()));
                continue;
            }
        };
        bar.advance(text.len() as u64 + 1);
        let (conversation, report) = checker.check_line(&text);
        let Some(conversation) = conversation else {
            let why = report
                .findings
                .first()
                .map(|f| f.detail.clone())
                .unwrap_or_default();
            skipped.push((line.number, why));
            continue;
        };
        let category = a
            .category
            .clone()
            .or_else(|| conversation.extra_str("category").map(str::to_string));
        let source = a
            .source
            .clone()
            .or_else(|| conversation.extra_str("source").map(str::to_string))
            .or_else(|| Some(file_label.clone()));
        // The store refuses NUL in index names: skip such a line here, by number, so it
        // neither aborts the import nor keeps the lines after it out.
        if let Some(field) = [("category", &category), ("source", &source)]
            .into_iter()
            .find(|(_, v)| v.as_deref().is_some_and(|v| v.contains('\0')))
            .map(|(f, _)| f)
        {
            skipped.push((
                line.number,
                format!("{field} contains a NUL byte (\\u0000)"),
            ));
            continue;
        }
        let flags = report
            .flags()
            .into_iter()
            .map(|c| c.name().to_string())
            .collect();
        pending.push(Pending {
            conversation,
            category,
            source,
            flags,
        });
        if pending.len() >= IMPORT_BATCH {
            commit(&mut pending)?;
        }
    }
    commit(&mut pending)?;
    bar.finish();
    if lines == 0 {
        bail!(
            "{}: empty file, nothing to import; expected one JSON object per line",
            a.file.display()
        );
    }
    for (n, why) in skipped.iter().take(20) {
        eprintln!("{}:{n}: skipped: {why}", a.file.display());
    }
    if skipped.len() > 20 {
        eprintln!("… and {} more skipped lines", skipped.len() - 20);
    }
    if inserted + duplicates == 0 {
        bail!(
            "{}: nothing importable: all {lines} lines were skipped (reasons above); expected OpenAI chat JSONL, one {{\"messages\": [...]}} object per line",
            a.file.display()
        );
    }
    println!(
        "{}: {lines} lines, {inserted} new conversations, {duplicates} already stored, {} skipped; database {} now holds {}",
        a.file.display(),
        skipped.len(),
        store.path().display(),
        store.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn stats(a: StatsArgs) -> anyhow::Result<ExitCode> {
    if !a.db.db.exists() {
        bail!(
            "{}: no database here; import a dataset first with `qatflow dataset import FILE.jsonl`",
            a.db.db.display()
        );
    }
    let store = open_store(&a.db.db)?;
    let s = store.stats()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: {} conversations, {} clean\n",
        store.path().display(),
        s.conversations,
        s.clean
    );
    let rows: Vec<Vec<String>> = s
        .by_category
        .iter()
        .map(|(c, n)| vec![c.clone(), n.total.to_string(), n.clean.to_string()])
        .collect();
    print!("{}", table(&["category", "conversations", "clean"], &rows));
    if !s.by_flag.is_empty() {
        let rows: Vec<Vec<String>> = s
            .by_flag
            .iter()
            .map(|(f, n)| vec![f.clone(), n.to_string()])
            .collect();
        println!();
        print!("{}", table(&["flag", "conversations"], &rows));
    }
    Ok(ExitCode::SUCCESS)
}

fn export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    if let Some(flag) = &a.flag {
        if Check::from_name(flag).is_none() && flag != qatflow_store::DUPLICATE_MESSAGES {
            let mut names: Vec<&str> = Check::ALL.iter().map(|c| c.name()).collect();
            names.push(qatflow_store::DUPLICATE_MESSAGES);
            bail!(
                "--flag {flag}: unknown check; use one of {}",
                names.join(", ")
            );
        }
    }
    let target = output_target(&a.out, a.force)?;
    if !a.db.db.exists() {
        bail!(
            "{}: no database here; import a dataset first with `qatflow dataset import FILE.jsonl`",
            a.db.db.display()
        );
    }
    let store = open_store(&a.db.db)?;
    let filter = Filter {
        category: a.category.clone(),
        clean_only: a.clean_only,
        flag: a.flag.clone(),
    };
    let write_all = |w: &mut dyn Write| -> anyhow::Result<u64> {
        let mut w = std::io::BufWriter::new(w);
        let mut count = 0u64;
        for item in store.iter(&filter) {
            let s = item?;
            w.write_all(s.record.conversation.as_bytes())?;
            w.write_all(b"\n")?;
            count += 1;
        }
        w.flush()?;
        Ok(count)
    };
    let count = match target {
        OutputTarget::Special(path) => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("{}: cannot open for writing", path.display()))?;
            write_all(&mut f)?
        }
        OutputTarget::File { path, mode } => {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)
                .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
            let mut tmp = tempfile::Builder::new()
                .prefix(".qatflow-export-")
                .tempfile_in(dir)
                .with_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
            let count = write_all(tmp.as_file_mut())?;
            {
                use std::os::unix::fs::PermissionsExt;
                tmp.as_file()
                    .set_permissions(std::fs::Permissions::from_mode(mode))?;
            }
            tmp.as_file().sync_all()?;
            tmp.persist(&path).with_context(|| {
                format!("{}: cannot move the export into place", path.display())
            })?;
            if let Ok(d) = std::fs::File::open(dir) {
                // Make the rename itself durable.
                let _ = d.sync_all();
            }
            count
        }
    };
    eprintln!("wrote {count} conversations to {}", a.out.display());
    Ok(ExitCode::SUCCESS)
}

/// Where `dataset export` writes.
#[derive(Debug, PartialEq, Eq)]
enum OutputTarget {
    /// A regular file (new, or replaced with `--force`), written atomically with `mode`.
    File {
        /// The file itself (a symlink's final target).
        path: PathBuf,
        /// Permission bits: the replaced file's, or 0644 for a new one.
        mode: u32,
    },
    /// A character device or FIFO (`/dev/stdout`): written to directly, never replaced.
    Special(PathBuf),
}

/// Decides how `--out` is written: a symlink is followed to its target, a special file is
/// written through, an existing regular file only with `force`, anything else refused.
fn output_target(out: &Path, force: bool) -> anyhow::Result<OutputTarget> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let is_link = std::fs::symlink_metadata(out).is_ok_and(|m| m.file_type().is_symlink());
    let path = if is_link {
        match std::fs::canonicalize(out) {
            Ok(p) => p,
            // A dangling link: create its target.
            Err(_) => {
                let link = std::fs::read_link(out)?;
                match out.parent() {
                    Some(dir) if link.is_relative() => dir.join(link),
                    _ => link,
                }
            }
        }
    } else {
        out.to_path_buf()
    };
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(OutputTarget::File { path, mode: 0o644 })
        }
        Err(e) => return Err(e).with_context(|| format!("{}: cannot inspect", path.display())),
    };
    let kind = meta.file_type();
    if kind.is_char_device() || kind.is_fifo() || kind.is_socket() {
        return Ok(OutputTarget::Special(path));
    }
    if !kind.is_file() {
        bail!(
            "{}: is not a regular file (a directory or a block device); pass a file path to --out",
            out.display()
        );
    }
    if !force {
        bail!(
            "{}: already exists; pass --force to replace it",
            out.display()
        );
    }
    Ok(OutputTarget::File {
        path,
        mode: meta.permissions().mode() & 0o7777,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_targets_follow_links_and_spare_special_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new.jsonl");
        assert_eq!(
            output_target(&new, false).unwrap(),
            OutputTarget::File {
                path: new.clone(),
                mode: 0o644
            }
        );
        let file = dir.path().join("real.jsonl");
        std::fs::write(&file, "x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = output_target(&file, false).unwrap_err().to_string();
        assert!(err.contains("pass --force"), "{err}");
        let link = dir.path().join("link.jsonl");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(
            output_target(&link, true).unwrap(),
            OutputTarget::File {
                path: std::fs::canonicalize(&file).unwrap(),
                mode: 0o640
            }
        );
        assert_eq!(
            output_target(Path::new("/dev/null"), true).unwrap(),
            OutputTarget::Special(PathBuf::from("/dev/null"))
        );
        let err = output_target(dir.path(), true).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
