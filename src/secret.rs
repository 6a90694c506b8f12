//! A string that must never be printed (tokens and keys in configuration), and how tokens
//! are hashed for storage. Configuration holds secrets as [`Secret`] from the first parse on:
//! clap parses flags and environment variables into it (through `From<String>`), serde the
//! file, so no `Debug` of arguments or configuration can show one.
//!
//! Depends on: nothing of this crate.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A secret string. `Debug` and `Display` print `***`; only [`Secret::expose`] reveals it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value, for the one place that needs it (a header, a hash).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

/// `sha256:<hex>` of a token: how tokens are stored and compared. Tokens are high-entropy
/// random strings, so a fast hash is enough (there is nothing to brute-force).
pub fn hash_token(token: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(token.as_bytes());
    format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// The token of an `Authorization: Bearer <token>` header value. The scheme is
/// case-insensitive (RFC 9110 §11.1): `bearer` and `BEARER` work too.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn clap_parses_flags_into_it() {
        use clap::Parser;
        #[derive(clap::Parser, Debug)]
        struct Args {
            #[arg(long)]
            key: Secret,
            #[arg(long, value_delimiter = ',')]
            keys: Vec<Secret>,
        }
        let args =
            Args::try_parse_from(["t", "--key", "hunter2", "--keys", "a-one,b-two"]).unwrap();
        assert_eq!(args.key.expose(), "hunter2");
        assert_eq!(args.keys, [Secret::new("a-one"), Secret::new("b-two")]);
        assert_eq!(format!("{args:?}"), "Args { key: ***, keys: [***, ***] }");
    }
}
