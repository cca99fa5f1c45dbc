//! hearth's guest agent: the small process inside every VM that runs
//! commands and writes files for the provisioning pipeline.
//!
//! - [`protocol`]: the request and response types, shared with the host's
//!   client (`hearth_drivers::guest`);
//! - [`server`]: `hearth-guest-agent serve`, the agent proper;
//! - [`jobs`]: the server's jobs, commands that outlive their connection;
//! - [`init`]: `hearth-guest-agent init`, PID 1 of a sandbox;
//! - [`confine`]: `hearth-guest-agent confine`, how a sandbox's server
//!   enters its user namespace, drops capabilities and installs seccomp;
//! - [`idmap`]: the idmapped mount of a sandbox's image;
//! - [`vminit`]: `hearth-guest-agent vm-init`, PID 1 of a qemu VM (the
//!   `/init` of a baked image);
//! - [`cli`]: the binary's command line, including `launch` (join cgroups,
//!   then exec the sandbox's `unshare`).
//!
//! **Invariants:** std, serde, nix, caps and seccompiler only (no async
//! runtime, no HTTP), so that the binary is small and starts in a few
//! milliseconds; `unsafe` only in [`idmap`] (three system calls).

pub mod cli;
pub mod confine;
pub mod idmap;
pub mod init;
pub mod jobs;
pub mod protocol;
pub mod server;
pub mod vminit;
