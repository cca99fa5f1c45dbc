//! The server's secrets key: which file it comes from, making it on a
//! store's first start, and unlocking the store with it
//! ([`hearth_store::secrets`]).
//!
//! **Invariant:** a key is made only when the store holds no sealed secret
//! (no key check): a server that lost its key, or is pointed at another
//! replica's database without that replica's key, refuses to start rather
//! than write new secrets with a key that cannot open the old ones.

use anyhow::{Context, bail};
use hearth_store::Store;
use hearth_store::secrets::SecretsKey;
use std::path::Path;
use std::sync::Arc;

/// The key's file in the data dir, when `--secrets-key-file` names none.
pub const SECRETS_KEY_FILE: &str = "secrets.key";

/// Reads the key (`given`, else `<data_dir>/secrets.key`, made on first
/// start) and unlocks `store` with it: from here on secrets are sealed on
/// write and opened on read, and older plaintext ones are sealed now.
pub async fn unlock(
    store: &Arc<dyn Store>,
    data_dir: &Path,
    given: Option<&Path>,
) -> anyhow::Result<()> {
    let path = given.map_or_else(|| data_dir.join(SECRETS_KEY_FILE), Path::to_owned);
    let exists = path
        .try_exists()
        .with_context(|| format!("cannot look for the secrets key file {}", path.display()))?;
    let made = !exists;
    let key = if exists {
        SecretsKey::read_file(&path)
            .map_err(|e| anyhow::anyhow!("the secrets key file {} {e}", path.display()))?
    } else if given.is_some() {
        bail!(
            "the secrets key file {} does not exist (--secrets-key-file names a key the operator provides: 64 hex digits, mode 0600)",
            path.display()
        );
    } else if store
        .secrets_sealed()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the store's secrets key check: {e}"))?
    {
        bail!(
            "the store holds secrets sealed with a secrets key, but {} does not exist: restore that key file, or pass --secrets-key-file with it (a new key would not open them)",
            path.display()
        );
    } else {
        SecretsKey::create_file(&path)
            .with_context(|| format!("cannot write a new secrets key to {}", path.display()))?
    };
    match store.unlock_secrets(key).await {
        Ok(sealed) => {
            if made {
                tracing::info!(path = %path.display(), "first start: made the secrets key (keep it with the data dir; every replica needs the same one)");
            }
            if sealed > 0 {
                tracing::info!(resources = sealed, "sealed the secrets stored as plaintext");
            }
            Ok(())
        }
        Err(e) => {
            // A key made just now that the store refuses (another replica
            // made its own first) is of no use to anyone.
            if made {
                let _ = std::fs::remove_file(&path);
            }
            bail!(
                "cannot unlock the store's secrets with {}: {}",
                path.display(),
                hearth_api::error::chain(&e)
            )
        }
    }
}
