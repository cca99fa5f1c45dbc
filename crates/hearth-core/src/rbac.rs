//! Roles and the named permissions they are made of.
//!
//! Permissions are the unit the API checks (`pool-config.delete`, …); roles
//! are fixed bundles of them. The table here is the one documented in
//! README.md: change both together.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One thing an identity may be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    PoolConfigGet,
    PoolConfigUpdate,
    PoolConfigDelete,
    WorkspaceGet,
    WorkspaceUpdate,
    WorkspaceDelete,
    EnvironmentGet,
    EnvironmentUpdate,
    EnvironmentDelete,
    ImageGet,
    ImageUpdate,
    ImageDelete,
    ImageRegister,
    AgentGet,
    AgentSpawn,
    AgentKill,
    IdentityGet,
    IdentityUpdate,
    IdentityDelete,
    BuildGet,
    BuildRetire,
    TenantCreate,
    NodeRead,
    NodeManage,
    EventRead,
    WebhookGet,
    WebhookUpdate,
    WebhookDelete,
    MetricsRead,
}

impl Permission {
    /// Every permission, in documentation order.
    pub const ALL: &'static [Permission] = &[
        Permission::PoolConfigGet,
        Permission::PoolConfigUpdate,
        Permission::PoolConfigDelete,
        Permission::WorkspaceGet,
        Permission::WorkspaceUpdate,
        Permission::WorkspaceDelete,
        Permission::EnvironmentGet,
        Permission::EnvironmentUpdate,
        Permission::EnvironmentDelete,
        Permission::ImageGet,
        Permission::ImageUpdate,
        Permission::ImageDelete,
        Permission::ImageRegister,
        Permission::AgentGet,
        Permission::AgentSpawn,
        Permission::AgentKill,
        Permission::IdentityGet,
        Permission::IdentityUpdate,
        Permission::IdentityDelete,
        Permission::BuildGet,
        Permission::BuildRetire,
        Permission::TenantCreate,
        Permission::NodeRead,
        Permission::NodeManage,
        Permission::EventRead,
        Permission::WebhookGet,
        Permission::WebhookUpdate,
        Permission::WebhookDelete,
        Permission::MetricsRead,
    ];

    /// The documented name, e.g. `pool-config.delete`.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::PoolConfigGet => "pool-config.get",
            Permission::PoolConfigUpdate => "pool-config.update",
            Permission::PoolConfigDelete => "pool-config.delete",
            Permission::WorkspaceGet => "workspace.get",
            Permission::WorkspaceUpdate => "workspace.update",
            Permission::WorkspaceDelete => "workspace.delete",
            Permission::EnvironmentGet => "environment.get",
            Permission::EnvironmentUpdate => "environment.update",
            Permission::EnvironmentDelete => "environment.delete",
            Permission::ImageGet => "image.get",
            Permission::ImageUpdate => "image.update",
            Permission::ImageDelete => "image.delete",
            Permission::ImageRegister => "image.register",
            Permission::AgentGet => "agent.get",
            Permission::AgentSpawn => "agent.spawn",
            Permission::AgentKill => "agent.kill",
            Permission::IdentityGet => "identity.get",
            Permission::IdentityUpdate => "identity.update",
            Permission::IdentityDelete => "identity.delete",
            Permission::BuildGet => "build.get",
            Permission::BuildRetire => "build.retire",
            Permission::TenantCreate => "tenant.create",
            Permission::NodeRead => "node.read",
            Permission::NodeManage => "node.manage",
            Permission::EventRead => "event.read",
            Permission::WebhookGet => "webhook.get",
            Permission::WebhookUpdate => "webhook.update",
            Permission::WebhookDelete => "webhook.delete",
            Permission::MetricsRead => "metrics.read",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fixed bundle of permissions. Each role holds everything the role before
/// it holds: `viewer` ⊂ `developer` ⊂ `admin` ⊂ `operator`, which is also
/// their order (`Ord`): a role is "at most" another when it holds no more.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything in its tenant except identities.
    Viewer,
    /// A viewer that also spawns and kills agents and edits workspaces.
    Developer,
    /// Everything inside its own tenant.
    Admin,
    /// An admin that may also create tenants, retire builds and register
    /// prebuilt images (the identity made at first start).
    Operator,
}

impl Role {
    pub const ALL: &'static [Role] = &[Role::Viewer, Role::Developer, Role::Admin, Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Developer => "developer",
            Role::Admin => "admin",
            Role::Operator => "operator",
        }
    }

    /// Whether this role holds `permission`.
    pub fn allows(self, permission: Permission) -> bool {
        use Permission::*;
        let viewer = matches!(
            permission,
            PoolConfigGet | WorkspaceGet | EnvironmentGet | ImageGet | AgentGet | EventRead
        );
        let developer = viewer || matches!(permission, AgentSpawn | AgentKill | WorkspaceUpdate);
        // The fleet's nodes and the server's metrics span every tenant:
        // only operators see or change them.
        let admin = !matches!(
            permission,
            TenantCreate | BuildRetire | ImageRegister | NodeRead | NodeManage | MetricsRead
        );
        match self {
            Role::Viewer => viewer,
            Role::Developer => developer,
            Role::Admin => admin,
            Role::Operator => true,
        }
    }

    /// The permissions of this role, in documentation order.
    pub fn permissions(self) -> Vec<Permission> {
        Permission::ALL
            .iter()
            .copied()
            .filter(|p| self.allows(*p))
            .collect()
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .iter()
            .copied()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                crate::Error::invalid(format!(
                    "unknown role {s:?}: expected one of viewer, developer, admin, operator"
                ))
            })
    }
}

