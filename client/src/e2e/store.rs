//! The state's files: `e2e.key` (32 random bytes, hex, mode 0600) and
//! `e2e.state` (the serialised state sealed with ChaCha20-Poly1305 under
//! that key, a fresh random 96-bit nonce per write).
//!
//! `e2e.state` is `MAGIC || nonce (12) || ciphertext || tag (16)`, the magic
//! bound in as associated data. A write goes to a 0600 temporary file that
//! is fsynced, renamed over the old state, and the directory fsynced, so a
//! crash leaves either the old state or the new one.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use super::E2eError;

/// File name of the at-rest key.
pub(super) const KEY_FILE: &str = "e2e.key";
/// File name of the sealed state.
pub(super) const STATE_FILE: &str = "e2e.state";
const TMP_FILE: &str = ".e2e.state.tmp";
const MAGIC: &[u8; 8] = b"TERNE2E1";

/// The directory and key the state lives under.
pub(super) struct StateFiles {
    dir: PathBuf,
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for StateFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateFiles").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> E2eError + '_ {
    move |source| E2eError::Io { path: path.to_path_buf(), source }
}

impl StateFiles {
    /// Opens `dir` (created with mode 0700 if missing) and its key, making a
    /// new key only when there is no state it would orphan.
    pub(super) fn open(dir: &Path) -> Result<Self, E2eError> {
        DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err(dir))?;
        let rng = SystemRandom::new();
        let key_path = dir.join(KEY_FILE);
        let key = match std::fs::read_to_string(&key_path) {
            Ok(text) => parse_key(&text).ok_or_else(|| E2eError::BadKeyFile(key_path.clone()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let state = dir.join(STATE_FILE);
                if state.exists() {
                    return Err(E2eError::MissingKey(state));
                }
                create_key(&key_path, &rng)?
            }
            Err(e) => return Err(io_err(&key_path)(e)),
        };
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key).map_err(|_| E2eError::BadKeyFile(key_path))?;
        Ok(Self { dir: dir.to_path_buf(), key: LessSafeKey::new(unbound), rng })
    }

    /// Path of the sealed state.
    pub(super) fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Reads and opens the state; `None` when there is none yet.
    pub(super) fn read(&self) -> Result<Option<Vec<u8>>, E2eError> {
        let path = self.state_path();
        let mut data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let corrupt = |reason: &str| E2eError::Corrupt { path: path.clone(), reason: reason.into() };
        if data.len() < MAGIC.len() + NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return Err(corrupt("too short"));
        }
        if &data[..MAGIC.len()] != MAGIC {
            return Err(corrupt("not a Tern end-to-end state file"));
        }
        let nonce_bytes: [u8; NONCE_LEN] =
            data[MAGIC.len()..MAGIC.len() + NONCE_LEN].try_into().map_err(|_| corrupt("too short"))?;
        let nonce = Nonce::assume_unique_for_key(nonce_bytes);
        let sealed = &mut data[MAGIC.len() + NONCE_LEN..];
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(MAGIC), sealed)
            .map_err(|_| corrupt("does not decrypt under e2e.key"))?;
        Ok(Some(plain.to_vec()))
    }

    /// Seals `plain` and replaces the state with it atomically.
    pub(super) fn write(&self, mut plain: Vec<u8>) -> Result<(), E2eError> {
        let mut nonce_bytes = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce_bytes).map_err(|_| rng_failed(&self.dir))?;
        let nonce = Nonce::assume_unique_for_key(nonce_bytes);
        let sealed = self.key.seal_in_place_append_tag(nonce, Aad::from(MAGIC), &mut plain);
        sealed.map_err(|_| rng_failed(&self.dir))?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + plain.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&plain);
        let tmp = self.dir.join(TMP_FILE);
        // A leftover from elsewhere could have a looser mode than ours.
        let _ = std::fs::remove_file(&tmp);
        write_private(&tmp, &out)?;
        let path = self.state_path();
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err(&self.dir))
    }
}

fn rng_failed(dir: &Path) -> E2eError {
    E2eError::Io { path: dir.to_path_buf(), source: std::io::Error::other("sealing the state failed") }
}

fn parse_key(text: &str) -> Option<[u8; 32]> {
    hex::decode(text.trim()).ok()?.try_into().ok()
}

fn create_key(path: &Path, rng: &SystemRandom) -> Result<[u8; 32], E2eError> {
    let mut key = [0u8; 32];
    rng.fill(&mut key).map_err(|_| rng_failed(path))?;
    let mut text = hex::encode(key);
    text.push('\n');
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io_err(path))?;
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(io_err(path))?;
    Ok(key)
}

/// Writes `data` to `path` (mode 0600, truncating) and fsyncs it.
fn write_private(path: &Path, data: &[u8]) -> Result<(), E2eError> {
    let mut file =
        OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io_err(path))?;
    file.write_all(data).and_then(|()| file.sync_all()).map_err(io_err(path))
}
