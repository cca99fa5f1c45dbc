//! The command line of the `hearth-guest-agent` binary: `serve`, `init`,
//! `confine`, `vm-init` and `launch`, parsed by hand to keep the binary small and fast
//! to start.
//!
//! Flags are `--name value`; `--hide` and `--cgroup-procs` take every value
//! up to the next flag and may repeat; `launch` and `confine` take their
//! command after `--`.
//! Run with no arguments as PID 1 (a kernel starting `/init`), the binary is
//! `vm-init`.

use crate::init::{self, InitArgs};
use crate::server::{self, ServerConfig};
use crate::vminit;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

const USAGE: &str = "usage:
  hearth-guest-agent serve (--socket PATH | --tcp ADDR:PORT) --secret-file PATH --vm-id ID [--jobs-dir DIR]
  hearth-guest-agent vm-init   (PID 1 of a qemu VM; also when run as PID 1 with no arguments)
  hearth-guest-agent init --vm-dir DIR --lower DIR --uid-base N [--hide PATH...] --hostname NAME [--memory-bytes N] [--cpu-quota-us N]
  hearth-guest-agent confine -- SERVER-COMMAND [ARGS...]   (started by init)
  hearth-guest-agent launch [--cgroup-procs PATH...] -- COMMAND [ARGS...]";

/// Runs the subcommand `args` names (program name excluded).
pub fn run(args: Vec<OsString>) -> ExitCode {
    if args.is_empty() && std::process::id() == 1 {
        return finish("vm-init", vminit::run());
    }
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match command.to_str() {
        Some("serve") => serve(rest),
        Some("init") => init(rest),
        Some("confine") => confine(rest),
        Some("launch") => launch(rest),
        Some("vm-init") if rest.is_empty() => vminit::run(),
        Some("vm-init") => Err(format!("vm-init takes no arguments\n{USAGE}")),
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(format!("unknown command {command:?}\n{USAGE}")),
    };
    finish(&command.to_string_lossy(), result)
}

fn finish(command: &str, result: Result<i32, String>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(message) => {
            eprintln!("hearth-guest-agent {command}: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Parsed flags: each flag's values, in order, and what followed `--`.
#[derive(Debug, Default)]
struct Flags {
    values: BTreeMap<String, Vec<OsString>>,
    rest: Vec<OsString>,
}

impl Flags {
    fn parse(args: &[OsString], known: &[&str]) -> Result<Self, String> {
        let mut flags = Flags::default();
        let mut current: Option<String> = None;
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            if arg == "--" {
                flags.rest = iter.cloned().collect();
                break;
            }
            let text = arg.to_string_lossy();
            if let Some(name) = text.strip_prefix("--") {
                if !known.contains(&name) {
                    return Err(format!("unknown flag --{name}\n{USAGE}"));
                }
                flags.values.entry(name.to_owned()).or_default();
                current = Some(name.to_owned());
            } else {
                let Some(name) = &current else {
                    return Err(format!("unexpected argument {text:?}\n{USAGE}"));
                };
                flags
                    .values
                    .entry(name.clone())
                    .or_default()
                    .push(arg.clone());
            }
        }
        Ok(flags)
    }

    fn many(&self, name: &str) -> Vec<OsString> {
        self.values.get(name).cloned().unwrap_or_default()
    }

    fn optional(&self, name: &str) -> Result<Option<OsString>, String> {
        match self.values.get(name).map(Vec::as_slice) {
            None => Ok(None),
            Some([one]) => Ok(Some(one.clone())),
            Some(_) => Err(format!("--{name} takes exactly one value")),
        }
    }

    fn one(&self, name: &str) -> Result<OsString, String> {
        self.optional(name)?
            .ok_or_else(|| format!("--{name} is required"))
    }

    fn number(&self, name: &str) -> Result<Option<u64>, String> {
        self.optional(name)?
            .map(|v| {
                v.to_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("--{name}: not a number: {v:?}"))
            })
            .transpose()
    }
}

fn text(value: OsString, name: &str) -> Result<String, String> {
    value
        .into_string()
        .map_err(|v| format!("--{name}: not UTF-8: {v:?}"))
}

fn serve(args: &[OsString]) -> Result<i32, String> {
    let flags = Flags::parse(args, &["socket", "tcp", "secret-file", "vm-id", "jobs-dir"])?;
    let socket = flags.optional("socket")?.map(PathBuf::from);
    let tcp = flags
        .optional("tcp")?
        .map(|addr| {
            let addr = text(addr, "tcp")?;
            addr.parse::<SocketAddr>()
                .map_err(|e| format!("--tcp {addr}: {e}"))
        })
        .transpose()?;
    let secret_file = PathBuf::from(flags.one("secret-file")?);
    let vm_id = text(flags.one("vm-id")?, "vm-id")?;
    let secret = server::read_secret(&secret_file)
        .map_err(|e| format!("read the secret from {}: {e}", secret_file.display()))?;
    let jobs_dir = flags
        .optional("jobs-dir")?
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(crate::jobs::DEFAULT_JOBS_DIR));
    let config = ServerConfig {
        secret,
        vm_id,
        jobs_dir,
    };
    match (socket, tcp) {
        (Some(socket), None) => server::serve_unix(&socket, config)
            .map_err(|e| format!("serve on {}: {e}", socket.display()))?,
        (None, Some(addr)) => {
            server::serve_tcp(addr, config).map_err(|e| format!("serve on {addr}: {e}"))?
        }
        _ => return Err(format!("give exactly one of --socket and --tcp\n{USAGE}")),
    }
    Ok(0)
}

