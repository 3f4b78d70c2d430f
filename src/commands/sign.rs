//! Command signatures: Ed25519 over the RFC 8785 (JCS) canonical form of the envelope.
//!
//! The signed bytes are the envelope object without its `signature` member, serialised as
//! JSON Canonicalization Scheme text: members sorted by their UTF-16 code units, no
//! whitespace, strings escaped as ECMAScript's `JSON.stringify` does, numbers written as
//! ECMAScript writes doubles. Any JCS library (Python `jcs`, JavaScript `canonicalize`,
//! Go `webpki.org/jsoncanonicalizer`, …) produces the same bytes, so any tool can sign.
//! `signature` is the standard base64 (with padding) of the 64-byte signature.
//!
//! Keys: private keys are PKCS#8 PEM files (what `openssl genpkey -algorithm ed25519`
//! writes, and what `labgate keygen` writes with mode 0600); public keys in the config are
//! the standard base64 of the raw 32 bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
/// Why a key could not be read or written.
pub enum KeyError {
    #[error("{path}: {source}")]
    /// The key file cannot be read or written.
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    #[error("{path}: not an Ed25519 PKCS#8 PEM private key ({detail})")]
    /// The file is not a key of the expected kind.
    NotAKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with its contents.
        detail: String,
    },
    #[error("public key: {0}")]
    /// A public key in the config is not base64 of 32 bytes.
    Public(String),
    #[error("{0}: exists already (remove it first, keys are not overwritten)")]
    /// `keygen` will not overwrite an existing key.
    Exists(PathBuf),
}

/// Appends the JCS form of `v` to `out`.
pub fn canonical_into(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match n.as_f64() {
            Some(f) => out.push_str(&es_number(f)),
            None => out.push_str("null"),
        },
        Value::String(s) => push_string(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_into(x, out);
            }
            out.push(']');
        }
        Value::Object(o) => canonical_object(o, None, out),
    }
}

fn canonical_object(o: &Map<String, Value>, skip: Option<&str>, out: &mut String) {
    let mut keys: Vec<&String> = o.keys().filter(|k| Some(k.as_str()) != skip).collect();
    keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
    out.push('{');
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_string(k, out);
        out.push(':');
        canonical_into(&o[k.as_str()], out);
    }
    out.push('}');
}

/// The bytes a command's signature covers: the envelope without `signature`, in JCS.
pub fn signing_input(envelope: &Map<String, Value>) -> String {
    let mut s = String::with_capacity(256);
    canonical_object(envelope, Some("signature"), &mut s);
    s
}

/// JSON string escaping as ECMAScript's `JSON.stringify` does it (and JCS requires).
fn push_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{0c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A finite double as ECMAScript's `Number.prototype.toString` writes it.
pub fn es_number(f: f64) -> String {
    if f == 0.0 || !f.is_finite() {
        return "0".into();
    }
    // Rust's `{:e}` gives the shortest digits that round-trip, as ECMAScript requires.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let k = digits.len() as i32;
    let n = exp.parse::<i32>().unwrap_or(0) + 1; // value = 0.digits × 10^n
    let mut s = String::new();
    if f < 0.0 {
        s.push('-');
    }
    if k <= n && n <= 21 {
        s.push_str(&digits);
        s.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        s.push_str(&digits[..n as usize]);
        s.push('.');
        s.push_str(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        s.push_str("0.");
        s.extend(std::iter::repeat_n('0', (-n) as usize));
        s.push_str(&digits);
    } else {
        s.push_str(&digits[..1]);
        if k > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        let e = n - 1;
        s.push('e');
        s.push(if e < 0 { '-' } else { '+' });
        s.push_str(&e.abs().to_string());
    }
    s
}

/// Signs an envelope in place: sets `signature`.
pub fn sign(envelope: &mut Map<String, Value>, key: &SigningKey) {
    let sig = key.sign(signing_input(envelope).as_bytes());
    envelope.insert("signature".into(), B64.encode(sig.to_bytes()).into());
}

/// Why a signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureError {
    /// The signature is not base64 of 64 bytes.
    Encoding(String),
    /// The signature does not match the command and the issuer's key.
    Mismatch,
}

/// Checks `signature` (base64) over the envelope with `key`.
pub fn verify(
    envelope: &Map<String, Value>,
    signature: &str,
    key: &VerifyingKey,
) -> Result<(), SignatureError> {
    let bytes = B64
        .decode(signature)
        .map_err(|e| SignatureError::Encoding(format!("signature is not base64: {e}")))?;
    let bytes: [u8; 64] = bytes.try_into().map_err(|b: Vec<u8>| {
        SignatureError::Encoding(format!("signature must be 64 bytes, got {}", b.len()))
    })?;
    key.verify_strict(
        signing_input(envelope).as_bytes(),
        &Signature::from_bytes(&bytes),
    )
    .map_err(|_| SignatureError::Mismatch)
}

/// A public key from its base64 text.
pub fn parse_public(b64: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = B64
        .decode(b64.trim())
        .map_err(|e| KeyError::Public(format!("not base64: {e}")))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| KeyError::Public(format!("must be 32 bytes, got {}", b.len())))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| KeyError::Public(e.to_string()))
}

