//! Provider passwords, encrypted at rest.
//!
//! Each PEC mailbox has a single provider login; its password is the one
//! secret pecgate cannot avoid holding. It is kept in `state_dir/vault.bin`,
//! encrypted with XChaCha20-Poly1305 under a 32-byte key that lives in a
//! separate key file (by default delivered by systemd as a credential), so a
//! copy of the state directory or of its backups alone reveals nothing.
//!
//! File format (version 1):
//!
//! ```text
//! "PECGATE-VAULT" 0x01 | 24-byte random nonce | ciphertext + 16-byte tag
//! ```
//!
//! The 14-byte magic (including the version byte) is the associated data, so
//! a file cannot be relabelled as another version without failing
//! authentication. The plaintext is a record count followed by
//! length-prefixed (u32 little-endian) name/secret pairs. Every write picks a
//! fresh nonce and replaces the file atomically.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use zeroize::Zeroizing;

/// File name of the vault inside the state directory.
pub const VAULT_FILE_NAME: &str = "vault.bin";

/// Length of the vault key in bytes.
pub const KEY_LEN: usize = 32;

const MAGIC_PREFIX: &[u8; 13] = b"PECGATE-VAULT";
const FORMAT_VERSION: u8 = 1;
const MAGIC: &[u8; 14] = b"PECGATE-VAULT\x01";
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = MAGIC.len() + NONCE_LEN;

/// Errors from the key file or the vault file. They name files and say what
/// is wrong, but never contain key material or secrets.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vault key file {} does not exist", path.display())]
    KeyMissing { path: PathBuf },
    #[error("invalid vault key file {}: {reason}", path.display())]
    KeyInvalid { path: PathBuf, reason: String },
    #[error(
        "cannot decrypt vault {}: wrong vault key or the file was damaged or tampered with",
        path.display()
    )]
    Decrypt { path: PathBuf },
    #[error("invalid vault file {}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> VaultError + '_ {
    move |source| VaultError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A secret string (a provider password) that is wiped from memory when
/// dropped and never shown by `Debug`.
#[derive(Clone, Default)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(secret: String) -> Self {
        Self(Zeroizing::new(secret))
    }

    /// The secret itself; keep the borrow short and never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for SecretString {
    fn from(secret: String) -> Self {
        Self::new(secret)
    }
}

impl From<Zeroizing<String>> for SecretString {
    /// Moves the buffer out (no copy), leaving an empty string behind.
    fn from(mut secret: Zeroizing<String>) -> Self {
        Self::new(std::mem::take(&mut *secret))
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

/// The 32-byte vault key, wiped from memory when dropped.
#[derive(Clone)]
pub struct VaultKey(Zeroizing<[u8; KEY_LEN]>);

impl VaultKey {
    /// A new random key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(&mut key[..]);
        Self(key)
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The key file contents: standard base64 and a newline.
    pub fn to_file_contents(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::with_capacity(64));
        BASE64.encode_string(&self.0[..], &mut text);
        text.push('\n');
        text
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(&self.0[..]))
    }
}

impl fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VaultKey(<redacted>)")
    }
}

/// Reads a key file (base64 of 32 bytes; surrounding whitespace ignored).
/// A key file readable by group or others is accepted with a warning, since
/// The vault a running pecgate uses: the one at `vault_path` opened with the key at
/// `key_path`, or, when neither exists yet, an empty one (under a throwaway key: nothing is
/// written until `pecgate vault set`). The flag says whether a vault existed.
pub fn open_or_empty(key_path: &Path, vault_path: &Path) -> Result<(Vault, bool), VaultError> {
    match load_key(key_path) {
        Ok(key) => Ok((Vault::open(vault_path, key)?, true)),
        Err(VaultError::KeyMissing { .. }) if !vault_path.exists() => {
            Ok((Vault::open(vault_path, VaultKey::generate())?, false))
        }
        Err(error) => Err(error),
    }
}

/// refusing to start over it would be worse than running.
pub fn load_key(path: &Path) -> Result<VaultKey, VaultError> {
    let invalid = |reason: &str| VaultError::KeyInvalid {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let bytes = Zeroizing::new(fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            VaultError::KeyMissing {
                path: path.to_owned(),
            }
        } else {
            io_error(path)(source)
        }
    })?);
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
            "vault key file is accessible to group or others; it should be mode 0600 or 0400"
        );
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| invalid("not base64 text"))?;
    let mut decoded = Zeroizing::new(Vec::with_capacity(KEY_LEN + 3));
    BASE64
        .decode_vec(text.trim(), &mut decoded)
        .map_err(|_| invalid("not valid base64"))?;
    let key: [u8; KEY_LEN] = decoded[..].try_into().map_err(|_| {
        invalid(&format!(
            "the key must be {KEY_LEN} bytes, found {}",
            decoded.len()
        ))
    })?;
    Ok(VaultKey::from_bytes(key))
}

