//! The `hearth-guest-agent` binary; everything lives in the library
//! (`hearth_guest_agent::cli`).

fn main() -> std::process::ExitCode {
    hearth_guest_agent::cli::run(std::env::args_os().skip(1).collect())
}
