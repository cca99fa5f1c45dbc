//! What both backends share verbatim: the SQL text, the raw row shapes and
//! their decoding into the typed records of [`crate::types`], and the
//! mapping of constraint violations to [`StoreError`]s.
//!
//! Every statement uses `$N` parameters, which PostgreSQL and sqlx's SQLite
//! driver both accept, and only syntax both dialects understand
//! (`RETURNING`, `ON CONFLICT DO NOTHING`, partial indexes). The few
//! statements that differ (row locks, the VM claim) are built here from one
//! text with the backend's locking clause spliced in, so the two copies
//! cannot drift apart.

use crate::{
    Identity, Millis, ResourceRecord, Result, StoreError, Tenant, TokenRecord, VmRecord, VmState,
};
use hearth_core::ids::{AgentId, IdentityId, TenantId, TokenId, VmId};
use hearth_core::rbac::{IdentityKind, Role};
use hearth_core::resource::Kind;
use std::fmt::Display;
use std::str::FromStr;

// ---------------------------------------------------------------- tenants

pub const COUNT_TENANTS: &str = "SELECT count(*) FROM tenants";

pub const INSERT_TENANT: &str = "INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)";

pub const LIST_TENANTS: &str = "SELECT id, name, created_at FROM tenants ORDER BY created_at, id";

// ------------------------------------------------------------- identities

pub const INSERT_IDENTITY: &str = "INSERT INTO identities (id, tenant_id, name, kind, role, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6)";

pub const GET_IDENTITY: &str = "SELECT id, tenant_id, name, kind, role, created_at FROM identities \
     WHERE tenant_id = $1 AND name = $2";

pub const LIST_IDENTITIES: &str = "SELECT id, tenant_id, name, kind, role, created_at FROM identities \
     WHERE tenant_id = $1 ORDER BY name";

/// Tokens go with it (`ON DELETE CASCADE`).
pub const DELETE_IDENTITY: &str = "DELETE FROM identities WHERE tenant_id = $1 AND name = $2";

// ----------------------------------------------------------------- tokens

pub const INSERT_TOKEN: &str = "INSERT INTO tokens (id, identity_id, secret_sha256, expires_at, created_at) \
     VALUES ($1, $2, $3, $4, $5)";

/// Inserts a token for an identity named in a tenant; inserts nothing (0
/// rows affected) when there is no such identity.
pub const INSERT_TOKEN_BY_IDENTITY_NAME: &str = "INSERT INTO tokens (id, identity_id, secret_sha256, expires_at, created_at) \
     SELECT $1, id, $2, $3, $4 FROM identities WHERE tenant_id = $5 AND name = $6";

pub const FIND_TOKEN: &str = "SELECT t.id AS token_id, t.secret_sha256, t.expires_at, \
            i.id, i.tenant_id, i.name, i.kind, i.role, i.created_at \
     FROM tokens t JOIN identities i ON i.id = t.identity_id \
     WHERE t.id = $1";

// -------------------------------------------------------------- resources

/// The text of [`SELECT_RESOURCE`], as a literal so a backend can append a
/// locking clause with `concat!`.
macro_rules! select_resource {
    () => {
        "SELECT tenant_id, kind, name, spec, version, created_at, updated_at FROM resources \
         WHERE tenant_id = $1 AND kind = $2 AND name = $3"
    };
}
pub(crate) use select_resource;

pub const SELECT_RESOURCE: &str = select_resource!();

pub const LIST_RESOURCES: &str = "SELECT tenant_id, kind, name, spec, version, created_at, updated_at FROM resources \
     WHERE tenant_id = $1 AND kind = $2 ORDER BY name";

pub const RESOURCE_EXISTS: &str =
    "SELECT 1 FROM resources WHERE tenant_id = $1 AND kind = $2 AND name = $3";

pub const INSERT_RESOURCE: &str = "INSERT INTO resources (tenant_id, kind, name, spec, version, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";

