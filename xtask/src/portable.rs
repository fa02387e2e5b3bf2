//! A study's outputs name nothing outside its folder, so that the folder can move to
//! another machine (a GPU machine's outputs copied back, a study published) with every
//! recorded command still true there.
//!
//! - Every `rampart` run starts in the study folder DIR, as `rampart` (not the path of
//!   the binary), and names the files of the study relative to DIR.
//! - The data folder is reached through the link `DIR/data` (Unix), so that the runs
//!   name it `data`; elsewhere, or where the link cannot be made, they name it as given.
//! - The study's own command is recorded with `DIR` for its `--out`, `DATA` for its
//!   `--data-dir` and `BIN` for its `--rampart-bin`.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The name of the study folder's link to the data folder.
pub const DATA_LINK: &str = "data";

/// `arg` with a path inside `root` made relative to it (`.` for `root` itself), also
/// after a `NAME=` prefix (`--reference NAME=PATH`); anything else as it is.
pub fn relative_arg(arg: &OsStr, root: &Path) -> OsString {
    if let Some(rel) = relative(Path::new(arg), root) {
        return rel.into_os_string();
    }
    if let Some((name, path)) = arg.to_str().and_then(|a| a.split_once('=')) {
        if let Some(rel) = relative(Path::new(path), root) {
            return format!("{name}={}", rel.display()).into();
        }
    }
    arg.to_os_string()
}

fn relative(path: &Path, root: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let rel = path.strip_prefix(root).ok()?;
    Some(if rel.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        rel.to_path_buf()
    })
}

/// `command` run from `root`: the same program (called by its file name), arguments
/// inside `root` relative to it, the same environment.
pub fn in_folder(command: &Command, root: &Path) -> Command {
    let program = command.get_program();
    let mut moved = Command::new(program);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        if let Some(name) = Path::new(program).file_name() {
            moved.arg0(name);
        }
    }
    moved.args(command.get_args().map(|a| relative_arg(a, root)));
    for (key, value) in command.get_envs() {
        match value {
            Some(v) => moved.env(key, v),
            None => moved.env_remove(key),
        };
    }
    moved.current_dir(root);
    moved
}

/// The data folder as the study's runs name it: `out/data`, a link to `data` made (or
/// pointed there again) when `data` lies outside `out`; `data` itself when it lies
/// inside `out`, or where no link can be made (then with a warning).
pub fn data_folder(out: &Path, data: &Path) -> Result<PathBuf> {
    let data = std::path::absolute(data)
        .with_context(|| format!("cannot resolve the data folder {}", data.display()))?;
    if data.starts_with(out) {
        return Ok(data);
    }
    let link = out.join(DATA_LINK);
    match std::fs::symlink_metadata(&link) {
        Ok(meta) if meta.file_type().is_symlink() => std::fs::remove_file(&link)
            .with_context(|| format!("cannot replace the link {}", link.display()))?,
        Ok(_) => bail!(
            "{} exists and is not a link: the study links its data folder there (move it, or \
             name it with --data-dir)",
            link.display()
        ),
        Err(_) => {}
    }
    match make_link(&data, &link) {
        Ok(()) => Ok(link),
        Err(e) => {
            eprintln!(
                "warning: cannot link {} to {} ({e}); the runs name the data folder as given",
                link.display(),
                data.display()
            );
            Ok(data)
        }
    }
}

