//! What a device signs to prove it holds its key.
//!
//! Every login-type request signs a *transcript* that binds the signature to:
//! the broker's single-use nonce, this very TLS session (through a keying
//! material exporter value, RFC 5705/8446, so a signature relayed into another
//! connection is worthless), the purpose, the user and the device. Both ends
//! build it with the functions here, so the bytes cannot drift apart.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! transcript = "tern/1 auth\0"  purpose:u8  exporter:[32]  nonce:[32]
//!              handle_len:u8  handle  device_id:u32  public_key:[32]
//! approval   = "tern/1 approve\0"  handle_len:u8  handle  public_key:[32]
//!              expires_at_ms:u64
//! ```
//!
//! `device_id` is 0 and `public_key` the new key for `Register` and
//! `LinkDevice`; for `Login`, `device_id` is the device and `public_key` is 32
//! zero bytes.

/// Exporter label passed to TLS `export_keying_material`, with an empty context.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tern/1-auth";

/// Length of the exporter value.
pub const EXPORTER_LEN: usize = 32;

/// Length of a challenge nonce.
pub const NONCE_LEN: usize = 32;

/// Length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Which request a transcript authorises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    /// `Register`: claim a handle with a first device.
    Register = 1,
    /// `Login`: act as an existing device.
    Login = 2,
    /// `LinkDevice`: add a device with an approval.
    LinkDevice = 3,
}

/// The bytes a device signs for a login-type request.
pub fn transcript(
    purpose: Purpose,
    exporter: &[u8; EXPORTER_LEN],
    nonce: &[u8; NONCE_LEN],
    handle: &str,
    device_id: u32,
    public_key: &[u8; PUBLIC_KEY_LEN],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + 1 + 32 + 32 + 1 + handle.len() + 4 + 32);
    out.extend_from_slice(b"tern/1 auth\0");
    out.push(purpose as u8);
    out.extend_from_slice(exporter);
    out.extend_from_slice(nonce);
    push_handle(&mut out, handle);
    out.extend_from_slice(&device_id.to_be_bytes());
    out.extend_from_slice(public_key);
    out
}

/// The bytes an existing device signs to approve `public_key` joining `handle`.
pub fn approval(handle: &str, public_key: &[u8; PUBLIC_KEY_LEN], expires_at_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(15 + 1 + handle.len() + 32 + 8);
    out.extend_from_slice(b"tern/1 approve\0");
    push_handle(&mut out, handle);
    out.extend_from_slice(public_key);
    out.extend_from_slice(&expires_at_ms.to_be_bytes());
    out
}

fn push_handle(out: &mut Vec<u8>, handle: &str) {
    // Handles are validated to at most 64 bytes before anything is signed or
    // verified; a longer one is cut here, and so never matches a valid handle.
    let bytes = &handle.as_bytes()[..handle.len().min(255)];
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcripts_differ_by_every_field() {
        let base = transcript(Purpose::Login, &[1; 32], &[2; 32], "alice", 1, &[0; 32]);
        let variants = [
            transcript(Purpose::Register, &[1; 32], &[2; 32], "alice", 1, &[0; 32]),
            transcript(Purpose::Login, &[9; 32], &[2; 32], "alice", 1, &[0; 32]),
            transcript(Purpose::Login, &[1; 32], &[9; 32], "alice", 1, &[0; 32]),
            transcript(Purpose::Login, &[1; 32], &[2; 32], "alicf", 1, &[0; 32]),
            transcript(Purpose::Login, &[1; 32], &[2; 32], "alice", 2, &[0; 32]),
            transcript(Purpose::Login, &[1; 32], &[2; 32], "alice", 1, &[9; 32]),
        ];
        for v in variants {
            assert_ne!(v, base);
        }
        // The length prefix keeps ("ab", device) and ("a", ...) apart.
        assert_ne!(
            transcript(Purpose::Login, &[1; 32], &[2; 32], "ab", 1, &[0; 32]),
            transcript(Purpose::Login, &[1; 32], &[2; 32], "a", 1, &[0; 32]),
        );
    }
}
