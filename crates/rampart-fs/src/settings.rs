//! The settings a run in an output folder was started with (`OUT/.rampart.settings`),
//! so that a long command started again in the folder of an interrupted run continues
//! it only with the same settings, and is refused with the differences named
//! otherwise.
//!
//! The file holds the command, whether the run finished, and one `name = value` line per
//! setting (values as the caller renders them, e.g. compact JSON). A finished run's
//! folder takes a new run with any settings; an unfinished one only the same.

use std::path::{Path, PathBuf};

use crate::{write_atomic, WriteError};

/// The settings file inside an output folder.
pub const SETTINGS_FILE: &str = ".rampart.settings";

/// Why a run may not start in a folder.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The folder holds an interrupted run started with other settings.
    #[error(
        "{} holds an interrupted `{command}` run with other settings ({differences}): run the same \
         command again to resume it (its settings are in {}), or choose another output folder",
        dir.display(),
        file.display()
    )]
    Other {
        /// The output folder.
        dir: PathBuf,
        /// The command of the interrupted run.
        command: String,
        /// The settings that differ, `name: was → now`.
        differences: String,
        /// The settings file.
        file: PathBuf,
    },
    /// The settings file exists but cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The settings file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The settings file cannot be written.
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// The settings of one run: its command and `(name, value)` pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSettings {
    command: String,
    values: Vec<(String, String)>,
}

const FINISHED: &str = "finished";
const RUNNING: &str = "running";

impl RunSettings {
    /// Settings of `command` (e.g. `rampart eval`); values must be single-line.
    pub fn new(command: impl Into<String>) -> Self {
        RunSettings {
            command: command.into(),
            values: Vec::new(),
        }
    }

    /// Adds a setting (line breaks in `value` are escaped).
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let value: String = value.into();
        self.values.push((
            name.into(),
            value.replace('\\', "\\\\").replace('\n', "\\n"),
        ));
        self.values.sort();
        self
    }

    /// These settings without the named ones (e.g. `--shard`, which changes where the
    /// work runs, never its numbers).
    pub fn without(mut self, names: &[&str]) -> Self {
        self.values.retain(|(n, _)| !names.contains(&n.as_str()));
        self
    }

    /// The `(name, value)` pairs, sorted by name.
    pub fn values(&self) -> &[(String, String)] {
        &self.values
    }

    fn render(&self, state: &str) -> String {
        let mut text = format!("{}\n{state}\n", self.command);
        for (name, value) in &self.values {
            text.push_str(&format!("{name} = {value}\n"));
        }
        text
    }

    /// Parses a settings file: the settings and whether that run finished.
    fn parse(text: &str) -> (RunSettings, bool) {
        let mut lines = text.lines();
        let command = lines.next().unwrap_or_default().to_string();
        let finished = lines.next() == Some(FINISHED);
        let values = lines
            .filter_map(|l| l.split_once(" = "))
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        (RunSettings { command, values }, finished)
    }

    /// The settings that differ from `other`'s, `name: was → now` (values cut at 60
    /// characters), comma-separated.
    fn differences(&self, was: &RunSettings) -> String {
        let short = |v: Option<&String>| -> String {
            match v {
                None => "unset".into(),
                Some(v) if v.chars().count() > 60 => {
                    format!("{}…", v.chars().take(60).collect::<String>())
                }
                Some(v) => v.clone(),
            }
        };
        fn get<'a>(s: &'a RunSettings, name: &str) -> Option<&'a String> {
            s.values.iter().find(|(n, _)| n == name).map(|(_, v)| v)
        }
        let mut names: Vec<&str> = Vec::new();
        for (n, _) in was.values.iter().chain(&self.values) {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
        let mut diffs: Vec<String> = Vec::new();
        if was.command != self.command {
            diffs.push(format!("command: {} → {}", was.command, self.command));
        }
        for n in names {
            let (a, b) = (get(was, n), get(self, n));
            if a != b {
                diffs.push(format!("{n}: {} → {}", short(a), short(b)));
            }
        }
        diffs.join(", ")
    }

    /// Starts a run with these settings in `dir` (created if needed): refused with
    /// [`SettingsError::Other`] when `dir` holds an unfinished run started with other
    /// settings; otherwise records these as the settings of a run in progress.
    pub fn begin(&self, dir: &Path) -> Result<(), SettingsError> {
        let path = dir.join(SETTINGS_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let (was, finished) = RunSettings::parse(&text);
                if !finished && was != *self {
                    return Err(SettingsError::Other {
                        dir: dir.to_path_buf(),
                        command: was.command.clone(),
                        differences: self.differences(&was),
                        file: path,
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(SettingsError::Read { path, source }),
        }
        write_atomic(&path, self.render(RUNNING).as_bytes())?;
        Ok(())
    }

    /// Whether `dir` holds a finished run of exactly these settings.
    pub fn finished_in(&self, dir: &Path) -> bool {
        std::fs::read_to_string(dir.join(SETTINGS_FILE))
            .map(|text| RunSettings::parse(&text) == (self.clone(), true))
            .unwrap_or(false)
    }
}

/// Marks the run in `dir` finished (a later run there may have any settings); a folder
/// without a settings file is left as it is.
pub fn finish_run(dir: &Path) -> Result<(), SettingsError> {
    let path = dir.join(SETTINGS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let (settings, _) = RunSettings::parse(&text);
            write_atomic(&path, settings.render(FINISHED).as_bytes())?;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SettingsError::Read { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unfinished_run_continues_only_with_its_settings() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("run");
        let a = RunSettings::new("rampart attack")
            .with("eps", "[0.03]")
            .with("seed", "0");
        a.begin(&out)?;
        // Killed: the same settings continue, others are refused by name.
        a.begin(&out)?;
        let b = RunSettings::new("rampart attack")
            .with("eps", "[0.06]")
            .with("seed", "0");
        let msg = match b.begin(&out) {
            Err(e @ SettingsError::Other { .. }) => e.to_string(),
            other => return Err(format!("expected a refusal, got {other:?}").into()),
        };
        assert!(msg.contains("eps: [0.03] → [0.06]"), "{msg}");
        assert!(!msg.contains("seed"), "{msg}");
        assert!(msg.contains("run the same command again"), "{msg}");
        let other_command = RunSettings::new("rampart eval").with("eps", "[0.03]");
        assert!(other_command.begin(&out).is_err());
        // Once finished, the folder takes any settings.
        assert!(!a.finished_in(&out));
        finish_run(&out)?;
        assert!(a.finished_in(&out) && !b.finished_in(&out));
        b.begin(&out)?;
        assert!(a.begin(&out).is_err());
        // The order settings are given in does not matter.
        let reordered = RunSettings::new("rampart attack")
            .with("seed", "0")
            .with("eps", "[0.06]");
        reordered.begin(&out)?;
        // Line breaks cannot forge settings.
        let forged = RunSettings::new("x").with("a", "1\nb = 2");
        forged.begin(&dir.path().join("forged"))?;
        let text = std::fs::read_to_string(dir.path().join("forged").join(SETTINGS_FILE))?;
        assert_eq!(RunSettings::parse(&text).0, forged);
        Ok(())
    }
}
