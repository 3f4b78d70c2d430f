//! Bearer tokens on the listener: the ingest API's clients and the status page's
//! operators. A token is read once from the config (inline, a file, or the
//! environment), kept only as its SHA-256, and a request's token is compared against
//! every entry's digest without stopping at the first match.

use std::path::Path;

use axum::http::{header, HeaderMap};
use sha2::{Digest as _, Sha256};

use crate::secret::{Secret, Sources};

/// Tokens shorter than this are refused: a bearer token is the caller's only proof.
pub const MIN_TOKEN_LEN: usize = 16;

/// What the listener keeps of a token.
pub type Digest = [u8; 32];

/// The SHA-256 of a token.
pub fn digest(token: &str) -> Digest {
    Sha256::digest(token.as_bytes()).into()
}

/// Reads a configured token (`token`, `token_file` or `token_env`; exactly one), at
/// least [`MIN_TOKEN_LEN`] characters. Errors name the key (`token_file`).
pub fn read(
    inline: Option<&Secret>,
    file: Option<&Path>,
    env: Option<&str>,
) -> Result<Secret, (String, String)> {
    let src = Sources {
        key: "token",
        inline,
        file,
        env,
    };
    match src.read()? {
        None => Err((
            "token".into(),
            "one of token, token_file, token_env is required".into(),
        )),
        Some(t) if t.expose().len() < MIN_TOKEN_LEN => Err((
            "token".into(),
            format!("must be at least {MIN_TOKEN_LEN} characters"),
        )),
        Some(t) => Ok(t),
    }
}

/// The entry whose token the request's `Authorization: Bearer …` carries.
pub fn find<'a, T>(
    headers: &HeaderMap,
    entries: &'a [T],
    digest_of: impl Fn(&T) -> &Digest,
) -> Option<&'a T> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let d = digest(token.trim());
    // Every byte of every entry is compared: no early exit for timing to reveal.
    let mut found = None;
    for e in entries {
        let diff = digest_of(e)
            .iter()
            .zip(d.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            found = Some(e);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_token_finds_its_entry_and_nothing_else_does() {
        let entries = [
            ("a", digest("token-a-0123456789")),
            ("b", digest("token-b-0123456789")),
        ];
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            find(&h, &entries, |e| &e.1).map(|e| e.0)
        };
        assert_eq!(with("Bearer token-b-0123456789"), Some("b"));
        assert_eq!(with("bearer  token-a-0123456789 "), Some("a"));
        assert_eq!(with("Bearer token-c-0123456789"), None);
        assert_eq!(with("Basic token-a-0123456789"), None);
        assert_eq!(find(&HeaderMap::new(), &entries, |e| &e.1), None);
    }
}
