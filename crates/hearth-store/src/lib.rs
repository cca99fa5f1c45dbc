//! hearth's store: the one interface to desired state and the record of every
//! VM, with two real backends chosen by the database URL — embedded SQLite
//! (default, WAL) and PostgreSQL (for several server replicas).
//!
//! **Invariants:**
//! - Every multi-row change is one transaction; a VM claim is one statement
//!   (compare-and-set in SQLite, `FOR UPDATE SKIP LOCKED` in PostgreSQL),
//!   never a read followed by a write in another transaction.
//! - Every query is scoped by tenant; no method returns another tenant's rows.
//! - The store never calls a driver and never validates specs: it stores the
//!   JSON the API has already parsed and validated.
//! - Migrations are versioned, one folder per backend, applied on open.

mod error;
mod postgres;
mod shared;
mod sql;
mod sqlite;
mod types;

pub use error::StoreError;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use types::*;

use async_trait::async_trait;
use hearth_core::ids::{AgentId, TenantId, TokenId};
use hearth_core::rbac::{IdentityKind, Role};
use hearth_core::resource::Kind;
use std::path::Path;
use std::sync::Arc;

/// Result of a store call.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The store interface. Both backends pass the same test suite.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    /// Checks the database answers.
    async fn ping(&self) -> Result<()>;

    /// On an empty store (no tenant at all), creates the first tenant, an
    /// `operator` developer identity in it and that identity's token, in one
    /// transaction, and returns them. On a store with any tenant, does
    /// nothing and returns `None`. Safe to race from several servers.
    async fn bootstrap(
        &self,
        tenant_name: &str,
        identity_name: &str,
        token: &NewToken,
    ) -> Result<Option<(Tenant, Identity)>>;

    /// Creates a tenant with one `admin` developer identity and its token,
    /// in one transaction. `AlreadyExists` when the name is taken.
    async fn create_tenant(
        &self,
        name: &str,
        admin_name: &str,
        token: &NewToken,
    ) -> Result<(Tenant, Identity)>;

    /// All tenants, oldest first.
    async fn list_tenants(&self) -> Result<Vec<Tenant>>;

    /// Creates an identity (and, when given, its first token) in one
    /// transaction. `AlreadyExists` when the name is taken in the tenant.
    async fn create_identity(
        &self,
        tenant: TenantId,
        name: &str,
        kind: IdentityKind,
        role: Role,
        token: Option<&NewToken>,
    ) -> Result<Identity>;

    /// One identity by name. `NotFound` when absent.
    async fn get_identity(&self, tenant: TenantId, name: &str) -> Result<Identity>;

    /// The tenant's identities, by name.
    async fn list_identities(&self, tenant: TenantId) -> Result<Vec<Identity>>;

    /// Deletes an identity and every token of it. `NotFound` when absent.
    async fn delete_identity(&self, tenant: TenantId, name: &str) -> Result<()>;

    /// Adds a token to an existing identity. `NotFound` when absent.
    async fn create_token(
        &self,
        tenant: TenantId,
        identity_name: &str,
        token: &NewToken,
    ) -> Result<()>;

    /// Looks a token up by its public id, with its identity and tenant.
    async fn find_token(&self, id: TokenId) -> Result<Option<TokenRecord>>;

    /// One resource, or `None`.
    async fn get_resource(
        &self,
        tenant: TenantId,
        kind: Kind,
        name: &str,
    ) -> Result<Option<ResourceRecord>>;

    /// The tenant's resources of one kind, by name.
    async fn list_resources(&self, tenant: TenantId, kind: Kind) -> Result<Vec<ResourceRecord>>;

    /// Creates or replaces a resource in one transaction: checks the
    /// precondition (`Conflict`), checks every reference exists
    /// (`MissingReference`), writes the spec (bumping `version` only when
    /// the spec changed) and replaces the resource's recorded references.
    async fn put_resource(&self, put: PutResource<'_>) -> Result<PutOutcome>;

    /// Deletes a resource in one transaction. `NotFound` when absent,
    /// `InUse` while another resource refers to it.
    async fn delete_resource(
        &self,
        tenant: TenantId,
        kind: Kind,
        name: &str,
    ) -> Result<ResourceRecord>;

    /// Records a new VM.
    async fn insert_vm(&self, vm: &VmRecord) -> Result<()>;

    /// Claims the oldest idle VM of a workspace for an agent, in one
    /// statement: no VM is ever handed to two agents.
    async fn claim_idle_vm(
        &self,
        tenant: TenantId,
        workspace: &str,
        agent: AgentId,
    ) -> Result<Option<VmRecord>>;

    /// The tenant's VMs, oldest first.
    async fn list_vms(&self, tenant: TenantId) -> Result<Vec<VmRecord>>;
}

/// Opens the store a URL names, applying migrations: `postgres://…` or
/// `postgresql://…` for PostgreSQL, `sqlite://PATH` or no URL for SQLite
/// (default file: `<data_dir>/hearth.db`).
pub async fn open(url: Option<&str>, data_dir: &Path) -> Result<Arc<dyn Store>> {
    match url {
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
            Ok(Arc::new(PgStore::connect(u).await?))
        }
        Some(u) if u.starts_with("sqlite:") => {
            let path = u
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            Ok(Arc::new(SqliteStore::open(Path::new(path)).await?))
        }
        Some(u) => Err(StoreError::InvalidUrl(u.to_owned())),
        None => Ok(Arc::new(
            SqliteStore::open(&data_dir.join("hearth.db")).await?,
        )),
    }
}