/// Loads the key file, creating it with a new random key (mode 0600) when it
/// does not exist. The parent directory must already exist.
pub fn load_or_create_key(path: &Path) -> Result<VaultKey, VaultError> {
    match load_key(path) {
        Err(VaultError::KeyMissing { .. }) => {}
        other => return other,
    }
    let key = VaultKey::generate();
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    let mut file = match created {
        Ok(file) => file,
        // Someone else created it in the meantime: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return load_key(path),
        Err(e) => return Err(io_error(path)(e)),
    };
    let written = file
        .write_all(key.to_file_contents().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_error(path));
    if let Err(e) = written {
        // Do not leave a half-written key behind for the next run to choke on.
        let _ = fs::remove_file(path);
        return Err(e);
    }
    sync_parent_dir(path)?;
    tracing::info!(path = %path.display(), "created a new vault key");
    Ok(key)
}

/// The decrypted vault: mailbox name → provider password.
pub struct Vault {
    path: PathBuf,
    key: VaultKey,
    entries: BTreeMap<String, SecretString>,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("path", &self.path)
            .field("names", &self.entries.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// Opens and decrypts the vault at `path`. A missing file is an empty
    /// vault (nothing stored yet); it is created by the first [`Vault::set`].
    pub fn open(path: &Path, key: VaultKey) -> Result<Vault, VaultError> {
        let entries = match fs::read(path) {
            Ok(data) => decrypt(path, &key, &data)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io_error(path)(e)),
        };
        Ok(Vault {
            path: path.to_owned(),
            key,
            entries,
        })
    }

    /// For the CLI that edits the vault: opens `vault_path` with the key in
    /// `key_path`, creating the key only when no vault exists yet. A missing
    /// key next to an existing vault is an error rather than a fresh key,
    /// which could never decrypt it.
    pub fn open_or_create(vault_path: &Path, key_path: &Path) -> Result<Vault, VaultError> {
        let vault_exists = fs::symlink_metadata(vault_path).is_ok();
        let key = if vault_exists {
            load_key(key_path)?
        } else {
            load_or_create_key(key_path)?
        };
        Vault::open(vault_path, key)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, mailbox: &str) -> Option<SecretString> {
        self.entries.get(mailbox).cloned()
    }

    pub fn contains(&self, mailbox: &str) -> bool {
        self.entries.contains_key(mailbox)
    }

