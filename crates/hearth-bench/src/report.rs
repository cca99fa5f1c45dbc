//! Where results go: a table on stdout, a JSON document on disk.

use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// `--json PATH`, or `target/bench/<name>.json` (relative to the current
/// folder) when not given.
pub fn json_path(given: Option<&Path>, name: &str) -> PathBuf {
    given.map_or_else(
        || Path::new("target/bench").join(format!("{name}.json")),
        Path::to_path_buf,
    )
}

/// Writes `value` as pretty JSON to `path`, creating its folder.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("[bench] wrote {}", path.display());
    Ok(())
}
