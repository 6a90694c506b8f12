//! Container image references, parsed by the distribution grammar (the one `docker pull`
//! and registries use): `[registry[:port]/]path[:tag][@algorithm:digest]`.
//!
//! The first path component is a registry only if it looks like a host: it contains `.` or
//! `:`, or is `localhost`, or is an IPv6 literal in brackets. So `registry.example.com:5000/app:1`
//! has a registry with a port and tag `1`, while `team/app:1` has none.

use std::fmt;

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host with optional port, e.g. `registry.example.com:5000`.
    pub registry: Option<String>,
    /// Path inside the registry, e.g. `team/app`.
    pub path: String,
    pub tag: Option<String>,
    /// `algorithm:hex`, e.g. `sha256:…`.
    pub digest: Option<String>,
}

/// Why a string is not an image reference.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reference:?} is not a valid image reference: {reason}")]
pub struct ImageRefError {
    pub reference: String,
    pub reason: &'static str,
}

fn is_path_component(s: &str) -> bool {
    // [a-z0-9]+ ((\.|_|__|-+)[a-z0-9]+)*
    let bytes = s.as_bytes();
    if bytes.is_empty() || !bytes[0].is_ascii_lowercase() && !bytes[0].is_ascii_digit() {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            i += 1;
            continue;
        }
        // A separator: '.', '_', '__' or one or more '-', followed by an alphanumeric.
        let start = i;
        match c {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if bytes.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start
            || !bytes
                .get(i)
                .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return false;
        }
    }
    true
}

fn is_host(s: &str) -> bool {
    if let Some(inner) = s.strip_prefix('[') {
        let (addr, rest) = match inner.split_once(']') {
            Some(parts) => parts,
            None => return false,
        };
        let port_ok = rest.is_empty()
            || rest
                .strip_prefix(':')
                .is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
        return !addr.is_empty()
            && addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':')
            && port_ok;
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if port.is_some_and(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_digit())) {
        return false;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_tag(s: &str) -> bool {
    // [\w][\w.-]{0,127}
    !s.is_empty()
        && s.len() <= 128
        && s.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
}

fn is_digest(s: &str) -> bool {
    match s.split_once(':') {
        Some((algorithm, hex)) => {
            !algorithm.is_empty()
                && algorithm.starts_with(|c: char| c.is_ascii_alphabetic())
                && algorithm
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+.-_".contains(c))
                && hex.len() >= 32
                && hex.chars().all(|c| c.is_ascii_hexdigit())
        }
        None => false,
    }
}

impl ImageRef {
    /// Parses a reference; rejects anything the distribution grammar rejects.
    pub fn parse(reference: &str) -> Result<Self, ImageRefError> {
        let err = |reason| ImageRefError {
            reference: reference.to_string(),
            reason,
        };
        if reference.is_empty() || reference.len() > 512 {
            return Err(err("empty or longer than 512 characters"));
        }
        let (name, digest) = match reference.split_once('@') {
            Some((n, d)) if is_digest(d) => (n, Some(d.to_string())),
            Some(_) => {
                return Err(err(
                    "the digest must be algorithm:hex with at least 32 hex digits",
                ));
            }
            None => (reference, None),
        };
        // The tag is after the last ':' that follows the last '/'.
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &name[last_slash + i + 1..];
                if !is_tag(tag) {
                    return Err(err(
                        "the tag must be 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'",
                    ));
                }
                (&name[..last_slash + i], Some(tag.to_string()))
            }
            None => (name, None),
        };
        let mut components: Vec<&str> = name.split('/').collect();
        let registry = match components.as_slice() {
            [first, _, ..]
                if first.contains('.')
                    || first.contains(':')
                    || *first == "localhost"
                    || first.starts_with('[') =>
            {
                if !is_host(first) {
                    return Err(err(
                        "the registry must be a host name or address with an optional port",
                    ));
                }
                Some(components.remove(0).to_string())
            }
            _ => None,
        };
        if components.iter().any(|c| !is_path_component(c)) {
            return Err(err(
                "path components must be lowercase letters and digits, separated by '.', '_', '__' or '-'",
            ));
        }
        Ok(Self {
            registry,
            path: components.join("/"),
            tag,
            digest,
        })
    }

    /// Registry and path, without tag or digest (what Helm charts call the repository).
    pub fn repository(&self) -> String {
        match &self.registry {
            Some(registry) => format!("{registry}/{}", self.path),
            None => self.path.clone(),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.repository())?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(s: &str) -> (Option<String>, String, Option<String>, Option<String>) {
        let r = ImageRef::parse(s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.to_string(), s, "round trip");
        (r.registry, r.path, r.tag, r.digest)
    }

    #[test]
    fn references_split_into_registry_path_tag_and_digest() {
        let d = format!("sha256:{}", "a".repeat(64));
        let s = |v: &str| Some(v.to_string());
        assert_eq!(parts("nginx"), (None, "nginx".into(), None, None));
        assert_eq!(parts("nginx:1.27"), (None, "nginx".into(), s("1.27"), None));
        assert_eq!(
            parts("team/app:v1"),
            (None, "team/app".into(), s("v1"), None)
        );
        assert_eq!(
            parts("registry.example.com:5000/team/app:1.2.3"),
            (
                s("registry.example.com:5000"),
                "team/app".into(),
                s("1.2.3"),
                None
            )
        );
        assert_eq!(
            parts("localhost:5000/app"),
            (s("localhost:5000"), "app".into(), None, None)
        );
        assert_eq!(
            parts("localhost/app:x"),
            (s("localhost"), "app".into(), s("x"), None)
        );
        assert_eq!(
            parts(&format!("nginx@{d}")),
            (None, "nginx".into(), None, Some(d.clone()))
        );
        assert_eq!(
            parts(&format!("reg.io:443/a/b_c/d__e/f-g:tag_1@{d}")),
            (
                s("reg.io:443"),
                "a/b_c/d__e/f-g".into(),
                s("tag_1"),
                Some(d.clone())
            )
        );
        assert_eq!(
            parts("[::1]:5000/app:1"),
            (s("[::1]:5000"), "app".into(), s("1"), None)
        );
        assert_eq!(
            ImageRef::parse("registry.example.com:5000/team/app:1")
                .unwrap()
                .repository(),
            "registry.example.com:5000/team/app"
        );
    }

    #[test]
    fn malformed_references_are_rejected() {
        for bad in [
            "",
            "Nginx",
            "team/App:1",
            "nginx:",
            "nginx:-1",
            "nginx@sha256:abc",
            "nginx@md5",
            "registry.example.com:port/app",
            "-registry.example.com/app",
            "app//x",
            "app/",
            "a..b",
            "app:1:2",
            "app name",
            "$(reboot)",
            "--help",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
