//! The client-chosen 128-bit message id.

use std::fmt;
use std::str::FromStr;

/// A 128-bit message id, chosen by the sending client (random). Shown as 32
/// lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

/// A byte string or text that is not a valid message id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a message id is 16 bytes (32 hex digits), got {0}")]
pub struct MessageIdError(pub String);

impl MessageId {
    /// A message id from a 16-byte slice.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, MessageIdError> {
        <[u8; 16]>::try_from(bytes).map(Self).map_err(|_| MessageIdError(format!("{} bytes", bytes.len())))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl FromStr for MessageId {
    type Err = MessageIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MessageIdError(format!("{s:?}"));
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let text = std::str::from_utf8(chunk).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = MessageId([0xab; 16]);
        assert_eq!(id.to_string().parse::<MessageId>(), Ok(id));
        assert!("xyz".parse::<MessageId>().is_err());
        assert!(MessageId::from_slice(&[1, 2, 3]).is_err());
    }
}
