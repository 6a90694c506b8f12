//! Pure pieces of an AppBuild's Jobs: child names, image destinations, build arguments,
//! buildpack platform env files, and the deep merge of Helm values (the deploy's values are
//! rendered in [`super::app`]). User strings only ever
//! become argv elements or file contents, never shell text.

use std::collections::BTreeMap;

use serde_json::Value;
use sha2::Digest;

use super::image::{ImageRef, ImageRefError};
use crate::crd::BuildVar;

/// A child name `<base>-<suffix>` that is a valid DNS label (≤ 63 characters) and stable:
/// when too long, the base is shortened and a hash of the full name keeps it unique.
pub fn child_name(base: &str, suffix: &str) -> String {
    let full = format!("{base}-{suffix}");
    if full.len() <= 63 {
        return full;
    }
    let hash = sha2::Sha256::digest(full.as_bytes());
    let short: String = hash.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let keep = 63 - suffix.len() - short.len() - 2;
    format!("{}-{short}-{suffix}", base[..keep].trim_end_matches('-'))
}

/// Where a build pushes: `<registry>/<namespace>/<app>:<tag>`, and its layer cache
/// `<registry>/<namespace>/<app>-cache` (namespaced, so equal app names in two projects never
/// share a cache).
pub fn destinations(
    registry: &str,
    namespace: &str,
    app: &str,
    tag: &str,
) -> Result<(ImageRef, ImageRef), ImageRefError> {
    let image = ImageRef::parse(&format!("{registry}/{namespace}/{app}:{tag}"))?;
    let cache = ImageRef::parse(&format!("{registry}/{namespace}/{app}-cache"))?;
    Ok((image, cache))
}

/// kaniko `--build-arg` arguments: one argv element per flag and per `KEY=value`, so values
/// with spaces, quotes, newlines or `$(…)` reach the build verbatim.
pub fn build_args(vars: &[BuildVar]) -> Vec<String> {
    vars.iter()
        .flat_map(|v| ["--build-arg".to_string(), format!("{}={}", v.key, v.value)])
        .collect()
}

/// Buildpack platform env files (`<platform>/env/<KEY>` holds the value, byte for byte), as
/// the data of a Secret mounted at `/platform/env`.
pub fn platform_env(vars: &[BuildVar]) -> BTreeMap<String, String> {
    vars.iter()
        .map(|v| (v.key.clone(), v.value.clone()))
        .collect()
}

/// Deep merge: objects merge key by key, anything else in `overlay` replaces `base`.
pub fn deep_merge(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(key) {
                    Some(existing) => deep_merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, overlay) => *base = overlay.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(key: &str, value: &str) -> BuildVar {
        BuildVar {
            key: key.into(),
            value: value.into(),
        }
    }

    #[test]
    fn child_names_are_stable_dns_labels() {
        assert_eq!(child_name("web-42", "build"), "web-42-build");
        let long = "a".repeat(60);
        let name = child_name(&long, "build");
        assert!(name.len() <= 63 && name.ends_with("-build"), "{name}");
        assert_eq!(name, child_name(&long, "build"), "not deterministic");
        assert_ne!(name, child_name(&format!("{long}b"), "build"), "collision");
    }

    #[test]
    fn destinations_keep_ports_and_namespace_the_cache() {
        let (image, cache) =
            destinations("registry.example.com:5000", "shop", "web", "abc1234").unwrap();
        assert_eq!(
            image.to_string(),
            "registry.example.com:5000/shop/web:abc1234"
        );
        assert_eq!(image.repository(), "registry.example.com:5000/shop/web");
        assert_eq!(
            cache.to_string(),
            "registry.example.com:5000/shop/web-cache"
        );
        assert!(destinations("registry.example.com", "shop", "web", "-bad").is_err());
    }

    #[test]
    fn hostile_build_vars_stay_data() {
        let vars = [
            var("A", "x y"),
            var("B", "$(reboot); rm -rf / `id`\nsecond line"),
            var("C", "--build-arg=EVIL=1"),
        ];
        assert_eq!(
            build_args(&vars),
            [
                "--build-arg",
                "A=x y",
                "--build-arg",
                "B=$(reboot); rm -rf / `id`\nsecond line",
                "--build-arg",
                "C=--build-arg=EVIL=1"
            ]
        );
        assert_eq!(
            platform_env(&vars)["B"],
            "$(reboot); rm -rf / `id`\nsecond line"
        );
    }
}