    /// Stores the secret for `mailbox` and rewrites the vault file. On error
    /// the in-memory vault is left as it was.
    pub fn set(&mut self, mailbox: &str, secret: SecretString) -> Result<(), VaultError> {
        let previous = self.entries.insert(mailbox.to_owned(), secret);
        if let Err(e) = self.save() {
            match previous {
                Some(old) => self.entries.insert(mailbox.to_owned(), old),
                None => self.entries.remove(mailbox),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Removes the secret for `mailbox`; returns whether there was one. The
    /// file is only rewritten when something was removed.
    pub fn remove(&mut self, mailbox: &str) -> Result<bool, VaultError> {
        let Some(old) = self.entries.remove(mailbox) else {
            return Ok(false);
        };
        if let Err(e) = self.save() {
            self.entries.insert(mailbox.to_owned(), old);
            return Err(e);
        }
        Ok(true)
    }

    /// The mailbox names that have a secret, sorted.
    pub fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn save(&self) -> Result<(), VaultError> {
        let plaintext = serialize(&self.entries);
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = self
            .key
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plaintext,
                    aad: MAGIC,
                },
            )
            .map_err(|_| VaultError::Format {
                path: self.path.clone(),
                reason: "encryption failed".to_owned(),
            })?;
        let mut data = Vec::with_capacity(HEADER_LEN + ciphertext.len());
        data.extend_from_slice(MAGIC);
        data.extend_from_slice(&nonce);
        data.extend_from_slice(&ciphertext);
        write_atomically(&self.path, &data)
    }
}

fn decrypt(
    path: &Path,
    key: &VaultKey,
    data: &[u8],
) -> Result<BTreeMap<String, SecretString>, VaultError> {
    let format = |reason: String| VaultError::Format {
        path: path.to_owned(),
        reason,
    };
    if !data.starts_with(MAGIC_PREFIX) {
        // Also catches files truncated inside the magic; saying "not a vault"
        // for a 3-byte stub is still the useful answer.
        return Err(format("not a pecgate vault file".to_owned()));
    }
    match data.get(MAGIC_PREFIX.len()) {
        Some(&FORMAT_VERSION) => {}
        Some(v) => return Err(format(format!("unsupported vault format version {v}"))),
        None => return Err(format("the file is truncated".to_owned())),
    }
    if data.len() < HEADER_LEN + TAG_LEN {
        return Err(format(format!(
            "the file is truncated ({} bytes, a vault has at least {})",
            data.len(),
            HEADER_LEN + TAG_LEN
        )));
    }
    let (header, ciphertext) = data.split_at(HEADER_LEN);
    let nonce = XNonce::from_slice(&header[MAGIC.len()..]);
    let plaintext = Zeroizing::new(
        key.cipher()
            .decrypt(
                nonce,
                Payload {
                    msg: ciphertext,
                    aad: MAGIC,
                },
            )
            .map_err(|_| VaultError::Decrypt {
                path: path.to_owned(),
            })?,
    );
    // The plaintext is authenticated, so a parse failure means a bug or a
    // writer of a different format, not an attacker.
    deserialize(&plaintext).ok_or_else(|| format("corrupt contents".to_owned()))
}

fn serialize(entries: &BTreeMap<String, SecretString>) -> Zeroizing<Vec<u8>> {
    // Exact capacity: growing the buffer would leave unzeroized copies.
    let len = 4 + entries
        .iter()
        .map(|(name, secret)| 8 + name.len() + secret.expose().len())
        .sum::<usize>();
    let mut out = Zeroizing::new(Vec::with_capacity(len));
    let put = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (name, secret) in entries {
        put(&mut out, name.as_bytes());
        put(&mut out, secret.expose().as_bytes());
    }
    debug_assert_eq!(out.len(), len);
    out
}

fn deserialize(mut input: &[u8]) -> Option<BTreeMap<String, SecretString>> {
    fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = input.split_at_checked(n)?;
        *input = rest;
        Some(head)
    }
    fn take_u32(input: &mut &[u8]) -> Option<usize> {
        let bytes = take(input, 4)?;
        Some(u32::from_le_bytes(bytes.try_into().ok()?) as usize)
    }
    fn take_str<'a>(input: &mut &'a [u8]) -> Option<&'a str> {
        let len = take_u32(input)?;
        std::str::from_utf8(take(input, len)?).ok()
    }
    let count = take_u32(&mut input)?;
    let mut entries = BTreeMap::new();
    for _ in 0..count {
        let name = take_str(&mut input)?.to_owned();
        let secret = SecretString::new(take_str(&mut input)?.to_owned());
        entries.insert(name, secret);
    }
    input.is_empty().then_some(entries)
}

