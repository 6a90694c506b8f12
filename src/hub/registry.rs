//! Clusters the hub knows and their tokens. Tokens are stored only as SHA-256 hashes and
//! compared in constant time.
//!
//! A token is `sbt_<cluster id>_<64 hex chars of randomness>`: the id lets the hub find the
//! one hash to compare without scanning, and 256 random bits make a fast hash safe to store
//! (there is nothing to brute-force, unlike a password). This registry is in memory; the
//! persistent store builds on it.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// Identifier of a registered cluster (`c` followed by 16 hex characters).
pub type ClusterId = String;

/// What the hub records about a cluster.
#[derive(Clone, Debug)]
pub struct ClusterRecord {
    pub id: ClusterId,
    pub name: String,
    pub created: SystemTime,
    token_hash: [u8; 32],
}

/// The clusters the hub accepts tunnels from.
#[derive(Default)]
pub struct Registry {
    clusters: RwLock<HashMap<ClusterId, ClusterRecord>>,
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn new_token(id: &str) -> Secret {
    Secret::new(format!("sbt_{id}_{}", random_hex(32)))
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a cluster and returns its record and its token (shown once, never stored).
    pub fn register(&self, name: &str) -> (ClusterRecord, Secret) {
        let id = format!("c{}", random_hex(8));
        let token = new_token(&id);
        let record = ClusterRecord {
            id: id.clone(),
            name: name.to_string(),
            created: SystemTime::now(),
            token_hash: hash(token.expose()),
        };
        self.write().insert(id, record.clone());
        (record, token)
    }

    /// Replaces a cluster's token; the old one stops working at once.
    pub fn rotate_token(&self, id: &str) -> Option<Secret> {
        let mut clusters = self.write();
        let record = clusters.get_mut(id)?;
        let token = new_token(id);
        record.token_hash = hash(token.expose());
        Some(token)
    }

    /// Forgets a cluster; its token stops working at once.
    pub fn remove(&self, id: &str) -> bool {
        self.write().remove(id).is_some()
    }

    pub fn get(&self, id: &str) -> Option<ClusterRecord> {
        self.read().get(id).cloned()
    }

    /// The cluster a token belongs to, if it is current. Takes the same time whether the
    /// cluster id is unknown or the secret part is wrong.
    pub fn authenticate(&self, token: &str) -> Option<ClusterId> {
        let id = token
            .strip_prefix("sbt_")
            .and_then(|rest| rest.split_once('_'))
            .map(|(id, _)| id);
        let presented = hash(token);
        let clusters = self.read();
        let record = id.and_then(|id| clusters.get(id));
        let expected = record.map_or([0u8; 32], |r| r.token_hash);
        let equal: bool = presented.ct_eq(&expected).into();
        match record {
            Some(r) if equal => Some(r.id.clone()),
            _ => None,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<ClusterId, ClusterRecord>> {
        self.clusters
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<ClusterId, ClusterRecord>> {
        self.clusters
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_authenticate_their_cluster_only_until_rotated_or_removed() {
        let registry = Registry::new();
        let (a, token_a) = registry.register("a");
        let (b, token_b) = registry.register("b");
        assert_eq!(registry.authenticate(token_a.expose()), Some(a.id.clone()));
        assert_eq!(registry.authenticate(token_b.expose()), Some(b.id.clone()));
        // A token with another cluster's id but this cluster's secret is refused.
        let forged = token_a.expose().replace(&a.id, &b.id);
        assert_eq!(registry.authenticate(&forged), None);
        assert_eq!(registry.authenticate("sbt_cunknown_00"), None);
        assert_eq!(registry.authenticate(""), None);
        let new_a = registry.rotate_token(&a.id).unwrap();
        assert_eq!(
            registry.authenticate(token_a.expose()),
            None,
            "old token still works"
        );
        assert_eq!(registry.authenticate(new_a.expose()), Some(a.id.clone()));
        assert!(registry.remove(&b.id));
        assert_eq!(
            registry.authenticate(token_b.expose()),
            None,
            "removed cluster's token works"
        );
    }

    #[test]
    fn only_the_hash_is_kept() {
        let registry = Registry::new();
        let (record, token) = registry.register("a");
        assert!(!format!("{record:?}").contains(token.expose()));
    }
}
