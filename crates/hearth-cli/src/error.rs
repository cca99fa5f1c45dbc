//! The failure the CLI reports: one `CODE: message` line on stderr and exit
//! code 1.
//!
//! This module owns [`CliError`] (a code as the server spells it plus a
//! message) and [`error_line`], which turns any `anyhow::Error` raised inside
//! the CLI into the line that is printed.

use hearth_core::ErrorCode;
use std::fmt;

/// The code of a wait that ran out of time (`hearth spawn --wait`,
/// `hearth agents exec`).
pub const DEADLINE_EXCEEDED: &str = "DEADLINE_EXCEEDED";

/// A user-facing failure. The code is a string rather than
/// [`ErrorCode`] so that a code the server sends is printed exactly as sent,
/// even one this client does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    pub code: String,
    pub message: String,
}

impl CliError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        CliError {
            code: code.as_str().to_owned(),
            message: message.into(),
        }
    }

    /// An `INVALID_ARGUMENT` error: the user's input is wrong.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    /// An `INTERNAL` error: something neither the user nor the server
    /// reported as their fault went wrong.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// A `DEADLINE_EXCEEDED` error: something the CLI waited for did not
    /// happen in time. (Not a code the server sends, so not an
    /// [`ErrorCode`].)
    pub fn deadline_exceeded(message: impl Into<String>) -> Self {
        CliError {
            code: DEADLINE_EXCEEDED.to_owned(),
            message: message.into(),
        }
    }

    /// The error for a server that could not be reached at all.
    pub fn unavailable(server: &str, reason: &str) -> Self {
        Self::new(
            ErrorCode::Unavailable,
            format!("cannot reach the hearth server at {server}: {reason}"),
        )
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for CliError {}

impl From<hearth_core::Error> for CliError {
    fn from(err: hearth_core::Error) -> Self {
        CliError::new(err.code, err.message)
    }
}

/// The line printed on stderr for a failed command: `CODE: message`.
/// Errors that carry no code are reported as `INTERNAL`.
pub fn error_line(err: &anyhow::Error) -> String {
    if let Some(e) = err.downcast_ref::<CliError>() {
        return e.to_string();
    }
    if let Some(e) = err.downcast_ref::<hearth_core::Error>() {
        return CliError::from(e.clone()).to_string();
    }
    format!("{}: {err:#}", ErrorCode::Internal.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_the_code() {
        let e = anyhow::Error::new(CliError::invalid("bad"));
        assert_eq!(error_line(&e), "INVALID_ARGUMENT: bad");
        let e = anyhow::Error::new(hearth_core::Error::not_found("no such workspace"));
        assert_eq!(error_line(&e), "NOT_FOUND: no such workspace");
        let e = anyhow::anyhow!("disk full").context("writing hearth.local.yaml");
        assert_eq!(
            error_line(&e),
            "INTERNAL: writing hearth.local.yaml: disk full"
        );
        assert_eq!(
            CliError::deadline_exceeded("too slow").to_string(),
            "DEADLINE_EXCEEDED: too slow"
        );
        let e = CliError::unavailable("http://127.0.0.1:1", "Connection refused");
        assert_eq!(
            e.to_string(),
            "UNAVAILABLE: cannot reach the hearth server at http://127.0.0.1:1: Connection refused"
        );
    }
}
