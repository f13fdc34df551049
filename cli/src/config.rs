//! `config.toml`: every `shoal node` flag as a setting, so a machine's
//! node runs with a bare `shoal node` (or from systemd). Flags win over
//! `SHOAL_*` environment variables, which win over the file, which wins
//! over the defaults: each setting becomes the variable its flag reads,
//! unless that variable is set already.
//!
//! ```toml
//! # ~/.config/shoal/config.toml
//! model = "smollm2:135m"
//! max-memory = "6G"
//! peer = ["/ip4/192.168.1.20/tcp/7400"]
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context};

/// The settings a file may hold: `shoal node`'s flags (without dashes),
/// read through the `SHOAL_*` variables of the same names.
const SETTINGS: &[&str] = &[
    "model",
    "alias",
    "from-peers",
    "cluster",
    "cluster-key-file",
    "peer",
    "listen",
    "http",
    "data",
    "data-advertise",
    "threads",
    "max-memory",
    "ctx",
    "no-mdns",
    "plan-for",
    "activations",
    "api-key-file",
    "open-api",
    "allow-host",
    "cors-origin",
    "max-running",
    "max-queued",
    "name",
    "upstream",
    "upstream-key-file",
    "spill",
    "spill-model",
    "private-api-key-file",
    "speculate",
];

/// shoal's configuration folder: `$XDG_CONFIG_HOME/shoal` (else
/// `~/.config/shoal`) on Linux, `~/Library/Application Support/shoal` on
/// macOS, `%APPDATA%\shoal` on Windows.
pub fn dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
    };
    let home = || var("HOME").unwrap_or_else(|| PathBuf::from("."));
    if cfg!(target_os = "macos") {
        return home().join("Library/Application Support/shoal");
    }
    if cfg!(windows) {
        return var("APPDATA").unwrap_or_else(home).join("shoal");
    }
    var("XDG_CONFIG_HOME")
        .unwrap_or_else(|| home().join(".config"))
        .join("shoal")
}

/// The file: `$SHOAL_CONFIG`, else `config.toml` in [`dir`].
pub fn path() -> PathBuf {
    std::env::var_os("SHOAL_CONFIG")
        .filter(|p| !p.is_empty())
        .map_or_else(|| dir().join("config.toml"), PathBuf::from)
}

/// The variable a setting sets (`max-memory` → `SHOAL_MAX_MEMORY`).
fn variable(setting: &str) -> String {
    format!("SHOAL_{}", setting.replace('-', "_").to_uppercase())
}

/// Reads the file (if there is one) into the environment; its path when
/// it was read. An unknown setting or a value of the wrong shape is an
/// error naming the file, the setting and the known ones.
pub fn apply() -> anyhow::Result<Option<PathBuf>> {
    let path = path();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    for (key, value) in &table {
        let setting = key.replace('_', "-");
        if !SETTINGS.contains(&setting.as_str()) {
            bail!(
                "unknown setting '{key}' in {}: the settings are `shoal node`'s flags: {}",
                path.display(),
                SETTINGS.join(", ")
            );
        }
        let text = |v: &toml::Value| -> Option<String> {
            match v {
                toml::Value::String(s) => Some(s.clone()),
                toml::Value::Integer(i) => Some(i.to_string()),
                toml::Value::Float(f) => Some(f.to_string()),
                toml::Value::Boolean(b) => Some(b.to_string()),
                _ => None,
            }
        };
        let value = match value {
            toml::Value::Array(items) => items
                .iter()
                .map(text)
                .collect::<Option<Vec<_>>>()
                .map(|v| v.join(",")),
            v => text(v),
        }
        .with_context(|| {
            format!(
                "setting '{key}' in {}: a string, number, boolean or list of them",
                path.display()
            )
        })?;
        let var = variable(&setting);
        if std::env::var_os(&var).is_none() {
            std::env::set_var(var, value);
        }
    }
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `shoal node` flag can be set in the file (and only those).
    #[test]
    fn every_node_flag_is_a_setting() {
        use clap::Args;
        let cmd = crate::node::NodeArgs::augment_args(clap::Command::new("node"));
        let mut flags: Vec<String> = cmd
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long().map(str::to_string))
            .collect();
        flags.sort();
        let mut settings: Vec<String> = SETTINGS.iter().map(|s| s.to_string()).collect();
        settings.sort();
        assert_eq!(flags, settings);
    }

    #[test]
    fn settings_map_to_the_flags_variables() {
        assert_eq!(variable("max-memory"), "SHOAL_MAX_MEMORY");
        assert_eq!(variable("allow-host"), "SHOAL_ALLOW_HOST");
    }
}
