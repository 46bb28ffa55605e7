//! The JSON config file (`--config FILE`): between the environment and the defaults, refused when
//! group or others may read it.

use super::*;

/// Reads the JSON config file into (option id, value) pairs, option ids with underscores.
pub(super) fn read_config_file(
    path: &std::path::Path,
) -> Result<HashMap<String, String>, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let metadata = std::fs::metadata(path)
        .map_err(|e| ConfigError(format!("cannot read config file {shown}: {e}")))?;
    let mode = metadata.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(ConfigError(format!(
            "config file {shown} has mode {:o}, which lets group or others read it; it may hold secrets: run `chmod 600 {shown}`",
            mode & 0o777
        )));
    }
    // A FIFO or a device would block or never end: only a plain file of sensible size is read.
    if !metadata.is_file() {
        return Err(ConfigError(format!(
            "config file {shown} is not a regular file"
        )));
    }
    if metadata.len() > CONFIG_FILE_BYTES_MAX {
        return Err(ConfigError(format!(
            "config file {shown} is larger than {CONFIG_FILE_BYTES_MAX} bytes"
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {shown}: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ConfigError(format!("config file {shown} is not valid JSON: {e}")))?;
    let object = json
        .as_object()
        .ok_or_else(|| ConfigError(format!("config file {shown} must hold a JSON object")))?;
    let command = ServeArgs::augment_args(clap::Command::new("serve"));
    let mut values = HashMap::new();
    for (key, value) in object {
        let id = key.replace('-', "_");
        let known = command
            .get_arguments()
            .any(|a| a.get_id().as_str() == id && id != "config");
        if !known {
            return Err(ConfigError(format!(
                "config file {shown}: unknown key {key:?} (keys are serve's option names, e.g. \"data-dir\")"
            )));
        }
        let text = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            other => {
                // The value is not shown: it may be a secret (a URL with a password, a token).
                let kind = match other {
                    serde_json::Value::Null => "null",
                    serde_json::Value::Array(_) => "an array",
                    _ => "an object",
                };
                return Err(ConfigError(format!(
                    "config file {shown}: {key} must be a string, a number or a boolean, not {kind} (the value given is not shown)"
                )));
            }
        };
        if values.insert(id, text).is_some() {
            return Err(ConfigError(format!(
                "config file {shown}: {key:?} names an option another key already set (\"hold-ttl\" and \"hold_ttl\" are one option)"
            )));
        }
    }
    Ok(values)
}

/// The largest config file read (a config is a few hundred bytes).
pub(super) const CONFIG_FILE_BYTES_MAX: u64 = 1 << 20;