#[cfg(unix)]
fn make_link(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn make_link(_target: &Path, _link: &Path) -> std::io::Result<()> {
    Err(std::io::Error::other("links need a Unix system here"))
}

/// `cargo xtask ARGS` shell-quoted, with the value of `--out` written `DIR`, that of
/// `--data-dir` `DATA` and that of `--rampart-bin` `BIN` (as `--flag VALUE` or
/// `--flag=VALUE`).
pub fn study_command(args: &[String]) -> String {
    let mut words = Vec::with_capacity(args.len());
    let mut placeholder: Option<&str> = None;
    for arg in args {
        if let Some(p) = placeholder.take() {
            words.push(p.to_string());
            continue;
        }
        let named = |flag: &str| arg == flag || arg.starts_with(&format!("{flag}="));
        let p = if named("--out") {
            Some("DIR")
        } else if named("--data-dir") {
            Some("DATA")
        } else if named("--rampart-bin") {
            Some("BIN")
        } else {
            None
        };
        match (p, arg.split_once('=')) {
            (Some(p), Some((flag, _))) => words.push(format!("{flag}={p}")),
            (Some(p), None) => {
                words.push(arg.clone());
                placeholder = Some(p);
            }
            (None, _) => words.push(rampart_fs::shell_quote(arg)),
        }
    }
    format!("cargo xtask {}", words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_inside_the_folder_become_relative() {
        let root = Path::new("/runs/study");
        let rel = |a: &str| relative_arg(OsStr::new(a), root);
        assert_eq!(
            rel("/runs/study/at/model.safetensors"),
            "at/model.safetensors"
        );
        assert_eq!(rel("/runs/study"), ".");
        assert_eq!(
            rel("at (lambda 1)=/runs/study/at/eval/results.json"),
            "at (lambda 1)=at/eval/results.json"
        );
        // Outside the folder, relative already, or not a path: unchanged.
        for same in [
            "/runs/other/x",
            "/runs/study2/x",
            "at/eval",
            "--suite",
            "8/255",
        ] {
            assert_eq!(rel(same), same);
        }
    }

    #[test]
    fn a_command_moves_into_the_folder_with_its_environment() {
        let root = Path::new("/runs/study");
        let mut cmd = Command::new("/build/target/release/rampart");
        cmd.args(["eval", "--out", "/runs/study/at/eval"])
            .env("RUST_LOG", "warn")
            .env_remove("RAMPART_DATA_DIR");
        let moved = in_folder(&cmd, root);
        assert_eq!(moved.get_program(), "/build/target/release/rampart");
        let args: Vec<&OsStr> = moved.get_args().collect();
        assert_eq!(args, ["eval", "--out", "at/eval"]);
        assert_eq!(moved.get_current_dir(), Some(root));
        let envs: Vec<(&OsStr, Option<&OsStr>)> = moved.get_envs().collect();
        assert!(envs.contains(&(OsStr::new("RUST_LOG"), Some(OsStr::new("warn")))));
        assert!(envs.contains(&(OsStr::new("RAMPART_DATA_DIR"), None)));
    }

    #[test]
    fn the_study_command_names_its_folders_by_placeholders() {
        let args: Vec<String> = [
            "reproduce",
            "cifar10",
            "--data-dir",
            "/home/me/data",
            "--out=/scratch/run 1",
            "--rows",
            "at,normal",
            "--rampart-bin",
            "/build/rampart",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            study_command(&args),
            "cargo xtask reproduce cifar10 --data-dir DATA --out=DIR --rows at,normal --rampart-bin BIN"
        );
    }

    #[cfg(unix)]
    #[test]
    fn the_data_folder_is_linked_into_the_study() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (out, data, other) = (
            dir.path().join("out"),
            dir.path().join("data-a"),
            dir.path().join("data-b"),
        );
        for d in [&out, &data, &other] {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(data.join("marker"), "a")?;
        std::fs::write(other.join("marker"), "b")?;
        let link = data_folder(&out, &data)?;
        assert_eq!(link, out.join(DATA_LINK));
        assert_eq!(std::fs::read_to_string(link.join("marker"))?, "a");
        // Continued with another data folder: the link points there now.
        data_folder(&out, &other)?;
        assert_eq!(std::fs::read_to_string(link.join("marker"))?, "b");
        // A data folder inside the study is named as it is.
        let inside = out.join("mine");
        std::fs::create_dir_all(&inside)?;
        assert_eq!(data_folder(&out, &inside)?, inside);
        // Something else at DIR/data is refused, not replaced.
        std::fs::remove_file(&link)?;
        std::fs::create_dir_all(&link)?;
        let err = data_folder(&out, &data).unwrap_err().to_string();
        assert!(err.contains("is not a link"), "{err}");
        Ok(())
    }
}
