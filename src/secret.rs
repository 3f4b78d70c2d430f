//! Secrets (passwords, keys, tokens): one type that never shows its value, and one reader
//! for the three places a secret can come from.
//!
//! [`Secret`] prints as `***` through `Debug`, `Display` and `Serialize`, so `labgate
//! check` (which systemd runs at every start, into the journal), `/status`, and every log
//! line show that a secret is set, never what it is. Only [`Secret::expose`] gives the
//! value, at the one place that hands it to a client library.

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Default, PartialEq, Eq)]
/// A password or token: never printed, logged or serialized as itself (`***`).
pub struct Secret(String);

impl Secret {
    /// Wraps a value read from a file, the environment or the config.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the client library that needs it. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Where a secret comes from, as written in the config: inline, a file (a systemd
/// credential, say), or an environment variable. At most one may be set.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    /// The inline key's name (`password`), for error messages; the file and env keys
    /// are this name with `_file` and `_env`.
    pub key: &'a str,
    /// The value written in the config, if any.
    pub inline: Option<&'a Secret>,
    /// A file holding it, if configured.
    pub file: Option<&'a Path>,
    /// An environment variable holding it, if configured.
    pub env: Option<&'a str>,
}

impl Sources<'_> {
    /// How many of the three are set.
    pub fn count(&self) -> usize {
        usize::from(self.inline.is_some())
            + usize::from(self.file.is_some())
            + usize::from(self.env.is_some())
    }

    /// Reads the secret. Errors name the key (`password_file: /x: No such file`). A
    /// file's trailing newline is not part of the secret.
    pub fn read(&self) -> Result<Option<Secret>, (String, String)> {
        if self.count() > 1 {
            return Err((
                self.key.to_string(),
                format!("set at most one of {0}, {0}_file, {0}_env", self.key),
            ));
        }
        if let Some(p) = self.inline {
            return Ok(Some(p.clone()));
        }
        if let Some(f) = self.file {
            let text = std::fs::read_to_string(f).map_err(|e| {
                (
                    format!("{}_file", self.key),
                    format!("{}: {e}", f.display()),
                )
            })?;
            return Ok(Some(Secret(
                text.trim_end_matches(['\r', '\n']).to_string(),
            )));
        }
        if let Some(var) = self.env {
            return std::env::var(var).map(|v| Some(Secret(v))).map_err(|_| {
                (
                    format!("{}_env", self.key),
                    format!("environment variable {var} is not set"),
                )
            });
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_shows_its_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        #[derive(Serialize, Deserialize, Debug)]
        struct C {
            password: Secret,
        }
        let c: C = toml::from_str("password = \"hunter2\"").unwrap();
        assert_eq!(c.password.expose(), "hunter2");
        assert!(!toml::to_string(&c).unwrap().contains("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn one_source_at_most_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        let inline = Secret::new("x");
        let src = |inline, file, env| Sources {
            key: "password",
            inline,
            file,
            env,
        };
        assert_eq!(
            src(None, Some(f.as_path()), None)
                .read()
                .unwrap()
                .unwrap()
                .expose(),
            "s3cret"
        );
        assert_eq!(src(None, None, None).read().unwrap(), None);
        let (k, _) = src(Some(&inline), Some(f.as_path()), None)
            .read()
            .unwrap_err();
        assert_eq!(k, "password");
        let (k, m) = src(None, Some(Path::new("/nonexistent/pw")), None)
            .read()
            .unwrap_err();
        assert_eq!(k, "password_file");
        assert!(m.contains("/nonexistent/pw"), "{m}");
        let (k, _) = src(None, None, Some("LABGATE_TEST_UNSET_VAR_XYZ"))
            .read()
            .unwrap_err();
        assert_eq!(k, "password_env");
    }
}
