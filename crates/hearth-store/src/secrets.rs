//! Secrets at rest: the values of an environment's `env` and repo URLs that
//! carry a credential are sealed (XChaCha20-Poly1305, a random 192-bit
//! nonce per value) before a spec reaches the database, and opened when it
//! is read back, so every reader above the store (API, runner) sees
//! plaintext and a copied database file or backup shows none of them.
//!
//! The key is never in the database: it is a 32-byte key the server reads
//! from a file (`<data-dir>/secrets.key`, 0600, or one the operator names)
//! and hands to [`Store::unlock_secrets`](crate::Store::unlock_secrets).
//! The database keeps only a *key check* (a known text sealed with the
//! key), so a server given no key, or another key, over sealed data is
//! refused instead of silently writing with a new one.
//!
//! A sealed value reads `hearth-sealed:v1:<base64url(nonce ‖ ciphertext ‖
//! tag)>`: versioned and self-describing, so a later format (or key
//! rotation) can tell its values apart.

use crate::{Result, StoreError};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, Generate, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hearth_core::resource::Kind;
use hearth_core::resource::secrets::{SecretField, for_each_secret};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::OnceLock;

/// What every sealed value starts with (format version 1).
pub const SEALED_PREFIX: &str = "hearth-sealed:v1:";
/// Length of the key in bytes.
const KEY_LEN: usize = 32;
/// Length of an XChaCha20 nonce in bytes.
const NONCE_LEN: usize = 24;
/// The text sealed into the database's key check.
const CHECK_TEXT: &str = "hearth secrets key check v1";

/// Whether `text` is a sealed value (of any key).
pub fn is_sealed(text: &str) -> bool {
    text.starts_with(SEALED_PREFIX)
}

/// The key secrets are sealed with. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct SecretsKey {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsKey(..)")
    }
}

impl SecretsKey {
    /// A new random key and its file form (64 hex digits and a newline).
    pub fn generate() -> (SecretsKey, String) {
        let bytes = chacha20poly1305::Key::generate();
        let text = format!("{}\n", hex::encode(bytes.as_slice()));
        (SecretsKey::from_bytes(bytes.as_slice()), text)
    }

    fn from_bytes(bytes: &[u8]) -> SecretsKey {
        SecretsKey {
            cipher: XChaCha20Poly1305::new_from_slice(bytes).expect("a 32-byte key"),
        }
    }

    /// Reads a key from its file form: 64 hex digits (surrounding
    /// whitespace ignored). The error says what is wrong, never the key.
    pub fn parse(text: &str) -> std::result::Result<SecretsKey, String> {
        let text = text.trim();
        let bytes = hex::decode(text)
            .map_err(|_| format!("is not a secrets key: expected {} hex digits", KEY_LEN * 2))?;
        if bytes.len() != KEY_LEN {
            return Err(format!(
                "is not a secrets key: expected {} hex digits, found {}",
                KEY_LEN * 2,
                text.len()
            ));
        }
        Ok(SecretsKey::from_bytes(&bytes))
    }

    /// Reads the key file at `path`, which must be readable by its owner
    /// only (mode 0600 or stricter): a key anyone on the host can read
    /// protects nothing.
    pub fn read_file(path: &Path) -> std::result::Result<SecretsKey, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("cannot be read: {e}"))?;
        let mode = file
            .metadata()
            .map_err(|e| format!("cannot be read: {e}"))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "is readable by others (mode {:o}): make it 0600 (chmod 600)",
                mode & 0o777
            ));
        }
        let text = std::io::read_to_string(file).map_err(|e| format!("cannot be read: {e}"))?;
        SecretsKey::parse(&text)
    }

    /// Makes a new key and writes it to `path` (which must not exist),
    /// mode 0600, synced to disk before it is returned.
    pub fn create_file(path: &Path) -> std::io::Result<SecretsKey> {
        let (key, text) = SecretsKey::generate();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        Ok(key)
    }

    /// Seals `plaintext` with a fresh random nonce.
    pub fn seal(&self, plaintext: &str) -> String {
        let nonce = XNonce::generate();
        let sealed = self
            .cipher
            .encrypt(&nonce, plaintext.as_bytes())
            .expect("XChaCha20-Poly1305 seals any text that fits in memory");
        let mut bytes = Vec::with_capacity(NONCE_LEN + sealed.len());
        bytes.extend_from_slice(nonce.as_slice());
        bytes.extend_from_slice(&sealed);
        format!("{SEALED_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Opens a value [`SecretsKey::seal`] made; `None` when it is not one,
    /// was sealed with another key, or was altered.
    pub fn open(&self, sealed: &str) -> Option<String> {
        let body = sealed.strip_prefix(SEALED_PREFIX)?;
        let bytes = URL_SAFE_NO_PAD.decode(body).ok()?;
        if bytes.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).ok()?;
        let plain = self.cipher.decrypt(&nonce, ciphertext).ok()?;
        String::from_utf8(plain).ok()
    }

    /// The key check kept in the database: proof of which key sealed it.
    pub(crate) fn check(&self) -> String {
        self.seal(CHECK_TEXT)
    }

    /// Whether `check` was made by this key.
    pub(crate) fn verifies(&self, check: &str) -> bool {
        self.open(check).as_deref() == Some(CHECK_TEXT)
    }
}

