//! Store errors: typed, so the API can map each to the right code.

use crate::AgentPhase;
use hearth_core::ids::AgentId;
use hearth_core::rbac::Role;
use hearth_core::resource::Kind;
use std::fmt;

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
    /// [`Store::delete_identity`](crate::Store::delete_identity) or
    /// [`Store::create_token`](crate::Store::create_token) refused to act
    /// on the identity `name`.
    #[error("identity {name:?}: {refusal}")]
    IdentityRefused {
        name: String,
        refusal: IdentityRefusal,
    },
    /// A spawn named a parent agent that cannot be one
    /// ([`Store::spawn_agent`](crate::Store::spawn_agent)).
    #[error("parent agent {parent}: {problem}")]
    BadParent {
        parent: AgentId,
        problem: ParentProblem,
    },
    #[error("unsupported database URL {0:?}: use postgres://… or sqlite://PATH")]
    InvalidUrl(String),
    /// Sealed secrets that cannot be opened: no key was given, or not the
    /// key that sealed them ([`crate::secrets`]).
    #[error("{0}")]
    SecretsLocked(String),
    /// Artifact bytes that are not what their digest names
    /// ([`Store::put_artifact`](crate::Store::put_artifact)).
    #[error("{0}")]
    InvalidArtifact(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot prepare the data directory")]
    Io(#[from] std::io::Error),
}

/// Why an identity was not deleted or given a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityRefusal {
    /// Its role is above the caller's ceiling.
    AboveCeiling { role: Role, ceiling: Role },
    /// It is the tenant's last identity whose role may manage identities.
    LastManager,
}

impl fmt::Display for IdentityRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityRefusal::AboveCeiling { role, ceiling } => {
                write!(f, "role {role} is above {ceiling}")
            }
            IdentityRefusal::LastManager => {
                f.write_str("the last identity that manages identities")
            }
        }
    }
}

/// Why a spawn's parent agent was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParentProblem {
    /// No such agent in the tenant.
    NotFound,
    /// Another identity's agent (its owner's name).
    OtherOwner(String),
    /// It has ended (this phase).
    Terminal(AgentPhase),
}

impl fmt::Display for ParentProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParentProblem::NotFound => f.write_str("not found"),
            ParentProblem::OtherOwner(owner) => write!(f, "belongs to {owner:?}"),
            ParentProblem::Terminal(phase) => write!(f, "is {phase}"),
        }
    }
}