fn init(args: &[OsString]) -> Result<i32, String> {
    let flags = Flags::parse(
        args,
        &[
            "vm-dir",
            "lower",
            "uid-base",
            "hide",
            "hostname",
            "memory-bytes",
            "cpu-quota-us",
        ],
    )?;
    let args = InitArgs {
        vm_dir: flags.one("vm-dir")?.into(),
        lower: flags.one("lower")?.into(),
        uid_base: flags
            .number("uid-base")?
            .ok_or("--uid-base is required")?
            .try_into()
            .map_err(|_| "--uid-base must fit in 32 bits".to_owned())?,
        hide: flags.many("hide").into_iter().map(PathBuf::from).collect(),
        hostname: text(flags.one("hostname")?, "hostname")?,
        memory_bytes: flags.number("memory-bytes")?,
        cpu_quota_us: flags.number("cpu-quota-us")?,
    };
    init::run(&args)
}

fn confine(args: &[OsString]) -> Result<i32, String> {
    let flags = Flags::parse(args, &[])?;
    crate::confine::run(&flags.rest)
}

fn launch(args: &[OsString]) -> Result<i32, String> {
    let flags = Flags::parse(args, &["cgroup-procs"])?;
    let Some((program, program_args)) = flags.rest.split_first() else {
        return Err(format!("no command after --\n{USAGE}"));
    };
    for procs in flags.many("cgroup-procs") {
        // "0" moves the writing process; its children inherit the cgroup.
        fs::write(&procs, "0")
            .map_err(|e| format!("join the cgroup {}: {e}", procs.to_string_lossy()))?;
    }
    let e = Command::new(program).args(program_args).exec();
    Err(format!(
        "exec {}: {e}",
        OsStr::new(program).to_string_lossy()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn flags_take_values_up_to_the_next_flag() {
        let flags = Flags::parse(
            &os(&["--hide", "/a", "/b", "--hostname", "h", "--hide", "/c"]),
            &["hide", "hostname"],
        )
        .unwrap();
        assert_eq!(flags.many("hide"), os(&["/a", "/b", "/c"]));
        assert_eq!(flags.one("hostname").unwrap(), "h");
        assert!(flags.one("lower").is_err());
        let flags = Flags::parse(
            &os(&["--cgroup-procs", "/x", "--", "unshare", "--fork"]),
            &["cgroup-procs"],
        )
        .unwrap();
        assert_eq!(flags.rest, os(&["unshare", "--fork"]));
        assert!(Flags::parse(&os(&["--nope"]), &["hide"]).is_err());
        assert!(Flags::parse(&os(&["stray"]), &["hide"]).is_err());
        let flags = Flags::parse(&os(&["--memory-bytes", "12"]), &["memory-bytes"]).unwrap();
        assert_eq!(flags.number("memory-bytes").unwrap(), Some(12));
    }
}
