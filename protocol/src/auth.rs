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
//! identity   = "tern/1 identity-keys\0"  handle_len:u8  handle  device_id:u32
//!              curve25519:[32]  ed25519:[32]
//! one_time   = "tern/1 one-time-key\0"  handle_len:u8  handle  device_id:u32
//!              fallback:u8  key_id:u64  public_key:[32]
//! ```
//!
//! The last two are the key service's statements ([`identity_keys`],
//! [`one_time_key`]): a device's login key signs its end-to-end identity keys,
//! and the identity's Ed25519 key signs each one-time and fallback key, so a
//! device that claims them can check both against the login key the device
//! list names.
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

/// The bytes a device's login key signs to bind its end-to-end identity
/// keys (`IdentityKeys`) to `handle` and `device_id`.
pub fn identity_keys(handle: &str, device_id: u32, curve25519: &[u8; 32], ed25519: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(21 + 1 + handle.len() + 4 + 64);
    out.extend_from_slice(b"tern/1 identity-keys\0");
    push_handle(&mut out, handle);
    out.extend_from_slice(&device_id.to_be_bytes());
    out.extend_from_slice(curve25519);
    out.extend_from_slice(ed25519);
    out
}

/// The bytes a device's identity Ed25519 key signs for one of its one-time
/// keys (`fallback` false) or its fallback key (`fallback` true).
pub fn one_time_key(handle: &str, device_id: u32, fallback: bool, key_id: u64, public_key: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + 1 + handle.len() + 4 + 1 + 8 + 32);
    out.extend_from_slice(b"tern/1 one-time-key\0");
    push_handle(&mut out, handle);
    out.extend_from_slice(&device_id.to_be_bytes());
    out.push(u8::from(fallback));
    out.extend_from_slice(&key_id.to_be_bytes());
    out.extend_from_slice(public_key);
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

    #[test]
    fn key_statements_differ_by_every_field() {
        let base = identity_keys("alice", 1, &[1; 32], &[2; 32]);
        for v in [
            identity_keys("alicf", 1, &[1; 32], &[2; 32]),
            identity_keys("alice", 2, &[1; 32], &[2; 32]),
            identity_keys("alice", 1, &[9; 32], &[2; 32]),
            identity_keys("alice", 1, &[1; 32], &[9; 32]),
        ] {
            assert_ne!(v, base);
        }
        let base = one_time_key("alice", 1, false, 7, &[3; 32]);
        for v in [
            one_time_key("alicf", 1, false, 7, &[3; 32]),
            one_time_key("alice", 2, false, 7, &[3; 32]),
            one_time_key("alice", 1, true, 7, &[3; 32]),
            one_time_key("alice", 1, false, 8, &[3; 32]),
            one_time_key("alice", 1, false, 7, &[4; 32]),
        ] {
            assert_ne!(v, base);
        }
        assert_ne!(base[..20], identity_keys("alice", 1, &[3; 32], &[3; 32])[..20], "the purposes differ");
    }

    /// `bytes[0] = start, bytes[1] = start + 1, ...`
    fn counting(start: u8) -> [u8; 32] {
        std::array::from_fn(|i| start + i as u8)
    }

    /// HKDF-Expand-Label of RFC 8446 section 7.1, with SHA-256.
    fn hkdf_expand_label(secret: &[u8], label: &[u8], context: &[u8], len: usize) -> Vec<u8> {
        use ring::hmac;
        let full_label = [b"tls13 ", label].concat();
        let mut info = (len as u16).to_be_bytes().to_vec();
        info.push(full_label.len() as u8);
        info.extend_from_slice(&full_label);
        info.push(context.len() as u8);
        info.extend_from_slice(context);
        // HKDF-Expand (RFC 5869): T(i) = HMAC(secret, T(i-1) || info || i).
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let (mut out, mut t) = (Vec::new(), Vec::new());
        for i in 1u8.. {
            if out.len() >= len {
                break;
            }
            t = hmac::sign(&key, &[&t[..], &info, &[i]].concat()).as_ref().to_vec();
            out.extend_from_slice(&t);
        }
        out.truncate(len);
        out
    }

    /// The TLS exporter of RFC 8446 section 7.5 for an empty context.
    fn tls_exporter(exporter_secret: &[u8], label: &[u8], len: usize) -> Vec<u8> {
        let empty_hash = ring::digest::digest(&ring::digest::SHA256, b"");
        let derived = hkdf_expand_label(exporter_secret, label, empty_hash.as_ref(), 32);
        hkdf_expand_label(&derived, b"exporter", empty_hash.as_ref(), len)
    }

    /// Every value of the test vectors in docs/protocol.md ("Test vectors"),
    /// computed here with the real transcript code: the test fails if the
    /// code or the page drifts.
    #[test]
    fn the_documented_login_test_vectors_hold() {
        use ed25519_dalek::{Signer, SigningKey};
        // Checked once against OpenSSL 3.0 (`s_client -keylogfile` gave the
        // EXPORTER_SECRET, `-keymatexport EXPORTER-tern/1-auth` the value).
        let openssl = tls_exporter(
            &hex::decode("79297748df4e099d378e34d2eaaecd8473357b9b7f4332885a8eadfd39e0e19e").unwrap(),
            EXPORTER_LABEL,
            EXPORTER_LEN,
        );
        assert_eq!(hex::encode(openssl), "3556e71f33ff4a283a37be919de1bafb26408a4d9e2a6209f9b3877a741dbe9e");

        let exporter: [u8; 32] = tls_exporter(&counting(0x40), EXPORTER_LABEL, EXPORTER_LEN).try_into().unwrap();
        let nonce = counting(0x80);
        let key = SigningKey::from_bytes(&counting(0x00));
        let public_key = key.verifying_key().to_bytes();
        let login = transcript(Purpose::Login, &exporter, &nonce, "alice", 1, &[0; 32]);
        let register = transcript(Purpose::Register, &exporter, &nonce, "alice", 0, &public_key);
        let approver = SigningKey::from_bytes(&counting(0x20));
        let approval = approval("alice", &public_key, 1_700_000_000_000);
        let approval_signature = hex::encode(approver.sign(&approval).to_bytes());
        let values = [
            ("exporter_master_secret", hex::encode(counting(0x40))),
            ("exporter", hex::encode(exporter)),
            ("nonce", hex::encode(nonce)),
            ("private_key", hex::encode(counting(0x00))),
            ("public_key", hex::encode(public_key)),
            ("login_transcript", hex::encode(&login)),
            ("login_signature", hex::encode(key.sign(&login).to_bytes())),
            ("register_transcript", hex::encode(&register)),
            ("register_signature", hex::encode(key.sign(&register).to_bytes())),
            ("approver_private_key", hex::encode(counting(0x20))),
            ("approver_public_key", hex::encode(approver.verifying_key().to_bytes())),
            ("approval", hex::encode(&approval)),
            ("approval_signature", approval_signature.clone()),
            ("token", format!("1.1700000000000.{approval_signature}")),
        ];
        // The page shows them as `name = hex`, long values wrapped over lines.
        let doc: String = include_str!("../../docs/protocol.md").split_whitespace().collect();
        let mut missing = Vec::new();
        for (name, value) in values {
            let line = format!("{name}={value}");
            if !doc.contains(&line) {
                missing.push(format!("{name} = {value}"));
            }
        }
        assert!(missing.is_empty(), "docs/protocol.md lacks or misstates:\n{}", missing.join("\n"));
    }
}