/// The form of a public key that `[[commands.operators]]` takes.
pub fn public_base64(key: &VerifyingKey) -> String {
    B64.encode(key.to_bytes())
}

/// Reads a PKCS#8 PEM private key.
pub fn load_private(path: &Path) -> Result<SigningKey, KeyError> {
    let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| KeyError::NotAKey {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// A fresh key from the kernel's random source.
pub fn generate() -> Result<SigningKey, KeyError> {
    let mut seed = [0u8; 32];
    let path = Path::new("/dev/urandom");
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes `<stem>.key` (PKCS#8 PEM, mode 0600) and `<stem>.pub` (base64 public key, and
/// the PEM form after it). Refuses to overwrite.
pub fn write_pair(stem: &Path, key: &SigningKey) -> Result<(PathBuf, PathBuf), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let private = stem.with_extension("key");
    let public = stem.with_extension("pub");
    for p in [&private, &public] {
        if p.exists() {
            return Err(KeyError::Exists(p.clone()));
        }
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeyError::Io { path, source }
    };
    // PKCS#8 v1 (no public key inside): the form openssl and Python's cryptography read.
    let pem = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    }
    .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
    .map_err(|e| KeyError::NotAKey {
        path: private.clone(),
        detail: e.to_string(),
    })?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private)
        .map_err(io(&private))?;
    f.write_all(pem.as_bytes()).map_err(io(&private))?;
    f.sync_all().map_err(io(&private))?;
    let vk = key.verifying_key();
    let pub_pem = vk
        .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .unwrap_or_default();
    std::fs::write(&public, format!("{}\n{pub_pem}", public_base64(&vk))).map_err(io(&public))?;
    Ok((private, public))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    #[allow(clippy::excessive_precision)] // RFC 8785's own test values, as printed there
    fn numbers_are_written_as_ecmascript_does() {
        // RFC 8785 appendix B and ECMAScript Number::toString examples.
        for (f, s) in [
            (0.0, "0"),
            (-0.0, "0"),
            (1.0, "1"),
            (-1.5, "-1.5"),
            (4.50, "4.5"),
            (2e-3, "0.002"),
            (1e-6, "0.000001"),
            (1e-7, "1e-7"),
            (1.5e-7, "1.5e-7"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (123456789012345680000.0, "123456789012345680000"),
            (333333333.33333329, "333333333.3333333"),
            (1e30, "1e+30"),
            (0.000000000000000000000000001, "1e-27"),
            (9007199254740992.0, "9007199254740992"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (0.1, "0.1"),
        ] {
            assert_eq!(es_number(f), s, "{f:e}");
        }
    }

    #[test]
    fn canonical_form_sorts_members_and_drops_the_signature() {
        let v = json!({"b": [1, "x\n\u{1}", null, true], "a": {"z": 1.0, "é": "\"\\"}, "signature": "zz"});
        let Value::Object(o) = v else { unreachable!() };
        assert_eq!(
            signing_input(&o),
            r#"{"a":{"z":1,"é":"\"\\"},"b":[1,"x\n\u0001",null,true]}"#
        );
    }

    #[test]
    fn members_sort_by_utf16_code_units_not_bytes() {
        // U+FB01 sorts after U+1F600 in UTF-16 (surrogates 0xD83D < 0xFB01), before in UTF-8.
        let v = json!({"\u{fb01}": 1, "\u{1f600}": 2});
        let Value::Object(o) = v else { unreachable!() };
        assert_eq!(signing_input(&o), "{\"\u{1f600}\":2,\"\u{fb01}\":1}");
    }

    #[test]
    fn signature_verifies_and_any_change_breaks_it() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let mut env = json!({"command_id":"c1","command":"stop","params":{"x":0.1}})
            .as_object()
            .cloned()
            .unwrap_or_default();
        sign(&mut env, &key);
        let sig = env["signature"].as_str().unwrap_or("").to_string();
        assert_eq!(verify(&env, &sig, &key.verifying_key()), Ok(()));
        env.insert("command".into(), "start".into());
        assert_eq!(
            verify(&env, &sig, &key.verifying_key()),
            Err(SignatureError::Mismatch)
        );
        assert!(matches!(
            verify(&env, "!!", &key.verifying_key()),
            Err(SignatureError::Encoding(_))
        ));
    }

    #[test]
    fn key_files_round_trip_with_private_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = generate().unwrap();
        let (private, public) = write_pair(&dir.path().join("alice"), &key).unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_private(&private).unwrap().to_bytes(), key.to_bytes());
        let text = std::fs::read_to_string(public).unwrap();
        let first = text.lines().next().unwrap_or("");
        assert_eq!(parse_public(first).unwrap(), key.verifying_key());
        assert!(matches!(
            write_pair(&dir.path().join("alice"), &key),
            Err(KeyError::Exists(_))
        ));
    }
}

