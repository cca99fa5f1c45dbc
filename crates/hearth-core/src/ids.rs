//! Typed identifiers, so a tenant id can never be passed where a VM id is
//! expected. All are UUIDv7 (time-ordered) underneath.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub uuid::Uuid);

        impl $name {
            /// A fresh, time-ordered id.
            pub fn new() -> Self {
                $name(uuid::Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                uuid::Uuid::parse_str(s).map($name)
            }
        }
    };
}

typed_id!(
    /// A tenant: the unit of isolation.
    TenantId
);
typed_id!(
    /// A developer or service profile inside a tenant.
    IdentityId
);
typed_id!(
    /// One bearer token (its public half; the secret is only ever hashed).
    TokenId
);
typed_id!(
    /// One VM.
    VmId
);
typed_id!(
    /// One agent.
    AgentId
);
typed_id!(
    /// One provisioning run (an instance record).
    InstanceId
);
typed_id!(
    /// One node: a host that runs VMs for the control plane.
    NodeId
);