pub const UPDATE_RESOURCE: &str = "UPDATE resources SET spec = $4, version = $5, updated_at = $6 \
     WHERE tenant_id = $1 AND kind = $2 AND name = $3";

pub const DELETE_RESOURCE: &str =
    "DELETE FROM resources WHERE tenant_id = $1 AND kind = $2 AND name = $3";

pub const DELETE_REFS_FROM: &str =
    "DELETE FROM resource_refs WHERE tenant_id = $1 AND from_kind = $2 AND from_name = $3";

pub const INSERT_REF: &str = "INSERT INTO resource_refs (tenant_id, from_kind, from_name, to_kind, to_name) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING";

/// The first resource (by kind, then name) that refers to the one named.
pub const FIRST_REFERRER: &str = "SELECT from_kind, from_name FROM resource_refs \
     WHERE tenant_id = $1 AND to_kind = $2 AND to_name = $3 \
     ORDER BY from_kind, from_name LIMIT 1";

// -------------------------------------------------------------------- VMs

pub const INSERT_VM: &str = "INSERT INTO vms (id, tenant_id, workspace, state, agent_id, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";

pub const LIST_VMS: &str = "SELECT id, tenant_id, workspace, state, agent_id, created_at, updated_at FROM vms \
     WHERE tenant_id = $1 ORDER BY created_at, id";

/// The VM claim as one compare-and-set statement: `$1` tenant, `$2`
/// workspace, `$3` agent, `$4` now. The argument is the locking clause of
/// the inner select (`"FOR UPDATE SKIP LOCKED"` on PostgreSQL, `""` on
/// SQLite, whose single writer serializes claims anyway); the outer
/// `state = 'idle'` makes the update a no-op if the row changed meanwhile.
macro_rules! claim_idle_vm {
    ($lock:literal) => {
        concat!(
            "UPDATE vms SET state = 'assigned', agent_id = $3, updated_at = $4 \
             WHERE id = (SELECT id FROM vms \
                         WHERE tenant_id = $1 AND workspace = $2 AND state = 'idle' \
                         ORDER BY created_at, id LIMIT 1 ",
            $lock,
            ") AND state = 'idle' \
             RETURNING id, tenant_id, workspace, state, agent_id, created_at, updated_at"
        )
    };
}
pub(crate) use claim_idle_vm;

// ------------------------------------------------------------------- rows

/// A `tenants` row as stored.
#[derive(sqlx::FromRow)]
pub struct TenantRow {
    id: String,
    name: String,
    created_at: Millis,
}

impl TryFrom<TenantRow> for Tenant {
    type Error = StoreError;
    fn try_from(row: TenantRow) -> Result<Tenant> {
        Ok(Tenant {
            id: parse("tenant id", &row.id)?,
            name: row.name,
            created_at: row.created_at,
        })
    }
}

/// An `identities` row as stored.
#[derive(sqlx::FromRow)]
pub struct IdentityRow {
    id: String,
    tenant_id: String,
    name: String,
    kind: String,
    role: String,
    created_at: Millis,
}

impl TryFrom<IdentityRow> for Identity {
    type Error = StoreError;
    fn try_from(row: IdentityRow) -> Result<Identity> {
        Ok(Identity {
            id: parse::<IdentityId>("identity id", &row.id)?,
            tenant_id: parse::<TenantId>("tenant id", &row.tenant_id)?,
            kind: parse::<IdentityKind>("identity kind", &row.kind)?,
            role: parse::<Role>("role", &row.role)?,
            name: row.name,
            created_at: row.created_at,
        })
    }
}

/// A token joined with its identity ([`FIND_TOKEN`]).
#[derive(sqlx::FromRow)]
pub struct TokenRow {
    token_id: String,
    secret_sha256: Vec<u8>,
    expires_at: Option<Millis>,
    #[sqlx(flatten)]
    identity: IdentityRow,
}

