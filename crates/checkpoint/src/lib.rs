//! qatflow-checkpoint: the on-disk format of training checkpoints, shared by the trainer
//! (which writes them) and the exporter (which reads them).
//!
//! A checkpoint is a directory `RUN_DIR/checkpoints/step-{step:08}/` holding
//! `model.safetensors` (every parameter under its Hugging Face name), `quantizers.safetensors`
//! (per quantized linear `M`: F32 scalars `M.weight_quantizer._amax` and
//! `M.input_quantizer._amax`, group rule applied; the names are `qatflow_nvfp4::keys`),
//! the base model's `config.json`,
//! `generation_config.json` and tokenizer files (so the directory loads as a Hugging Face
//! model), trainer-private files, and `manifest.json` (written last) with the size and sha256
//! of every other file.
//!
//! A [`CheckpointWriter`] writes into `checkpoints/.tmp-step-{step:08}-{pid}` and
//! [`CheckpointWriter::commit`] fsyncs every file, writes the manifest, renames the directory
//! into place and fsyncs `checkpoints/`: a checkpoint directory either verifies or does not
//! exist. Committed checkpoints are also recorded in the run's sled index
//! (`RUN_DIR/manifest.sled`, [`manifest`]), but files are the truth: readers
//! use [`verify`] / [`latest_valid`], which check every byte against the manifest.

pub mod manifest;
pub mod st;

use std::borrow::Cow;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::manifest::{CheckpointManifest, CheckpointRecord};
use qatflow_store::StoreError;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use manifest::FileEntry;

/// Value of the manifest's `format` field.
pub const FORMAT: &str = "qatflow-checkpoint";
/// Version of the checkpoint format this build writes and reads.
pub const VERSION: u32 = 1;
/// The manifest's file name inside a checkpoint directory.
pub const MANIFEST: &str = "manifest.json";
/// The parameters' file.
pub const MODEL_FILE: &str = "model.safetensors";
/// The quantizer state's file (tensor names: `qatflow_nvfp4::keys::{WEIGHT_AMAX, INPUT_AMAX}`).
pub const QUANTIZERS_FILE: &str = "quantizers.safetensors";
/// Tokenizer and chat template files copied from a base model, when present.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Errors of writing, verifying and managing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The directory has no `manifest.json`: the checkpoint was never committed.
    #[error("{dir}: no manifest.json, so this checkpoint was never completed; use an older checkpoint (`--checkpoint latest-valid`)")]
    NoManifest {
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// `manifest.json` does not parse or has the wrong format or version.
    #[error("{path}: {problem}")]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A file recorded in the manifest is missing.
    #[error(
        "{path}: missing (listed in manifest.json); the checkpoint is incomplete, use an older one"
    )]
    MissingFile {
        /// The missing file.
        path: PathBuf,
    },
    /// A file's size differs from the manifest's.
    #[error("{path}: {actual} bytes, manifest.json says {expected}; the file is truncated or was changed, use an older checkpoint")]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Size recorded in the manifest.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A file's sha256 differs from the manifest's.
    #[error("{path}: sha256 {actual} differs from manifest.json's {expected}; the file is corrupt, use an older checkpoint")]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
        /// Digest recorded in the manifest.
        expected: String,
        /// Digest of the file on disk.
        actual: String,
    },
    /// A `.safetensors` file does not parse, or its data length disagrees with its header.
    #[error("{path}: not a complete safetensors file ({message}); use an older checkpoint")]
    BadSafetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file name would leave the checkpoint directory or clash with the manifest.
    #[error(
        "invalid checkpoint file name {name:?}: use a plain file name other than manifest.json"
    )]
    InvalidFileName {
        /// The name.
        name: String,
    },
    /// A file was written twice into the same checkpoint.
    #[error("{name} was already written into this checkpoint")]
    DuplicateFile {
        /// The name.
        name: String,
    },
    /// A committed checkpoint of this step already exists.
    #[error("{dir} already exists; a step is checkpointed once (delete it first to redo it)")]
    Exists {
        /// The existing directory.
        dir: PathBuf,
    },
    /// Planning or writing a safetensors file failed.
    #[error(transparent)]
    Safetensors(#[from] st::StError),
    /// JSON could not be serialized.
    #[error("{file}: cannot serialize JSON: {source}")]
    Json {
        /// The file.
        file: String,
        /// The serializer's error.
        source: serde_json::Error,
    },
    /// The sled index failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One tensor to write: name, dtype, shape and little-endian bytes.
#[derive(Debug, Clone)]
pub struct TensorEntry<'a> {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (`[]` for a scalar).
    pub shape: Vec<usize>,
    /// The data, little-endian, row-major.
    pub data: Cow<'a, [u8]>,
}