/// Replaces `path` with `data` so that a crash leaves either the old or the
/// new file, never a mix: write a 0600 temporary file in the same directory,
/// fsync it, rename it over `path`, fsync the directory.
fn write_atomically(path: &Path, data: &[u8]) -> Result<(), VaultError> {
    let dir = parent_dir(path);
    let file_name = path.file_name().map_or_else(
        || VAULT_FILE_NAME.into(),
        |name| name.to_string_lossy().into_owned(),
    );
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{:016x}",
        std::process::id(),
        rand::rngs::OsRng.next_u64()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_error(&tmp))?;
        file.write_all(data)
            .and_then(|()| file.sync_all())
            .map_err(io_error(&tmp))?;
        fs::rename(&tmp, path).map_err(io_error(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_parent_dir(path)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Makes a just-created or renamed directory entry durable.
fn sync_parent_dir(path: &Path) -> Result<(), VaultError> {
    let dir = parent_dir(path);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!(
                "pecgate-vault-test-{}-{:016x}",
                std::process::id(),
                rand::rngs::OsRng.next_u64()
            ));
            fs::create_dir(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const SECRET: &str = "Pr0vider-S3cret!";

    fn vault_with_secret(dir: &TempDir) -> (PathBuf, VaultKey) {
        let path = dir.0.join(VAULT_FILE_NAME);
        let key = VaultKey::generate();
        let mut vault = Vault::open(&path, key.clone()).unwrap();
        vault
            .set("studio", SecretString::new(SECRET.to_owned()))
            .unwrap();
        (path, key)
    }

    #[test]
    fn missing_file_is_empty_vault() {
        let dir = TempDir::new();
        let vault = Vault::open(&dir.0.join(VAULT_FILE_NAME), VaultKey::generate()).unwrap();
        assert!(vault.names().is_empty());
        assert!(vault.get("studio").is_none());
    }

    #[test]
    fn round_trip_across_reopen() {
        let dir = TempDir::new();
        let (path, key) = vault_with_secret(&dir);
        let mut vault = Vault::open(&path, key.clone()).unwrap();
        vault
            .set("other", SecretString::new(String::new()))
            .unwrap();
        vault
            .set("ünïcode", SecretString::new("pässwörd €".to_owned()))
            .unwrap();
        let vault = Vault::open(&path, key).unwrap();
        assert_eq!(vault.names(), ["other", "studio", "ünïcode"]);
        assert_eq!(vault.get("studio").unwrap().expose(), SECRET);
        assert_eq!(vault.get("other").unwrap().expose(), "");
        assert_eq!(vault.get("ünïcode").unwrap().expose(), "pässwörd €");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn overwrite_and_remove() {
        let dir = TempDir::new();
        let (path, key) = vault_with_secret(&dir);
        let mut vault = Vault::open(&path, key.clone()).unwrap();
        vault
            .set("studio", SecretString::new("new".to_owned()))
            .unwrap();
        assert_eq!(
            Vault::open(&path, key.clone())
                .unwrap()
                .get("studio")
                .unwrap()
                .expose(),
            "new"
        );
        assert!(vault.remove("studio").unwrap());
        assert!(!vault.remove("studio").unwrap());
        assert!(Vault::open(&path, key).unwrap().names().is_empty());
        // Only the vault itself is left: no temporary files.
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 1);
    }

    #[test]
    fn every_write_uses_a_fresh_nonce() {
        let dir = TempDir::new();
        let (path, key) = vault_with_secret(&dir);
        let first = fs::read(&path).unwrap();
        let mut vault = Vault::open(&path, key).unwrap();
        vault
            .set("studio", SecretString::new(SECRET.to_owned()))
            .unwrap();
        let second = fs::read(&path).unwrap();
        assert_ne!(
            first[MAGIC.len()..HEADER_LEN],
            second[MAGIC.len()..HEADER_LEN]
        );
    }

    #[test]
    fn file_does_not_contain_plaintext() {
        let dir = TempDir::new();
        let (path, _) = vault_with_secret(&dir);
        let data = fs::read(&path).unwrap();
        assert!(data.starts_with(MAGIC));
        assert!(!data.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()));
        assert!(!data.windows(6).any(|w| w == b"studio"));
    }

    #[test]
    fn wrong_key_fails_to_decrypt() {
        let dir = TempDir::new();
        let (path, _) = vault_with_secret(&dir);
        let err = Vault::open(&path, VaultKey::generate()).unwrap_err();
        assert!(matches!(err, VaultError::Decrypt { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("wrong vault key"), "{msg}");
        assert!(msg.contains(VAULT_FILE_NAME), "{msg}");
    }

    #[test]
    fn tampering_is_detected() {
        let dir = TempDir::new();
        let (path, key) = vault_with_secret(&dir);
        let original = fs::read(&path).unwrap();
        // A flipped bit in the nonce, the ciphertext or the tag.
        for pos in [MAGIC.len(), HEADER_LEN, original.len() - 1] {
            let mut data = original.clone();
            data[pos] ^= 0x01;
            fs::write(&path, &data).unwrap();
            let err = Vault::open(&path, key.clone()).unwrap_err();
            assert!(matches!(err, VaultError::Decrypt { .. }), "{pos}: {err:?}");
        }
        // The version byte is authenticated too, but is checked first.
        let mut data = original.clone();
        data[MAGIC_PREFIX.len()] = 2;
        fs::write(&path, &data).unwrap();
        let err = Vault::open(&path, key).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn truncation_is_detected() {
        let dir = TempDir::new();
        let (path, key) = vault_with_secret(&dir);
        let original = fs::read(&path).unwrap();
        for len in [0, 5, MAGIC_PREFIX.len(), MAGIC.len(), HEADER_LEN + 3] {
            fs::write(&path, &original[..len]).unwrap();
            let err = Vault::open(&path, key.clone()).unwrap_err();
            assert!(matches!(err, VaultError::Format { .. }), "{len}: {err:?}");
        }
        fs::write(&path, &original[..original.len() - 1]).unwrap();
        let err = Vault::open(&path, key.clone()).unwrap_err();
        assert!(matches!(err, VaultError::Decrypt { .. }), "{err:?}");
        fs::write(&path, b"some other file").unwrap();
        let err = Vault::open(&path, key).unwrap_err();
        assert!(err.to_string().contains("not a pecgate vault"), "{err}");
    }

    #[test]
    fn key_file_created_0600_and_reloaded() {
        let dir = TempDir::new();
        let path = dir.0.join("vault.key");
        assert!(matches!(
            load_key(&path),
            Err(VaultError::KeyMissing { .. })
        ));
        let created = load_or_create_key(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'));
        assert_eq!(BASE64.decode(text.trim()).unwrap().len(), KEY_LEN);
        // Loading again (either way) returns the same key.
        assert_eq!(*load_key(&path).unwrap().0, *created.0);
        assert_eq!(*load_or_create_key(&path).unwrap().0, *created.0);
    }

    #[test]
    fn key_file_needs_existing_parent() {
        let dir = TempDir::new();
        let err = load_or_create_key(&dir.0.join("missing/vault.key")).unwrap_err();
        assert!(matches!(err, VaultError::Io { .. }), "{err:?}");
    }

    #[test]
    fn invalid_key_files() {
        let dir = TempDir::new();
        let path = dir.0.join("vault.key");
        for (contents, reason) in [
            (&b"not base64!!\n"[..], "base64"),
            (BASE64.encode([7u8; 16]).as_bytes(), "found 16"),
            (b"", "found 0"),
            (b"\xff\xfe", "base64"),
        ] {
            fs::write(&path, contents).unwrap();
            let err = load_key(&path).unwrap_err();
            assert!(matches!(err, VaultError::KeyInvalid { .. }), "{err:?}");
            assert!(err.to_string().contains(reason), "{err}");
        }
        // Whitespace around the base64 is fine.
        fs::write(&path, format!("  {}\r\n\n", BASE64.encode([7u8; 32]))).unwrap();
        assert_eq!(*load_key(&path).unwrap().0, [7u8; 32]);
    }

    #[test]
    fn open_or_create_refuses_new_key_for_existing_vault() {
        let dir = TempDir::new();
        let vault_path = dir.0.join(VAULT_FILE_NAME);
        let key_path = dir.0.join("vault.key");
        let mut vault = Vault::open_or_create(&vault_path, &key_path).unwrap();
        vault
            .set("studio", SecretString::new(SECRET.to_owned()))
            .unwrap();
        let vault = Vault::open_or_create(&vault_path, &key_path).unwrap();
        assert_eq!(vault.get("studio").unwrap().expose(), SECRET);
        fs::remove_file(&key_path).unwrap();
        let err = Vault::open_or_create(&vault_path, &key_path).unwrap_err();
        assert!(matches!(err, VaultError::KeyMissing { .. }), "{err:?}");
        assert!(!key_path.exists());
    }

    #[test]
    fn debug_output_is_redacted() {
        let secret = SecretString::new(SECRET.to_owned());
        assert!(!format!("{secret:?}").contains(SECRET));
        let key = VaultKey::from_bytes([0x41; KEY_LEN]);
        let shown = format!("{key:?}");
        assert!(!shown.contains("AAAA") && !shown.contains("65"), "{shown}");
        let dir = TempDir::new();
        let (path, key) = vault_with_secret(&dir);
        let vault = Vault::open(&path, key).unwrap();
        let shown = format!("{vault:?}");
        assert!(
            shown.contains("studio") && !shown.contains(SECRET),
            "{shown}"
        );
    }

    #[test]
    fn secret_string_from_zeroizing_moves() {
        let secret = SecretString::from(Zeroizing::new("abc".to_owned()));
        assert_eq!(secret.expose(), "abc");
        assert!(!secret.is_empty());
    }

    #[test]
    fn serialization_round_trip_and_rejects_garbage() {
        let mut entries = BTreeMap::new();
        entries.insert("a".to_owned(), SecretString::new("1".to_owned()));
        entries.insert("b".to_owned(), SecretString::new("22".to_owned()));
        let bytes = serialize(&entries);
        let back = deserialize(&bytes).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back["b"].expose(), "22");
        assert!(deserialize(&bytes[..bytes.len() - 1]).is_none());
        let mut extra = bytes.to_vec();
        extra.push(0);
        assert!(deserialize(&extra).is_none());
        assert!(deserialize(&[0xff, 0xff, 0xff, 0xff]).is_none());
    }
}
