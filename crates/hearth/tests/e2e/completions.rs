//! `hearth completions bash|zsh|fish`: each script, printed by the real
//! binary, loads in the real shell and completes hearth's subcommands
//! (zsh and fish when installed; without them, their scripts are checked
//! to name the subcommands).

use crate::common::binary;
use std::process::Command;

/// Runs `script` in `shell -c` with the binary's folder first on PATH.
fn shell(shell: &str, script: &str) -> Option<std::process::Output> {
    let dir = std::path::Path::new(binary()).parent().unwrap();
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap());
    let out = Command::new(shell)
        .args(["-c", script])
        .env("PATH", path)
        .output();
    match out {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run {shell}: {e}"),
    }
}

fn script(shell: &str) -> String {
    let out = Command::new(binary())
        .args(["completions", shell])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn stdout(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bash_completes_subcommands() {
    let out = shell(
        "bash",
        "source <(hearth completions bash) && complete -p hearth",
    )
    .expect("bash is installed");
    assert_eq!(
        stdout(&out).trim(),
        "complete -o bashdefault -o default -o nosort -F _hearth hearth"
    );
    // What bash does on TAB: the function with the words so far.
    let complete = |words: &str| {
        let n = words.split(' ').count() - 1;
        let out = shell(
            "bash",
            &format!(
                "source <(hearth completions bash); COMP_WORDS=({words}); COMP_CWORD={n}; \
                 _hearth hearth \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; \
                 printf '%s\\n' \"${{COMPREPLY[@]}}\""
            ),
        )
        .unwrap();
        stdout(&out)
    };
    assert_eq!(complete("hearth po"), "pool\n");
    assert_eq!(complete("hearth pool st"), "status\n");
    assert_eq!(complete("hearth comp"), "completions\n");
    let shells = complete("hearth completions ''");
    assert!(
        ["bash", "zsh", "fish"]
            .iter()
            .all(|s| shells.lines().any(|l| l == *s)),
        "{shells}"
    );
}

#[test]
fn zsh_and_fish_scripts_name_the_subcommands() {
    let zsh = script("zsh");
    assert!(zsh.starts_with("#compdef hearth\n"), "{}", &zsh[..80]);
    let fish = script("fish");
    for sub in ["server", "pool", "agents", "warm-pool", "completions"] {
        assert!(zsh.contains(&format!("'{sub}:")), "zsh lacks {sub}");
        assert!(fish.contains(&format!("-a \"{sub}\"")), "fish lacks {sub}");
    }
    // Loaded for real where the shells are installed.
    if let Some(out) = shell(
        "zsh",
        "autoload -Uz compinit && compinit -u -D && source <(hearth completions zsh) && print -r -- $_comps[hearth]",
    ) {
        assert_eq!(stdout(&out).trim(), "_hearth");
    }
    if let Some(out) = shell(
        "fish",
        "hearth completions fish | source; complete -C 'hearth pool st'",
    ) {
        let got = stdout(&out);
        assert!(got.starts_with("status"), "{got}");
    }
}

#[test]
fn an_unknown_shell_is_refused_by_name() {
    let out = Command::new(binary())
        .args(["completions", "powershell"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'powershell'")
            && err.contains("[possible values: bash, zsh, fish]"),
        "{err}"
    );
}
