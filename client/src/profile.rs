//! The CLI's profile directory: `device.key` (the Ed25519 secret key, hex,
//! mode 0600) and `profile.json` (handle and device number). The directory
//! itself is made with mode 0700.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use tern_client::Identity;

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    handle: String,
    device_id: u32,
}

#[derive(Debug)]
pub(crate) struct Profile {
    dir: PathBuf,
}

impl Profile {
    /// `dir`, or `$HOME/.config/tern`, or `./.tern`.
    pub(crate) fn open(dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let dir = dir.unwrap_or_else(|| match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".config/tern"),
            None => PathBuf::from(".tern"),
        });
        Ok(Self { dir })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn key_path(&self) -> PathBuf {
        self.dir.join("device.key")
    }

    fn key(&self) -> anyhow::Result<Option<SigningKey>> {
        let path = self.key_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let bytes: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .with_context(|| format!("{} does not hold a device key", path.display()))?;
        Ok(Some(SigningKey::from_bytes(&bytes)))
    }

    /// The profile's key, made and saved first if there is none.
    pub(crate) fn key_or_create(&self) -> anyhow::Result<SigningKey> {
        if let Some(key) = self.key()? {
            return Ok(key);
        }
        let key = tern_client::generate_key();
        self.write_private("device.key", hex::encode(key.to_bytes()).as_bytes())?;
        Ok(key)
    }

    pub(crate) fn identity(&self) -> anyhow::Result<Option<Identity>> {
        let path = self.dir.join("profile.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let saved: Saved = serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
        let Some(signing_key) = self.key()? else {
            bail!("{} has no device.key; the profile is incomplete", self.dir.display());
        };
        Ok(Some(Identity { handle: saved.handle, device_id: saved.device_id, signing_key }))
    }

    pub(crate) fn require_identity(&self) -> anyhow::Result<Identity> {
        self.identity()?.with_context(|| {
            format!(
                "no profile at {}: run `tern --profile {} register USER` first",
                self.dir.display(),
                self.dir.display()
            )
        })
    }

    pub(crate) fn save(&self, identity: &Identity) -> anyhow::Result<()> {
        self.write_private("device.key", hex::encode(identity.signing_key.to_bytes()).as_bytes())?;
        let saved = Saved { handle: identity.handle.clone(), device_id: identity.device_id };
        self.write_private("profile.json", serde_json::to_string_pretty(&saved)?.as_bytes())
    }

    fn write_private(&self, name: &str, data: &[u8]) -> anyhow::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn saves_and_loads_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let p = Profile::open(Some(dir.path().join("p"))).unwrap();
        assert!(p.identity().unwrap().is_none());
        let id = Identity { handle: "alice".into(), device_id: 3, signing_key: tern_client::generate_key() };
        p.save(&id).unwrap();
        let back = p.identity().unwrap().unwrap();
        assert_eq!((back.handle.as_str(), back.device_id), ("alice", 3));
        assert_eq!(back.public_key(), id.public_key());
        let mode = std::fs::metadata(dir.path().join("p/device.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(dir.path().join("p")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
