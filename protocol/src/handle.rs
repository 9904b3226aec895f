//! User handles: 1 to 64 characters of `a-z 0-9 . _ -`.

/// Longest handle, in bytes.
pub const MAX_HANDLE_LEN: usize = 64;

/// Why a handle is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// The handle is empty.
    #[error("a handle cannot be empty")]
    Empty,
    /// The handle is longer than [`MAX_HANDLE_LEN`].
    #[error("a handle has at most {MAX_HANDLE_LEN} characters, got {0}")]
    TooLong(usize),
    /// The handle holds a character outside `a-z 0-9 . _ -`.
    #[error("a handle may only use a-z 0-9 . _ - (found {0:?})")]
    BadChar(char),
}

/// Checks a handle's syntax.
pub fn validate_handle(handle: &str) -> Result<(), HandleError> {
    if handle.is_empty() {
        return Err(HandleError::Empty);
    }
    if handle.len() > MAX_HANDLE_LEN {
        return Err(HandleError::TooLong(handle.len()));
    }
    match handle.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-')) {
        Some(c) => Err(HandleError::BadChar(c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects() {
        assert_eq!(validate_handle("alice.b_c-9"), Ok(()));
        assert_eq!(validate_handle(""), Err(HandleError::Empty));
        assert_eq!(validate_handle("Alice"), Err(HandleError::BadChar('A')));
        assert_eq!(validate_handle("a\0"), Err(HandleError::BadChar('\0')));
        assert_eq!(validate_handle(&"a".repeat(65)), Err(HandleError::TooLong(65)));
        assert_eq!(validate_handle(&"a".repeat(64)), Ok(()));
    }
}
