//! A repository's own settings file: the init hooks `init_repo` runs after
//! cloning it.
//!
//! The file is `<repo>/.hearth/settings.json`, else
//! `<repo>/.capy/settings.json` (the first that exists wins; the second
//! name is read so that repos set up for Capy work unchanged). A repo with
//! neither has no init hooks. The format:
//!
//! ```json
//! {
//!   "hooks": {
//!     "init": [
//!       { "name": "deps", "command": "npm ci" },
//!       "make generate"
//!     ]
//!   }
//! }
//! ```
//!
//! - `hooks.init` is a list run in order in the repo's folder through
//!   `/bin/sh -c`, with the environment's variables set; the first hook that
//!   exits non-zero fails `init_repo`;
//! - an entry is either `{"name": …, "command": …}` or a plain command
//!   string; a plain string (or an object without a name) is named
//!   `hook-<n>`, `<n>` counting entries from 1;
//! - keys other than these are ignored (other tools may share the file,
//!   under other top-level keys or other hooks); a missing or `null`
//!   `hooks` or `init` means no hooks;
//! - a file that is not valid JSON, or whose `hooks.init` is not such a
//!   list, fails `init_repo` with an error naming the file and the problem.

use crate::Command;
use serde_json::Value;

/// The settings files looked for in a repo, in order of preference.
pub const SETTINGS_FILES: [&str; 2] = [".hearth/settings.json", ".capy/settings.json"];

/// The init hooks of a settings file's `text`; errors name `file_name`.
pub fn parse_init_hooks(file_name: &str, text: &str) -> Result<Vec<Command>, String> {
    let fail = |what: String| format!("{file_name}: {what}");
    let root: Value = serde_json::from_str(text).map_err(|e| fail(e.to_string()))?;
    let Value::Object(root) = root else {
        return Err(fail(format!(
            "expected a JSON object, found {}",
            kind(&root)
        )));
    };
    let hooks = match root.get("hooks") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(hooks)) => hooks,
        Some(other) => {
            return Err(fail(format!(
                "hooks: expected an object, found {}",
                kind(other)
            )));
        }
    };
    let init = match hooks.get("init") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(init)) => init,
        Some(other) => {
            return Err(fail(format!(
                "hooks.init: expected a list, found {}",
                kind(other)
            )));
        }
    };
    init.iter()
        .enumerate()
        .map(|(i, entry)| {
            let default_name = || format!("hook-{}", i + 1);
            let (name, command) = match entry {
                Value::String(command) => (default_name(), command.clone()),
                Value::Object(fields) => {
                    let name = match fields.get("name") {
                        None | Some(Value::Null) => default_name(),
                        Some(Value::String(name)) if name.trim().is_empty() => default_name(),
                        Some(Value::String(name)) => name.clone(),
                        Some(other) => {
                            return Err(fail(format!("hooks.init[{i}].name: expected a string, found {}", kind(other))));
                        }
                    };
                    let command = match fields.get("command") {
                        Some(Value::String(command)) => command.clone(),
                        None => return Err(fail(format!("hooks.init[{i}]: missing \"command\""))),
                        Some(other) => {
                            return Err(fail(format!("hooks.init[{i}].command: expected a string, found {}", kind(other))));
                        }
                    };
                    (name, command)
                }
                other => {
                    return Err(fail(format!(
                        "hooks.init[{i}]: expected a command string or {{\"name\", \"command\"}}, found {}",
                        kind(other)
                    )));
                }
            };
            if command.trim().is_empty() {
                return Err(fail(format!("hooks.init[{i}]: the command is empty")));
            }
            Ok(Command { name, command })
        })
        .collect()
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = ".hearth/settings.json";

    fn cmd(name: &str, command: &str) -> Command {
        Command {
            name: name.into(),
            command: command.into(),
        }
    }

    #[test]
    fn named_and_plain_entries_in_order() {
        let text = r#"{"hooks": {"init": [ {"name": "deps", "command": "npm ci"}, "make generate", {"command": "ls"} ]}}"#;
        assert_eq!(
            parse_init_hooks(FILE, text).unwrap(),
            [
                cmd("deps", "npm ci"),
                cmd("hook-2", "make generate"),
                cmd("hook-3", "ls")
            ]
        );
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let text = r#"{
            "permissions": {"allow": ["Bash"]},
            "hooks": {"PreToolUse": [{"matcher": "x"}], "init": [{"name": "a", "command": "true", "note": "hi"}]},
            "model": "x"
        }"#;
        assert_eq!(parse_init_hooks(FILE, text).unwrap(), [cmd("a", "true")]);
    }

    #[test]
    fn no_hooks_is_an_empty_list() {
        for text in [
            "{}",
            r#"{"hooks": null}"#,
            r#"{"hooks": {}}"#,
            r#"{"hooks": {"init": []}}"#,
            r#"{"hooks": {"init": null}}"#,
            r#"{"other": 1}"#,
        ] {
            assert_eq!(parse_init_hooks(FILE, text).unwrap(), [], "{text}");
        }
    }

    #[test]
    fn malformed_files_name_the_file_and_the_problem() {
        let e = parse_init_hooks(FILE, "{\"hooks\": {\"init\": [\n  \"a\",\n]}}").unwrap_err();
        assert!(e.starts_with(".hearth/settings.json: "), "{e}");
        assert!(e.contains("line 3"), "{e}");
        for (text, message) in [
            ("", "EOF while parsing"),
            ("[]", "expected a JSON object, found a list"),
            (
                r#"{"hooks": []}"#,
                "hooks: expected an object, found a list",
            ),
            (
                r#"{"hooks": {"init": "make"}}"#,
                "hooks.init: expected a list, found a string",
            ),
            (
                r#"{"hooks": {"init": [1]}}"#,
                "hooks.init[0]: expected a command string or {\"name\", \"command\"}, found a number",
            ),
            (
                r#"{"hooks": {"init": [{"name": "x"}]}}"#,
                "hooks.init[0]: missing \"command\"",
            ),
            (
                r#"{"hooks": {"init": ["a", {"name": 1, "command": "b"}]}}"#,
                "hooks.init[1].name: expected a string, found a number",
            ),
            (
                r#"{"hooks": {"init": [{"command": ["b"]}]}}"#,
                "hooks.init[0].command: expected a string, found a list",
            ),
            (
                r#"{"hooks": {"init": ["  "]}}"#,
                "hooks.init[0]: the command is empty",
            ),
        ] {
            let e = parse_init_hooks(".capy/settings.json", text).unwrap_err();
            assert!(e.starts_with(".capy/settings.json: "), "{e}");
            assert!(e.contains(message), "{text}: {e}");
        }
    }
}