impl<'a> TensorEntry<'a> {
    /// An F32 scalar (shape `[]`), as quantizer amaxes are stored.
    pub fn scalar_f32(name: impl Into<String>, value: f32) -> TensorEntry<'static> {
        TensorEntry {
            name: name.into(),
            dtype: Dtype::F32,
            shape: vec![],
            data: Cow::Owned(value.to_le_bytes().to_vec()),
        }
    }
}

/// A committed, verified checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// Optimizer step.
    pub step: u64,
    /// The checkpoint directory (`RUN_DIR/checkpoints/step-{step:08}`).
    pub dir: PathBuf,
    /// Hash of the training configuration that produced it.
    pub config_hash: String,
    /// Seconds since the Unix epoch at commit.
    pub created_unix: u64,
    /// Every file but `manifest.json`, with size and sha256.
    pub files: Vec<FileEntry>,
}

/// A checkpoint that [`latest_valid`] passed over, and why.
#[derive(Debug)]
pub struct Skipped {
    /// Its directory.
    pub dir: PathBuf,
    /// What is wrong with it.
    pub reason: CheckpointError,
}

/// `manifest.json` of a checkpoint directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Format version ([`VERSION`]).
    pub version: u32,
    /// Optimizer step.
    pub step: u64,
    /// Hash of the training configuration.
    pub config_hash: String,
    /// Seconds since the Unix epoch at commit.
    pub created_unix: u64,
    /// Every other file of the directory.
    pub files: Vec<FileEntry>,
}

/// `RUN_DIR/checkpoints`.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// `RUN_DIR/manifest.sled`, the run's checkpoint index.
pub fn index_path(run_dir: &Path) -> PathBuf {
    run_dir.join("manifest.sled")
}

/// Directory name of the checkpoint of `step`: `step-{step:08}`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a directory named `step-N`, if it is one.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// fsyncs a directory, so that renames and creations inside it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

/// Whether process `pid` is alive (on this machine).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for the process's existence and our permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The pid at the end of a temporary directory name `PREFIX-{pid}`.
fn temp_dir_pid(name: &str) -> Option<u32> {
    name.rsplit_once('-')?.1.parse().ok()
}

/// Removes the entries of `parent` whose name starts with `prefix` and ends in `-{pid}` of a
/// process that is no longer alive; returns what was removed.
pub fn remove_stale_temp_dirs(parent: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io(parent)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(parent))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) {
            continue;
        }
        if temp_dir_pid(&name).is_some_and(pid_alive) {
            continue;
        }
        let path = entry.path();
        std::fs::remove_dir_all(&path).map_err(io(&path))?;
        removed.push(path);
    }
    Ok(removed)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// sha256 (hex) and size of a file, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    Ok(sha256_file_until(path, &|| false)?.expect("never stopped"))
}

/// [`sha256_file`] that gives up (returning `None`) when `stop()` becomes true; it is asked
/// once per MiB.
pub fn sha256_file_until(path: &Path, stop: &dyn Fn() -> bool) -> Result<Option<(String, u64)>> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        if stop() {
            return Ok(None);
        }
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Some((hex::encode(hasher.finalize()), size)))
}

/// Writes a checkpoint directory; see the crate docs.
#[derive(Debug)]
pub struct CheckpointWriter {
    run_dir: PathBuf,
    step: u64,
    tmp: PathBuf,
    files: Vec<String>,
}

