//! hearth's domain: typed ids, the resources users write (pool config,
//! workspaces, environments, images), their validation, and the permission
//! model.
//!
//! **Invariant:** this crate does no I/O. Everything here is a pure function
//! of its input, so it is trivially testable and shared by the server and the
//! CLI alike.

pub mod error;
pub mod fingerprint;
pub mod ids;
pub mod nesting;
pub mod nul;
pub mod rbac;
pub mod resource;

pub use error::{Error, ErrorCode};