/// The longest token lifetime `expires_in` may ask for: 366 days (a year,
/// leap day included). Longer lifetimes are refused rather than clamped, so
/// nobody believes a token lasts longer than it does.
pub const MAX_EXPIRES_IN_SECS: u64 = 366 * 86_400;

/// Parses an `expires_in` duration (`90s`, `15m`, `1h30m`, `30d`) into
/// seconds: more than zero and at most [`MAX_EXPIRES_IN_SECS`]. The
/// messages name `field` (`expires_in`, `--expires-in`).
pub fn parse_expires_in(field: &str, text: &str) -> Result<u64, crate::Error> {
    // `parse_duration` uses checked arithmetic: an overflowing value is
    // `None`, never a wrapped one.
    match crate::resource::parse_duration(text) {
        Some(secs) if secs > MAX_EXPIRES_IN_SECS => Err(crate::Error::invalid(format!(
            "{field} {text:?} is too long: tokens may last at most 366d"
        ))),
        Some(secs) if secs > 0 => Ok(secs),
        // Digits only (a number too large for any unit) is still a
        // duration that is too long rather than a malformed one.
        None if is_overflowing_duration(text) => Err(crate::Error::invalid(format!(
            "{field} {text:?} is too long: tokens may last at most 366d"
        ))),
        _ => Err(crate::Error::invalid(format!(
            "{field} {text:?} is not valid: use a duration such as 1h or 30d"
        ))),
    }
}

/// Whether `text` is well formed (`<digits><unit>…`) but too large to count.
fn is_overflowing_duration(text: &str) -> bool {
    let mut digits = false;
    let mut well_formed = !text.is_empty();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits = true;
        } else if matches!(c, 's' | 'm' | 'h' | 'd') && digits {
            digits = false;
        } else {
            well_formed = false;
        }
    }
    well_formed && !digits && crate::resource::parse_duration(text).is_none()
}

/// Whether an identity is a person or an automation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum IdentityKind {
    /// A person; their top-level agents count against `max_agents_per_developer`.
    Developer,
    /// An automation (CI, a bot); exempt from the per-developer cap.
    Service,
}

impl IdentityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Developer => "developer",
            IdentityKind::Service => "service",
        }
    }
}

impl FromStr for IdentityKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "developer" => Ok(IdentityKind::Developer),
            "service" => Ok(IdentityKind::Service),
            _ => Err(crate::Error::invalid(format!(
                "unknown identity kind {s:?}: expected developer or service"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_nest() {
        for p in Permission::ALL {
            if Role::Viewer.allows(*p) {
                assert!(Role::Developer.allows(*p), "{p}");
            }
            if Role::Developer.allows(*p) {
                assert!(Role::Admin.allows(*p), "{p}");
            }
            if Role::Admin.allows(*p) {
                assert!(Role::Operator.allows(*p), "{p}");
            }
        }
    }

    #[test]
    fn roles_are_ordered_by_what_they_hold() {
        assert!(Role::Viewer < Role::Developer);
        assert!(Role::Developer < Role::Admin);
        assert!(Role::Admin < Role::Operator);
        for pair in Role::ALL.windows(2) {
            assert!(pair[0] < pair[1]);
        }
    }

    #[test]
    fn expires_in_is_bounded() {
        assert_eq!(parse_expires_in("expires_in", "1h").unwrap(), 3600);
        assert_eq!(
            parse_expires_in("expires_in", "366d").unwrap(),
            MAX_EXPIRES_IN_SECS
        );
        for long in [
            "367d",
            "8785h",
            "99999999999999d",
            "18446744073709551615s",
            "99999999999999999999999d",
        ] {
            let e = parse_expires_in("expires_in", long).unwrap_err();
            assert_eq!(
                e.message,
                format!("expires_in {long:?} is too long: tokens may last at most 366d")
            );
        }
        for bad in ["soon", "0s", "", "12", "d"] {
            let e = parse_expires_in("--expires-in", bad).unwrap_err();
            assert!(
                e.message
                    .starts_with(&format!("--expires-in {bad:?} is not valid")),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn only_operators_see_and_manage_nodes() {
        for p in [Permission::NodeRead, Permission::NodeManage] {
            assert!(!Role::Admin.allows(p), "{p}");
            assert!(Role::Operator.allows(p), "{p}");
        }
    }

    #[test]
    fn only_operators_create_tenants() {
        assert!(!Role::Admin.allows(Permission::TenantCreate));
        assert!(Role::Operator.allows(Permission::TenantCreate));
    }

    #[test]
    fn flush_needs_pool_config_delete_which_developers_lack() {
        assert!(!Role::Developer.allows(Permission::PoolConfigDelete));
        assert!(Role::Admin.allows(Permission::PoolConfigDelete));
    }
}
