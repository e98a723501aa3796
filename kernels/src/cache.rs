//! CubeCL's compiled-kernel (PTX) cache, on by default in a user cache directory, so a
//! second run's first training step loads its kernels instead of compiling them again.
//!
//! CubeCL reads its configuration once, from a `cubecl.toml` (or the `[cubecl]` section of a
//! `burn.toml`) found by walking up from the working directory, and keeps the cache off
//! unless that file turns it on. [`enable_compilation_cache`] loads the same configuration
//! and, when it names no cache, adds one at [`default_cache_dir`]; a file that configures
//! the cache itself wins. It must run before the first GPU kernel is compiled.

use std::path::PathBuf;

use cubecl::config::cache::CacheConfig;
use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};

/// Environment variable naming the cache directory; `off` keeps the cache off.
pub const CACHE_ENV: &str = "QATFLOW_KERNEL_CACHE";

/// Where the cache goes without [`CACHE_ENV`]: `$XDG_CACHE_HOME/qatflow/cubecl`, else
/// `$HOME/.cache/qatflow/cubecl`; `None` when neither variable is set.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("qatflow").join("cubecl"))
}

/// What [`enable_compilation_cache`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheSetting {
    /// The cache is on in this directory.
    On(PathBuf),
    /// A `cubecl.toml`/`burn.toml` configures the cache: left as it says.
    FromConfigFile,
    /// Off: `QATFLOW_KERNEL_CACHE=off`, or no directory could be found.
    Off,
    /// CubeCL's configuration was already read: too late to change it.
    AlreadyConfigured,
}

/// The cache directory to use: [`CACHE_ENV`] when set (`None` for `off`), else
/// [`default_cache_dir`].
fn chosen_dir(env: Option<String>) -> Option<PathBuf> {
    match env {
        Some(v) if v == "off" => None,
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => default_cache_dir(),
    }
}

/// Turns CubeCL's compilation cache on (see the module docs). Call once, early.
pub fn enable_compilation_cache() -> CacheSetting {
    if CubeClRuntimeConfig::storage().lock().is_some() {
        return CacheSetting::AlreadyConfigured;
    }
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    let setting = if config.compilation.cache.is_some() {
        CacheSetting::FromConfigFile
    } else if let Some(dir) = chosen_dir(std::env::var(CACHE_ENV).ok()) {
        config.compilation.cache = Some(CacheConfig::File(dir.clone()));
        CacheSetting::On(dir)
    } else {
        return CacheSetting::Off;
    };
    // Another thread may have read the configuration since the check above; then it stays
    // as read rather than panicking in `RuntimeConfig::set`.
    let mut slot = CubeClRuntimeConfig::storage().lock();
    if slot.is_some() {
        return CacheSetting::AlreadyConfigured;
    }
    *slot = Some(std::sync::Arc::new(config));
    setting
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_the_directory_or_turns_it_off() {
        assert_eq!(chosen_dir(Some("off".into())), None);
        assert_eq!(
            chosen_dir(Some("/tmp/k".into())),
            Some(PathBuf::from("/tmp/k"))
        );
        assert_eq!(chosen_dir(Some(String::new())), default_cache_dir());
        assert_eq!(chosen_dir(None), default_cache_dir());
        if let Some(d) = default_cache_dir() {
            assert!(d.ends_with("qatflow/cubecl"), "{}", d.display());
        }
    }
}
