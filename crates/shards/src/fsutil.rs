//! Durable file writes: write → fsync → rename → fsync of the directory.

use crate::ShardError;
use std::fs::File;
use std::io::Write;
use std::path::Path;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ShardError + '_ {
    move |source| ShardError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Fsyncs a directory so that renames into it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), ShardError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// Writes `bytes` to `path` so that after a crash the file is either absent or complete.
pub(crate) fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), ShardError> {
    let dir = path.parent().expect("file paths have a parent");
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    tmp.write_all(bytes).map_err(io_err(path))?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| ShardError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    sync_dir(dir)
}

/// Moves a finished file into place durably.
pub(crate) fn rename_durable(from: &Path, to: &Path) -> Result<(), ShardError> {
    File::open(from)
        .and_then(|f| f.sync_all())
        .map_err(io_err(from))?;
    std::fs::rename(from, to).map_err(io_err(to))?;
    sync_dir(to.parent().expect("file paths have a parent"))
}
