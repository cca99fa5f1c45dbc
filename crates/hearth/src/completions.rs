//! `hearth completions bash|zsh|fish`: the shell completion script of the
//! whole `hearth` command line (server, node and client commands), printed
//! to stdout, generated from the same clap tree that parses it (so it never
//! drifts from the commands). It reads and writes nothing else.

use std::io::Write;

/// The shells a completion script is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

impl From<Shell> for clap_complete::Shell {
    fn from(shell: Shell) -> Self {
        match shell {
            Shell::Bash => clap_complete::Shell::Bash,
            Shell::Zsh => clap_complete::Shell::Zsh,
            Shell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// The arguments of `hearth completions`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to write the script for
    #[arg(value_enum)]
    pub shell: Shell,
}

/// The script of `shell` for `command` (the `hearth` binary's).
pub fn script(shell: Shell, command: &mut clap::Command) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(
        clap_complete::Shell::from(shell),
        command,
        "hearth",
        &mut out,
    );
    out
}

/// Prints the script to stdout. A reader that stops early (`| head`) is no
/// error; any other failure to write is.
pub fn print(shell: Shell, command: &mut clap::Command) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(&script(shell, command))
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
