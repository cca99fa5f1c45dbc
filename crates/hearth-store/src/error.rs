//! Store errors: typed, so the API can map each to the right code.

use hearth_core::resource::Kind;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A precondition (expected version) did not hold; the caller may retry.
    #[error("{0} was changed concurrently")]
    Conflict(String),
    #[error("{kind} {name:?} does not exist")]
    MissingReference { kind: Kind, name: String },
    #[error("{kind} {name:?} is used by {by_kind} {by_name:?}")]
    InUse {
        kind: Kind,
        name: String,
        by_kind: Kind,
        by_name: String,
    },
    /// A count-based limit (the per-developer agent cap) was reached.
    #[error("limit of {0} reached")]
    LimitReached(i64),
    #[error("unsupported database URL {0:?}: use postgres://… or sqlite://PATH")]
    InvalidUrl(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot prepare the data directory")]
    Io(#[from] std::io::Error),
}