impl CheckpointWriter {
    /// Starts `RUN_DIR/checkpoints/.tmp-step-{step:08}-{pid}`, first removing the `.tmp-*`
    /// directories of writers that are no longer alive. Fails if `step` is already committed.
    pub fn create(run_dir: &Path, step: u64) -> Result<Self> {
        let parent = checkpoints_dir(run_dir);
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        remove_stale_temp_dirs(&parent, ".tmp-")?;
        let final_dir = parent.join(step_dir_name(step));
        if final_dir.exists() {
            return Err(CheckpointError::Exists { dir: final_dir });
        }
        let tmp = parent.join(format!(
            ".tmp-{}-{}",
            step_dir_name(step),
            std::process::id()
        ));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        Ok(Self {
            run_dir: run_dir.to_path_buf(),
            step,
            tmp,
            files: Vec::new(),
        })
    }

    /// The temporary directory being written.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// The step being checkpointed.
    pub fn step(&self) -> u64 {
        self.step
    }

    fn claim(&mut self, file: &str) -> Result<PathBuf> {
        let plain = !file.is_empty()
            && file != MANIFEST
            && file != "."
            && file != ".."
            && !file.contains('/')
            && !file.contains('\\');
        if !plain {
            return Err(CheckpointError::InvalidFileName {
                name: file.to_owned(),
            });
        }
        if self.files.iter().any(|f| f == file) {
            return Err(CheckpointError::DuplicateFile {
                name: file.to_owned(),
            });
        }
        self.files.push(file.to_owned());
        Ok(self.tmp.join(file))
    }

    /// Writes a safetensors file (header `__metadata__` `{"format": "pt"}`) from in-memory
    /// tensors.
    pub fn write_safetensors(&mut self, file: &str, tensors: &[TensorEntry<'_>]) -> Result<()> {
        let specs = tensors
            .iter()
            .map(|t| st::TensorSpec {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            })
            .collect();
        let w = self.create_safetensors(file, specs)?;
        for t in tensors {
            w.write_tensor(&t.name, &t.data)?;
        }
        w.finish()?;
        Ok(())
    }

    /// Starts a safetensors file (header `__metadata__` `{"format": "pt"}`) whose tensors are
    /// written one by one (or in chunks) through the returned writer, for tensors too large
    /// to hold all at once; call [`st::StreamWriter::finish`] before [`Self::commit`].
    pub fn create_safetensors(
        &mut self,
        file: &str,
        specs: Vec<st::TensorSpec>,
    ) -> Result<st::StreamWriter> {
        let path = self.claim(file)?;
        let meta = [("format".to_string(), "pt".to_string())].into();
        Ok(st::StreamWriter::create(
            &path,
            st::Layout::new(specs, Some(&meta))?,
        )?)
    }

    /// Writes `value` as pretty-printed JSON.
    pub fn write_json<T: Serialize>(&mut self, file: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(value).map_err(|source| CheckpointError::Json {
            file: file.to_owned(),
            source,
        })?;
        self.write_bytes(file, &bytes)
    }

    /// Writes raw bytes.
    pub fn write_bytes(&mut self, file: &str, bytes: &[u8]) -> Result<()> {
        let path = self.claim(file)?;
        write_synced(&path, bytes)
    }

    /// Copies `src` into the checkpoint as `file`.
    pub fn copy_file(&mut self, src: &Path, file: &str) -> Result<()> {
        let path = self.claim(file)?;
        std::fs::copy(src, &path).map_err(io(src))?;
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io(&path))
    }

    /// Copies `config.json`, `generation_config.json` and the [`TOKENIZER_FILES`] that exist
    /// in the base model directory `base` (config.json is required).
    pub fn copy_model_files(&mut self, base: &Path) -> Result<()> {
        self.copy_file(&base.join("config.json"), "config.json")?;
        for name in std::iter::once(&"generation_config.json").chain(TOKENIZER_FILES) {
            let src = base.join(name);
            if src.is_file() {
                self.copy_file(&src, name)?;
            }
        }
        Ok(())
    }

