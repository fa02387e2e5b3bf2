//! The per-user data folder: where data sets go when no folder is named.

use std::ffi::OsString;
use std::path::PathBuf;

/// The per-user folder for data sets, `rampart/data` inside the platform's cache
/// folder: `$XDG_CACHE_HOME/rampart/data`, else `$HOME/.cache/rampart/data` (Linux and
/// other Unix systems), `$HOME/Library/Caches/rampart/data` (macOS),
/// `%LOCALAPPDATA%\rampart\data` (Windows). `None` when the variables it is built from
/// are unset (or relative). The folder need not exist.
pub fn user_data_dir() -> Option<PathBuf> {
    user_data_dir_from(|name| std::env::var_os(name))
}

/// [`user_data_dir`] with the environment read through `var`.
pub fn user_data_dir_from(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let absolute = |name: &str| var(name).map(PathBuf::from).filter(|p| p.is_absolute());
    let cache = if cfg!(windows) {
        absolute("LOCALAPPDATA")?
    } else if cfg!(target_os = "macos") {
        absolute("HOME")?.join("Library").join("Caches")
    } else {
        absolute("XDG_CACHE_HOME").or_else(|| absolute("HOME").map(|h| h.join(".cache")))?
    };
    Some(cache.join("rampart").join("data"))
}

#[cfg(all(test, unix, not(target_os = "macos")))]
mod tests {
    use super::*;

    #[test]
    fn xdg_cache_home_then_home() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        assert_eq!(
            user_data_dir_from(env(&[("XDG_CACHE_HOME", "/c"), ("HOME", "/h")])),
            Some(PathBuf::from("/c/rampart/data"))
        );
        assert_eq!(
            user_data_dir_from(env(&[("HOME", "/h")])),
            Some(PathBuf::from("/h/.cache/rampart/data"))
        );
        // A relative XDG_CACHE_HOME is ignored, as the XDG specification asks.
        assert_eq!(
            user_data_dir_from(env(&[("XDG_CACHE_HOME", "c"), ("HOME", "/h")])),
            Some(PathBuf::from("/h/.cache/rampart/data"))
        );
        assert_eq!(user_data_dir_from(env(&[])), None);
    }
}