impl TryFrom<TokenRow> for TokenRecord {
    type Error = StoreError;
    fn try_from(row: TokenRow) -> Result<TokenRecord> {
        Ok(TokenRecord {
            id: parse::<TokenId>("token id", &row.token_id)?,
            secret_sha256: row.secret_sha256,
            expires_at: row.expires_at,
            identity: row.identity.try_into()?,
        })
    }
}

/// A `resources` row as stored (the spec still JSON text).
#[derive(sqlx::FromRow)]
pub struct ResourceRow {
    tenant_id: String,
    kind: String,
    name: String,
    spec: String,
    version: i64,
    created_at: Millis,
    updated_at: Millis,
}

impl TryFrom<ResourceRow> for ResourceRecord {
    type Error = StoreError;
    fn try_from(row: ResourceRow) -> Result<ResourceRecord> {
        let spec = serde_json::from_str(&row.spec).map_err(|e| {
            StoreError::Corrupt(format!("spec of {} {:?}: {e}", row.kind, row.name))
        })?;
        Ok(ResourceRecord {
            tenant_id: parse::<TenantId>("tenant id", &row.tenant_id)?,
            kind: parse::<Kind>("kind", &row.kind)?,
            name: row.name,
            spec,
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

/// A `vms` row as stored.
#[derive(sqlx::FromRow)]
pub struct VmRow {
    id: String,
    tenant_id: String,
    workspace: String,
    state: String,
    agent_id: Option<String>,
    created_at: Millis,
    updated_at: Millis,
}

impl TryFrom<VmRow> for VmRecord {
    type Error = StoreError;
    fn try_from(row: VmRow) -> Result<VmRecord> {
        Ok(VmRecord {
            id: parse::<VmId>("VM id", &row.id)?,
            tenant_id: parse::<TenantId>("tenant id", &row.tenant_id)?,
            workspace: row.workspace,
            state: parse::<VmState>("VM state", &row.state)?,
            agent_id: row
                .agent_id
                .as_deref()
                .map(|a| parse::<AgentId>("agent id", a))
                .transpose()?,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

/// Decodes every row, failing on the first corrupt one.
pub fn decode_all<R, T>(rows: Vec<R>) -> Result<Vec<T>>
where
    T: TryFrom<R, Error = StoreError>,
{
    rows.into_iter().map(T::try_from).collect()
}

/// Parses a stored string back into its typed value; `Corrupt` if it is not
/// one.
pub fn parse<T>(what: &str, text: &str) -> Result<T>
where
    T: FromStr,
    T::Err: Display,
{
    text.parse()
        .map_err(|e| StoreError::Corrupt(format!("{what} {text:?}: {e}")))
}

// ----------------------------------------------------------------- errors

/// Turns the constraint violations of one statement into the [`StoreError`]
/// they mean there; any other error passes through. Chainable:
/// `.on_unique(…).on_foreign_key(…)`.
pub trait ViolationExt<T> {
    /// A unique (or primary key) violation becomes `unique()`.
    fn on_unique(self, unique: impl FnOnce() -> StoreError) -> Result<T>;
    /// A foreign key violation becomes `foreign_key()`.
    fn on_foreign_key(self, foreign_key: impl FnOnce() -> StoreError) -> Result<T>;
}

impl<T, E: Into<StoreError>> ViolationExt<T> for Result<T, E> {
    fn on_unique(self, unique: impl FnOnce() -> StoreError) -> Result<T> {
        self.map_err(|e| match e.into() {
            StoreError::Database(sqlx::Error::Database(d)) if d.is_unique_violation() => unique(),
            other => other,
        })
    }

    fn on_foreign_key(self, foreign_key: impl FnOnce() -> StoreError) -> Result<T> {
        self.map_err(|e| match e.into() {
            StoreError::Database(sqlx::Error::Database(d)) if d.is_foreign_key_violation() => {
                foreign_key()
            }
            other => other,
        })
    }
}