    /// fsyncs every file, writes `manifest.json` (size and sha256 of each file), fsyncs,
    /// renames the directory to `step-{step:08}`, fsyncs `checkpoints/`, then records the
    /// checkpoint in the run's sled index (flushed). Opens the index for the call; use
    /// [`CheckpointWriter::commit_with`] when the caller keeps it open.
    pub fn commit(self, config_hash: &str) -> Result<CheckpointInfo> {
        let index = CheckpointManifest::open(index_path(&self.run_dir))?;
        self.commit_with(config_hash, &index)
    }

    /// [`CheckpointWriter::commit`] with an index the caller holds open.
    pub fn commit_with(
        self,
        config_hash: &str,
        index: &CheckpointManifest,
    ) -> Result<CheckpointInfo> {
        let mut files = Vec::with_capacity(self.files.len());
        for name in &self.files {
            let path = self.tmp.join(name);
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io(&path))?;
            let (sha256, size) = sha256_file(&path)?;
            files.push(FileEntry {
                name: name.clone(),
                size,
                sha256,
            });
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            step: self.step,
            config_hash: config_hash.to_owned(),
            created_unix: now_unix(),
            files,
        };
        let bytes = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        write_synced(&self.tmp.join(MANIFEST), &bytes)?;
        fsync_dir(&self.tmp)?;
        let parent = checkpoints_dir(&self.run_dir);
        let final_dir = parent.join(step_dir_name(self.step));
        if final_dir.exists() {
            return Err(CheckpointError::Exists { dir: final_dir });
        }
        std::fs::rename(&self.tmp, &final_dir).map_err(io(&final_dir))?;
        fsync_dir(&parent)?;
        let info = CheckpointInfo {
            step: self.step,
            dir: final_dir,
            config_hash: manifest.config_hash,
            created_unix: manifest.created_unix,
            files: manifest.files,
        };
        index.record(&record_of(&info))?;
        Ok(info)
    }
}

fn record_of(info: &CheckpointInfo) -> CheckpointRecord {
    CheckpointRecord {
        step: info.step,
        dir: info.dir.clone(),
        config_hash: info.config_hash.clone(),
        created_unix: info.created_unix,
        files: info.files.clone(),
    }
}

/// Writes `bytes` to `path` and fsyncs the file.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Parses a checkpoint directory's `manifest.json` without checking the files.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::NoManifest {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let bad = |problem: String| CheckpointError::BadManifest {
        path: path.clone(),
        problem,
    };
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| bad(format!("not a checkpoint manifest: {e}")))?;
    if m.format != FORMAT {
        return Err(bad(format!("format {:?}, expected {FORMAT:?}", m.format)));
    }
    if m.version > VERSION {
        return Err(bad(format!(
            "format version {} is newer than this qatflow understands ({VERSION}); upgrade qatflow",
            m.version
        )));
    }
    Ok(m)
}

