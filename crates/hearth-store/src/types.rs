//! Rows as the rest of hearth sees them.

use hearth_core::ids::{AgentId, IdentityId, TenantId, TokenId, VmId};
use hearth_core::rbac::{IdentityKind, Role};
use hearth_core::resource::{Kind, ResourceRef};
use std::fmt;
use std::str::FromStr;

/// Milliseconds since the Unix epoch (how every timestamp is stored).
pub type Millis = i64;

/// Now, in [`Millis`].
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: IdentityId,
    pub tenant_id: TenantId,
    pub name: String,
    pub kind: IdentityKind,
    pub role: Role,
    pub created_at: Millis,
}

/// A token to store: only the SHA-256 of its secret half is kept.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: TokenId,
    pub secret_sha256: Vec<u8>,
    pub expires_at: Option<Millis>,
}

/// A stored token with the identity it speaks for.
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub id: TokenId,
    pub secret_sha256: Vec<u8>,
    pub expires_at: Option<Millis>,
    pub identity: Identity,
}

/// One stored resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceRecord {
    pub tenant_id: TenantId,
    pub kind: Kind,
    pub name: String,
    pub spec: serde_json::Value,
    /// Starts at 1; bumps on every change of the spec.
    pub version: i64,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// What a write must find before it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Write whatever is there.
    None,
    /// The resource must exist at exactly this version (read-modify-write).
    Version(i64),
}

/// A create-or-replace of one resource.
#[derive(Debug, Clone)]
pub struct PutResource<'a> {
    pub tenant: TenantId,
    pub kind: Kind,
    pub name: &'a str,
    pub spec: &'a serde_json::Value,
    /// Resources that must exist now and cannot be deleted while this one
    /// refers to them.
    pub references: &'a [ResourceRef],
    pub precondition: Precondition,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PutOutcome {
    pub record: ResourceRecord,
    pub created: bool,
    pub changed: bool,
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    Booting,
    Provisioning,
    Idle,
    Assigned,
    Draining,
    Destroyed,
    Failed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Booting => "booting",
            VmState::Provisioning => "provisioning",
            VmState::Idle => "idle",
            VmState::Assigned => "assigned",
            VmState::Draining => "draining",
            VmState::Destroyed => "destroyed",
            VmState::Failed => "failed",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VmState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "booting" => VmState::Booting,
            "provisioning" => VmState::Provisioning,
            "idle" => VmState::Idle,
            "assigned" => VmState::Assigned,
            "draining" => VmState::Draining,
            "destroyed" => VmState::Destroyed,
            "failed" => VmState::Failed,
            other => return Err(format!("unknown VM state {other:?}")),
        })
    }
}

/// One VM's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    pub id: VmId,
    pub tenant_id: TenantId,
    pub workspace: String,
    pub state: VmState,
    pub agent_id: Option<AgentId>,
    pub created_at: Millis,
    pub updated_at: Millis,
}