#[cfg(test)]
mod readme_example {
    //! The worked example in README.md ("Signed commands"), checked so the two cannot
    //! drift apart. Python's `jcs` and `cryptography` give the same bytes and signature.

    pub const PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIAEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEB
-----END PRIVATE KEY-----
";
    pub const PUBLIC: &str = "iojj3XQJ8ZX9UtstPLpdcspnCb8dlBIb83SIAbQPb1w=";
    pub const CANONICAL: &str = r#"{"command":"pause","command_id":"0b6b5b8e-3c1a-4b8e-9d5e-2f1a7c3d9e01","issued_at":"2026-11-21T10:30:00.000Z","issuer":"alice","params":{},"target":{"agent":"lab-pc-07","device":"pstat-1"},"ttl":"30s","type":"command"}"#;
    pub const SIGNATURE: &str =
        "i0np6P6edbuVnAuiFneQ969sejrZ7Ucsv28lSFNoY66yMeawwUTR+HV2JrDGT1ArLBhljkuqDY2FpICYLYzbBg==";

    #[test]
    fn the_readme_example_signs_as_documented() {
        use ed25519_dalek::pkcs8::DecodePrivateKey;
        let readme = include_str!("../../README.md");
        for text in [
            PRIVATE_PEM.lines().nth(1).unwrap_or("-"),
            PUBLIC,
            CANONICAL,
            SIGNATURE,
        ] {
            assert!(readme.contains(text), "README.md lacks {text}");
        }
        let key = ed25519_dalek::SigningKey::from_pkcs8_pem(PRIVATE_PEM).unwrap();
        assert_eq!(super::public_base64(&key.verifying_key()), PUBLIC);
        let mut env = serde_json::json!({
            "type": "command",
            "command_id": "0b6b5b8e-3c1a-4b8e-9d5e-2f1a7c3d9e01",
            "command": "pause",
            "issued_at": "2026-11-21T10:30:00.000Z",
            "ttl": "30s",
            "target": {"agent": "lab-pc-07", "device": "pstat-1"},
            "params": {},
            "issuer": "alice"
        })
        .as_object()
        .cloned()
        .unwrap_or_default();
        assert_eq!(super::signing_input(&env), CANONICAL);
        super::sign(&mut env, &key);
        assert_eq!(env["signature"], SIGNATURE);
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = super::write_pair(&dir.path().join("k"), &key).unwrap();
        assert_eq!(std::fs::read_to_string(p).unwrap(), PRIVATE_PEM);
    }
}