/// Checks that a `.safetensors` file's header parses and its data length matches it.
pub fn check_safetensors(path: &Path) -> Result<()> {
    let file = File::open(path).map_err(io(path))?;
    // SAFETY: read-only map of a file this process does not modify.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io(path))?;
    SafeTensors::read_metadata(&mmap).map_err(|e| CheckpointError::BadSafetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(())
}

/// Verifies a checkpoint directory: the manifest parses, every file exists with the recorded
/// size and sha256, and every `.safetensors` header parses and matches its data length.
/// Errors name the file and what is wrong.
pub fn verify(dir: &Path) -> Result<CheckpointInfo> {
    let m = read_manifest(dir)?;
    for f in &m.files {
        let path = dir.join(&f.name);
        check_size(&path, f.size)?;
        check_sha256(&path, &f.sha256, &|| false)?;
        if f.name.ends_with(".safetensors") {
            check_safetensors(&path)?;
        }
    }
    Ok(info_of(dir, m))
}

/// The fast half of [`verify`]: the manifest, every file's size and every safetensors
/// header, without reading the data. Complete the verification with [`verify_checksums`]
/// before relying on the contents (the exporter runs both at once).
pub fn verify_structure(dir: &Path) -> Result<CheckpointInfo> {
    let m = read_manifest(dir)?;
    for f in &m.files {
        let path = dir.join(&f.name);
        check_size(&path, f.size)?;
        if f.name.ends_with(".safetensors") {
            check_safetensors(&path)?;
        }
    }
    Ok(info_of(dir, m))
}

/// The slow half of [`verify`]: every file's sha256 against the manifest. Returns
/// `Ok(false)` without finishing when `stop()` becomes true (it is asked once per MiB read).
pub fn verify_checksums(info: &CheckpointInfo, stop: &dyn Fn() -> bool) -> Result<bool> {
    for f in &info.files {
        if !check_sha256(&info.dir.join(&f.name), &f.sha256, stop)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn info_of(dir: &Path, m: Manifest) -> CheckpointInfo {
    CheckpointInfo {
        step: m.step,
        dir: dir.to_path_buf(),
        config_hash: m.config_hash,
        created_unix: m.created_unix,
        files: m.files,
    }
}

fn check_size(path: &Path, expected: u64) -> Result<()> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::MissingFile {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io(path)(e)),
    };
    if meta.len() != expected {
        return Err(CheckpointError::SizeMismatch {
            path: path.to_path_buf(),
            expected,
            actual: meta.len(),
        });
    }
    Ok(())
}

/// Compares a file's sha256 with `expected`; `Ok(false)` if `stop()` interrupted it.
fn check_sha256(path: &Path, expected: &str, stop: &dyn Fn() -> bool) -> Result<bool> {
    let Some((sha, _)) = sha256_file_until(path, stop)? else {
        return Ok(false);
    };
    if sha != expected {
        return Err(CheckpointError::ChecksumMismatch {
            path: path.to_path_buf(),
            expected: expected.to_owned(),
            actual: sha,
        });
    }
    Ok(true)
}

/// All `step-*` directories of a run, newest (highest step) first.
pub fn list(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let parent = checkpoints_dir(run_dir);
    let entries = match std::fs::read_dir(&parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&parent)(e)),
    };
    let mut steps = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(&parent))?;
        if let Some(step) = parse_step_dir(&entry.file_name().to_string_lossy()) {
            if entry.path().is_dir() {
                steps.push((step, entry.path()));
            }
        }
    }
    steps.sort_by_key(|s| std::cmp::Reverse(s.0));
    Ok(steps.into_iter().map(|(_, p)| p).collect())
}

/// The newest checkpoint that verifies, plus the newer ones that did not (with the reason) so
/// callers can warn; `None` when no checkpoint verifies.
pub fn latest_valid(run_dir: &Path) -> Result<Option<(CheckpointInfo, Vec<Skipped>)>> {
    let mut skipped = Vec::new();
    for dir in list(run_dir)? {
        match verify(&dir) {
            Ok(info) => return Ok(Some((info, skipped))),
            Err(reason) => skipped.push(Skipped { dir, reason }),
        }
    }
    Ok(None)
}

/// Deletes every checkpoint older than the newest valid one except the newest `keep` valid
/// ones (the newest valid checkpoint is always kept, even with `keep = 0`); invalid
/// checkpoints newer than it are left for inspection. Removes them from the sled index too.
/// Returns the deleted directories.
pub fn prune(run_dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let keep = keep.max(1);
    let parent = checkpoints_dir(run_dir);
    let mut valid_seen = 0usize;
    let mut doomed = Vec::new();
    for dir in list(run_dir)? {
        let ok = verify(&dir).is_ok();
        if valid_seen == 0 && !ok {
            continue;
        }
        if ok && valid_seen < keep {
            valid_seen += 1;
            continue;
        }
        doomed.push(dir);
    }
    if doomed.is_empty() {
        return Ok(doomed);
    }
    let index = CheckpointManifest::open(index_path(run_dir))?;
    let pid = std::process::id();
    for dir in &doomed {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        let step = name.as_deref().and_then(parse_step_dir);
        // Rename first, so a crash mid-delete leaves a stale temp dir, not a broken step dir.
        let trash = parent.join(format!(
            ".tmp-prune-{}-{pid}",
            name.as_deref().unwrap_or("x")
        ));
        std::fs::rename(dir, &trash).map_err(io(dir))?;
        fsync_dir(&parent)?;
        std::fs::remove_dir_all(&trash).map_err(io(&trash))?;
        if let Some(step) = step {
            index.remove(step)?;
        }
    }
    Ok(doomed)
}