/// A store's key, once unlocked. Shared by the store's clones.
#[derive(Debug, Default)]
pub(crate) struct Secrets {
    key: OnceLock<SecretsKey>,
}

impl Secrets {
    pub(crate) fn key(&self) -> Option<&SecretsKey> {
        self.key.get()
    }

    /// Installs the key (the first one stays: a store is unlocked once).
    pub(crate) fn install(&self, key: SecretsKey) {
        let _ = self.key.set(key);
    }

    /// The text of `spec` as stored: with a key, every secret sealed;
    /// without one (a store never unlocked: tests, benchmarks), as given.
    pub(crate) fn seal_spec(&self, kind: Kind, spec: &serde_json::Value) -> String {
        match self.key() {
            Some(key) => seal_with(key, kind, spec),
            None => spec.to_string(),
        }
    }
}

/// The text of `spec` with every secret sealed with `key`.
pub(crate) fn seal_with(key: &SecretsKey, kind: Kind, spec: &serde_json::Value) -> String {
    let mut spec = spec.clone();
    let _ = for_each_secret::<()>(kind, &mut spec, |field, text| {
        if field.holds_secret(text) {
            *text = key.seal(text);
        }
        Ok(())
    });
    spec.to_string()
}

/// Opens every sealed value of `spec` with `key`; returns whether any
/// secret was still plaintext (so sealing it would change the row).
pub(crate) fn open_with(
    key: Option<&SecretsKey>,
    kind: Kind,
    name: &str,
    spec: &mut serde_json::Value,
) -> Result<bool> {
    let mut plaintext = false;
    for_each_secret(kind, spec, |field, text| {
        if !is_sealed(text) {
            plaintext |= field.holds_secret(text);
            return Ok(());
        }
        let what = match field {
            SecretField::EnvValue => "an env value",
            SecretField::RepoUrl => "a repo URL",
        };
        let Some(key) = key else {
            return Err(StoreError::SecretsLocked(format!(
                "{kind} {name:?} holds {what} sealed with a secrets key, and none was given"
            )));
        };
        match key.open(text) {
            Some(plain) => {
                *text = plain;
                Ok(())
            }
            None => Err(StoreError::SecretsLocked(format!(
                "{what} of {kind} {name:?} does not open with this secrets key (another key sealed it, or it was altered)"
            ))),
        }
    })?;
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seal_and_open_round_trip_with_fresh_nonces() {
        let (key, text) = SecretsKey::generate();
        assert_eq!(text.trim().len(), 64);
        let a = key.seal("hunter2");
        let b = key.seal("hunter2");
        assert!(
            a.starts_with(SEALED_PREFIX) && !a.contains("hunter2"),
            "{a}"
        );
        assert_ne!(a, b, "each seal has its own nonce");
        assert_eq!(key.open(&a).as_deref(), Some("hunter2"));
        assert_eq!(key.open(&key.seal("")).as_deref(), Some(""));
        // Nothing of a sealed value is shell, URL or JSON syntax.
        assert!(
            a[SEALED_PREFIX.len()..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }

    #[test]
    fn another_key_or_an_altered_value_does_not_open() {
        let (key, _) = SecretsKey::generate();
        let (other, _) = SecretsKey::generate();
        let sealed = key.seal("hunter2");
        assert_eq!(other.open(&sealed), None);
        assert!(key.verifies(&key.check()));
        assert!(!other.verifies(&key.check()));
        // Flip one character of the ciphertext: the tag refuses it.
        let mut altered = sealed.clone().into_bytes();
        let last = altered.len() - 3;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(key.open(&String::from_utf8(altered).unwrap()), None);
        for bad in [
            "",
            SEALED_PREFIX,
            "hearth-sealed:v1:!!!",
            "hearth-sealed:v1:AAAA",
        ] {
            assert_eq!(key.open(bad), None, "{bad}");
        }
        assert_eq!(key.open("hearth-sealed:v2:AAAA"), None);
    }

    #[test]
    fn key_files_are_hex_and_parse_errors_say_why() {
        let (_, text) = SecretsKey::generate();
        assert!(SecretsKey::parse(&text).is_ok());
        assert!(SecretsKey::parse(&format!("  {}  ", text.trim())).is_ok());
        assert_eq!(
            SecretsKey::parse("abcd").unwrap_err(),
            "is not a secrets key: expected 64 hex digits, found 4"
        );
        assert_eq!(
            SecretsKey::parse("not hex").unwrap_err(),
            "is not a secrets key: expected 64 hex digits"
        );
    }

    #[test]
    fn key_files_are_0600_and_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let key = SecretsKey::create_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let read = SecretsKey::read_file(&path).unwrap();
        assert_eq!(read.open(&key.seal("x")).as_deref(), Some("x"));
        // Never overwritten.
        assert!(SecretsKey::create_file(&path).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            SecretsKey::read_file(&path).unwrap_err(),
            "is readable by others (mode 644): make it 0600 (chmod 600)"
        );
    }

    #[test]
    fn specs_are_sealed_only_where_secrets_are_and_open_back() {
        let secrets = Secrets::default();
        let env = json!({"driver": "sandbox", "env": {"TOKEN": "t0ps3cret"}, "cpus": 2});
        // Never unlocked: stored as given.
        assert_eq!(secrets.seal_spec(Kind::Environment, &env), env.to_string());
        let (key, _) = SecretsKey::generate();
        secrets.install(key);
        let stored = secrets.seal_spec(Kind::Environment, &env);
        assert!(
            !stored.contains("t0ps3cret") && stored.contains("\"cpus\":2"),
            "{stored}"
        );
        let mut read: serde_json::Value = serde_json::from_str(&stored).unwrap();
        open_with(secrets.key(), Kind::Environment, "dev", &mut read).unwrap();
        assert_eq!(read, env);

        let ws = json!({"environment": "dev", "repos": [
            {"url": "https://deploy:pw@git.example/r.git"},
            {"url": "git://git.example/open.git"}
        ]});
        let stored = secrets.seal_spec(Kind::Workspace, &ws);
        assert!(
            !stored.contains("pw@") && !stored.contains("deploy"),
            "{stored}"
        );
        assert!(stored.contains("git://git.example/open.git"), "{stored}");
        let mut read: serde_json::Value = serde_json::from_str(&stored).unwrap();
        assert!(!open_with(secrets.key(), Kind::Workspace, "web", &mut read).unwrap());
        assert_eq!(read, ws);
        // Other kinds are stored as they are.
        let image = json!({"driver": "sandbox", "env": {"A": "b"}});
        assert_eq!(secrets.seal_spec(Kind::Image, &image), image.to_string());
    }

    #[test]
    fn sealed_specs_without_the_key_or_with_another_are_refused_by_name() {
        let (key, _) = SecretsKey::generate();
        let mut spec = json!({"env": {"A": key.seal("x")}});
        let e = open_with(None, Kind::Environment, "dev", &mut spec.clone()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "environment \"dev\" holds an env value sealed with a secrets key, and none was given"
        );
        let (other, _) = SecretsKey::generate();
        let e = open_with(Some(&other), Kind::Environment, "dev", &mut spec).unwrap_err();
        assert_eq!(
            e.to_string(),
            "an env value of environment \"dev\" does not open with this secrets key (another key sealed it, or it was altered)"
        );
        // Plaintext left from before is reported, so it can be sealed.
        let mut old = json!({"env": {"A": "plain"}});
        assert!(open_with(Some(&key), Kind::Environment, "dev", &mut old).unwrap());
    }
}
