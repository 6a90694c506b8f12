//! Clusters the hub knows and their tokens, kept in memory and (by default) persisted to a
//! JSON file under the data directory.
//!
//! Tokens are stored only as SHA-256 hashes and compared in constant time. A token is
//! `sbt_<cluster id>_<64 hex chars of randomness>`: the id lets the hub find the one hash to
//! compare without scanning, and 256 random bits make a fast hash safe to store (there is
//! nothing to brute-force, unlike a password).
//!
//! Every change is written to a temporary file, synced, and renamed over `clusters.json`
//! (then the directory is synced) before it takes effect in memory and before the caller
//! hears of it: after `kill -9` at any moment the file holds either the old or the new state,
//! and every change that was acknowledged is on disk. Changes are serialised; reads (token
//! checks on every handshake) never wait for disk.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// Identifier of a registered cluster (`c` followed by 16 hex characters).
pub type ClusterId = String;

const STORE_FILE: &str = "clusters.json";
/// Locked while a hub has the data directory open.
const LOCK_FILE: &str = ".lock";
const STORE_VERSION: u32 = 1;

/// What the hub records about a cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterRecord {
    pub id: ClusterId,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub created: Timestamp,
    /// When the current token was issued.
    pub token_issued: Timestamp,
    /// When the cluster's agent last established a tunnel.
    #[serde(default)]
    pub last_connected: Option<Timestamp>,
    #[serde(default)]
    pub agent_version: Option<String>,
    #[serde(default)]
    pub kubernetes_version: Option<String>,
    /// The hub's own cluster (`local_cluster`): registered from the hub's configuration, whose
    /// token file is the only way to change its token.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
    /// The hub's fleet upgrades leave this cluster's agent image alone (`agent-pin`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent_pinned: bool,
    /// `sha256:<hex>` of the current token.
    token_hash: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    version: u32,
    clusters: Vec<ClusterRecord>,
}

/// Why the registry could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cluster store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster store {path} is not valid: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "another shapeblock-hub is using the data directory {path} (it holds {path}/{LOCK_FILE}); \
         two hubs on one store would overwrite each other's changes"
    )]
    InUse { path: PathBuf },
    /// Another cluster has this name: names are how people tell clusters apart.
    #[error("a cluster named {0:?} is already registered; choose another name")]
    NameTaken(String),
    /// `local_cluster.name` names a cluster registered through the API.
    #[error(
        "local_cluster.name is {0:?}, but a cluster registered through the API has that name; \
         choose another local_cluster.name, or delete that cluster"
    )]
    LocalNameTaken(String),
}

/// The clusters the hub accepts tunnels from.
pub struct Registry {
    clusters: RwLock<HashMap<ClusterId, ClusterRecord>>,
    /// Serialises changes so each one persists the state it produced.
    writer: Mutex<()>,
    /// Where the state is persisted; in memory only when None.
    dir: Option<PathBuf>,
    /// Connection details changed in memory but not yet written.
    dirty: AtomicBool,
    /// The last write to `dir` failed.
    write_failed: AtomicBool,
    /// Held open with an exclusive lock while this registry owns `dir`; the operating
    /// system releases it when the process ends, however it ends.
    _lock: Option<std::fs::File>,
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

use crate::secret::hash_token as hash;

fn new_token(id: &str) -> Secret {
    Secret::new(format!("sbt_{id}_{}", random_hex(32)))
}

/// What is wrong with a cluster name, if anything: names reach log lines, metrics and the UI,
/// where a control character (a newline, an ANSI escape) could forge a line or a metric.
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.trim().is_empty() || name.len() > 63 {
        Some("must be 1 to 63 characters")
    } else if name.chars().any(char::is_control) {
        Some("must not contain control characters (newlines, escapes)")
    } else {
        None
    }
}

/// The cluster id a token names (`sbt_<id>_<secret>`), whatever its secret part.
fn token_id(token: &str) -> Option<&str> {
    token
        .strip_prefix("sbt_")
        .and_then(|rest| rest.split_once('_'))
        .map(|(id, _)| id)
}

/// Whether `token` has the shape of a token this registry issues: `sbt_`, `c` and 16 hex
/// digits (the cluster id), `_`, 64 hex digits (256 random bits). Lower-case hex only, so one
/// token has one spelling.
pub fn well_formed_token(token: &str) -> bool {
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let Some(rest) = token.strip_prefix("sbt_c") else {
        return false;
    };
    match rest.split_once('_') {
        Some((id, secret)) => hex(id, 16) && hex(secret, 64),
        None => false,
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::in_memory()
    }
}

impl Registry {
    /// A registry that keeps nothing on disk (tests, or a throw-away hub).
    /// The directory the registry persists to (None: in memory only). Other state of the hub
    /// that must survive a restart (the kubectl token key) is kept beside it.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn in_memory() -> Self {
        Self {
            clusters: RwLock::new(HashMap::new()),
            writer: Mutex::new(()),
            dir: None,
            dirty: AtomicBool::new(false),
            write_failed: AtomicBool::new(false),
            _lock: None,
        }
    }

    /// Opens (or creates) the store in `dir`. Refuses to start on a store it cannot read,
    /// rather than starting empty and losing every cluster.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::InUse {
                    path: dir.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(source)) => return Err(io(source)),
        }
        // Temporary files of writes interrupted by a crash never took effect.
        for entry in std::fs::read_dir(dir).map_err(io)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with('.')
                && entry.file_name().to_string_lossy().contains(".json.tmp-")
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let path = dir.join(STORE_FILE);
        let clusters = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: StoreFile =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                if file.version != STORE_VERSION {
                    return Err(StoreError::Corrupt {
                        path,
                        message: format!(
                            "version {} is not supported (expected {STORE_VERSION})",
                            file.version
                        ),
                    });
                }
                file.clusters
                    .into_iter()
                    .map(|c| (c.id.clone(), c))
                    .collect()
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        Ok(Self {
            clusters: RwLock::new(clusters),
            writer: Mutex::new(()),
            dir: Some(dir.to_path_buf()),
            dirty: AtomicBool::new(false),
            write_failed: AtomicBool::new(false),
            _lock: Some(lock),
        })
    }

    /// Registers a cluster and returns its record and its token (shown once, never stored).
    pub fn register(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(ClusterRecord, Secret), StoreError> {
        let id = format!("c{}", random_hex(8));
        let token = new_token(&id);
        let now = Timestamp::now();
        let record = ClusterRecord {
            id: id.clone(),
            name: name.to_string(),
            labels,
            created: now,
            token_issued: now,
            last_connected: None,
            agent_version: None,
            kubernetes_version: None,
            local: false,
            agent_pinned: false,
            token_hash: hash(token.expose()),
        };
        let stored = record.clone();
        self.try_change(move |clusters| {
            if clusters.values().any(|c| c.name == stored.name) {
                return Err(StoreError::NameTaken(stored.name));
            }
            clusters.insert(id, stored);
            Ok(())
        })?;
        Ok((record, token))
    }

    /// Registers the hub's own cluster with the token its agent was given (the hub's
    /// `local_cluster`), or brings the record in line with it: the id is the token's, the
    /// token the one hash that authenticates it. A local cluster of an earlier token (the chart
    /// generated a new one) is the same cluster under an id nothing holds a token for any more,
    /// so it is forgotten. `token` must be [`well_formed_token`].
    pub fn ensure_local(&self, name: &str, token: &Secret) -> Result<ClusterRecord, StoreError> {
        let id = token_id(token.expose()).unwrap_or_default().to_string();
        let token_hash = hash(token.expose());
        let name = name.to_string();
        self.try_change(move |clusters| {
            if clusters
                .values()
                .any(|c| c.name == name && c.id != id && !c.local)
            {
                return Err(StoreError::LocalNameTaken(name));
            }
            clusters.retain(|other, c| !c.local || *other == id);
            let now = Timestamp::now();
            let record = clusters.entry(id.clone()).or_insert_with(|| ClusterRecord {
                id: id.clone(),
                name: name.clone(),
                labels: BTreeMap::new(),
                created: now,
                token_issued: now,
                last_connected: None,
                agent_version: None,
                kubernetes_version: None,
                local: true,
                agent_pinned: false,
                token_hash: token_hash.clone(),
            });
            record.local = true;
            record.name = name;
            if record.token_hash != token_hash {
                record.token_hash = token_hash;
                record.token_issued = now;
            }
            Ok(record.clone())
        })
    }

    /// Replaces a cluster's token; the old one stops working at once.
    pub fn rotate_token(&self, id: &str) -> Result<Option<Secret>, StoreError> {
        let token = new_token(id);
        let token_hash = hash(token.expose());
        let found = self.change(|clusters| match clusters.get_mut(id) {
            Some(record) => {
                record.token_hash = token_hash;
                record.token_issued = Timestamp::now();
                true
            }
            None => false,
        })?;
        Ok(found.then_some(token))
    }

    /// Pins (or unpins) a cluster's agent: fleet upgrades leave a pinned agent's image alone.
    /// False when the cluster is unknown.
    pub fn set_agent_pinned(&self, id: &str, pinned: bool) -> Result<bool, StoreError> {
        self.change(|clusters| match clusters.get_mut(id) {
            Some(record) => {
                record.agent_pinned = pinned;
                true
            }
            None => false,
        })
    }

    /// Forgets a cluster; its token stops working at once.
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        self.change(|clusters| clusters.remove(id).is_some())
    }

    pub fn get(&self, id: &str) -> Option<ClusterRecord> {
        self.read().get(id).cloned()
    }

    /// Every cluster, ordered by name then id.
    pub fn list(&self) -> Vec<ClusterRecord> {
        let mut all: Vec<ClusterRecord> = self.read().values().cloned().collect();
        all.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        all
    }

    /// The cluster a token belongs to, if it is current. Takes the same time whether the
    /// cluster id is unknown or the secret part is wrong.
    pub fn authenticate(&self, token: &str) -> Option<ClusterId> {
        let id = token_id(token);
        let presented = hash(token);
        let clusters = self.read();
        let record = id.and_then(|id| clusters.get(id));
        let expected = record.map_or("", |r| r.token_hash.as_str());
        let equal: bool = presented.as_bytes().ct_eq(expected.as_bytes()).into();
        match record {
            Some(r) if equal => Some(r.id.clone()),
            _ => None,
        }
    }

    /// Records a new tunnel's versions in memory; [`Registry::flush`] writes them later, so a
    /// reconnect storm does not become a storm of disk writes.
    pub fn note_connected(
        &self,
        id: &str,
        agent_version: Option<String>,
        kubernetes_version: Option<String>,
    ) {
        let mut clusters = self.clusters.write().unwrap_or_else(|p| p.into_inner());
        if let Some(record) = clusters.get_mut(id) {
            record.last_connected = Some(Timestamp::now());
            record.agent_version = agent_version;
            record.kubernetes_version = kubernetes_version;
            self.dirty.store(true, Ordering::SeqCst);
        }
    }

    /// Whether the last write to the store succeeded (a full or read-only disk makes every
    /// registration fail until it is fixed: the hub is then not ready).
    pub fn writable(&self) -> bool {
        !self.write_failed.load(Ordering::SeqCst)
    }

    /// Writes connection details noted since the last write.
    pub fn flush(&self) -> Result<(), StoreError> {
        if self.dirty.swap(false, Ordering::SeqCst)
            && let Err(err) = self.change(|_| ())
        {
            self.dirty.store(true, Ordering::SeqCst);
            return Err(err);
        }
        Ok(())
    }

    /// Flushes noted connection details every `interval` until the registry is dropped.
    pub fn spawn_flusher(self: &Arc<Self>, interval: std::time::Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            loop {
                ticker.tick().await;
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                if let Err(err) = tokio::task::spawn_blocking(move || registry.flush())
                    .await
                    .unwrap_or(Ok(()))
                {
                    tracing::warn!(error = %err, "writing connection details failed; will retry");
                }
            }
        });
    }

    /// Like [`Self::change`], for an edit that may refuse: then nothing is written.
    fn try_change<T>(
        &self,
        edit: impl FnOnce(&mut HashMap<ClusterId, ClusterRecord>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.read().clone();
        let result = edit(&mut next)?;
        if let Some(dir) = &self.dir {
            let persisted = persist(dir, &next);
            self.write_failed
                .store(persisted.is_err(), Ordering::SeqCst);
            persisted?;
        }
        *self.clusters.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(result)
    }

    /// Applies `edit` to a copy of the state, persists the copy, then makes it current.
    fn change<T>(
        &self,
        edit: impl FnOnce(&mut HashMap<ClusterId, ClusterRecord>) -> T,
    ) -> Result<T, StoreError> {
        self.try_change(|clusters| Ok(edit(clusters)))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<ClusterId, ClusterRecord>> {
        self.clusters
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Atomically replaces the store file: temp file, fsync, rename, fsync of the directory.
fn persist(dir: &Path, clusters: &HashMap<ClusterId, ClusterRecord>) -> Result<(), StoreError> {
    let mut list: Vec<ClusterRecord> = clusters.values().cloned().collect();
    list.sort_by(|a, b| a.id.cmp(&b.id));
    let body = serde_json::to_vec_pretty(&StoreFile {
        version: STORE_VERSION,
        clusters: list,
    })
    .map_err(|e| StoreError::Corrupt {
        path: dir.join(STORE_FILE),
        message: e.to_string(),
    })?;
    write_atomically(dir, STORE_FILE, &body)
}

/// Replaces `dir/name` with `body` atomically: a temporary file (`.<name>.tmp-<pid>`, mode
/// 0600), fsync, rename, fsync of the directory. A crash leaves the old file or the new one.
pub(crate) fn write_atomically(dir: &Path, name: &str, body: &[u8]) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(body).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    let target = dir.join(name);
    std::fs::rename(&tmp, &target).map_err(io(&target))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_authenticate_their_cluster_only_until_rotated_or_removed() {
        let registry = Registry::in_memory();
        let (a, token_a) = registry.register("a", BTreeMap::new()).unwrap();
        let (b, token_b) = registry.register("b", BTreeMap::new()).unwrap();
        assert_eq!(registry.authenticate(token_a.expose()), Some(a.id.clone()));
        assert_eq!(registry.authenticate(token_b.expose()), Some(b.id.clone()));
        // A token with another cluster's id but this cluster's secret is refused.
        let forged = token_a.expose().replace(&a.id, &b.id);
        assert_eq!(registry.authenticate(&forged), None);
        assert_eq!(registry.authenticate("sbt_cunknown_00"), None);
        assert_eq!(registry.authenticate(""), None);
        let new_a = registry.rotate_token(&a.id).unwrap().unwrap();
        assert_eq!(
            registry.authenticate(token_a.expose()),
            None,
            "old token still works"
        );
        assert_eq!(registry.authenticate(new_a.expose()), Some(a.id.clone()));
        assert!(registry.remove(&b.id).unwrap());
        assert_eq!(
            registry.authenticate(token_b.expose()),
            None,
            "removed cluster's token works"
        );
    }

    #[test]
    fn the_local_cluster_follows_its_configured_token() {
        let registry = Registry::in_memory();
        let token = |n: char| {
            Secret::new(format!(
                "sbt_c{}_{}",
                "0".repeat(15) + &n.to_string(),
                "ab".repeat(32)
            ))
        };
        let first = token('1');
        assert!(well_formed_token(first.expose()));
        let local = registry.ensure_local("local", &first).unwrap();
        assert_eq!(
            (local.id.as_str(), local.local),
            ("c0000000000000001", true)
        );
        assert_eq!(
            registry.authenticate(first.expose()),
            Some(local.id.clone())
        );
        // The same token again (a restart) keeps the record and its history.
        registry.note_connected(&local.id, Some("0.1.0".into()), None);
        let again = registry.ensure_local("local", &first).unwrap();
        assert_eq!(again.token_issued, local.token_issued);
        assert_eq!(again.agent_version.as_deref(), Some("0.1.0"));
        // A new token of the same id replaces the hash: the old one stops working.
        let rotated = Secret::new(first.expose().replace("abab", "cdcd"));
        registry.ensure_local("local", &rotated).unwrap();
        assert_eq!(registry.authenticate(first.expose()), None);
        assert_eq!(
            registry.authenticate(rotated.expose()),
            Some(local.id.clone())
        );
        // A token of another id (a regenerated chart Secret) replaces the local cluster.
        let other = token('2');
        let replaced = registry.ensure_local("local", &other).unwrap();
        assert_eq!(replaced.id, "c0000000000000002");
        assert_eq!(registry.list().len(), 1);
        assert_eq!(registry.authenticate(rotated.expose()), None);
        // The name is the local cluster's: the API cannot take it, nor it a registered one's.
        assert!(matches!(
            registry.register("local", BTreeMap::new()),
            Err(StoreError::NameTaken(_))
        ));
        registry.register("prod", BTreeMap::new()).unwrap();
        assert!(matches!(
            registry.ensure_local("prod", &other),
            Err(StoreError::LocalNameTaken(_))
        ));
        for bad in [
            "sbt_c000000000000000_".to_string() + &"ab".repeat(32),
            "sbt_c0000000000000001_".to_string() + &"AB".repeat(32),
            "sbt_c0000000000000001_abc".to_string(),
            "c0000000000000001_".to_string() + &"ab".repeat(32),
        ] {
            assert!(!well_formed_token(&bad), "{bad}");
        }
    }

    #[test]
    fn only_the_hash_is_stored() {
        let dir = std::env::temp_dir().join(format!("sb-registry-hash-{}", std::process::id()));
        let registry = Registry::open(&dir).unwrap();
        let (record, token) = registry.register("a", BTreeMap::new()).unwrap();
        assert!(!format!("{record:?}").contains(token.expose()));
        let file = std::fs::read_to_string(dir.join(STORE_FILE)).unwrap();
        assert!(!file.contains(token.expose()));
        assert!(file.contains("sha256:"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn state_survives_reopening() {
        let dir = std::env::temp_dir().join(format!("sb-registry-reopen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (kept, token) = {
            let registry = Registry::open(&dir).unwrap();
            let (kept, _) = registry
                .register("kept", BTreeMap::from([("env".into(), "prod".into())]))
                .unwrap();
            let (gone, _) = registry.register("gone", BTreeMap::new()).unwrap();
            registry.remove(&gone.id).unwrap();
            let token = registry.rotate_token(&kept.id).unwrap().unwrap();
            assert!(registry.set_agent_pinned(&kept.id, true).unwrap());
            assert!(!registry.set_agent_pinned(&gone.id, true).unwrap());
            registry.note_connected(&kept.id, Some("0.1.0".into()), Some("v1.36.3".into()));
            registry.flush().unwrap();
            (kept, token)
        };
        let registry = Registry::open(&dir).unwrap();
        let all = registry.list();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].labels["env"], "prod");
        assert_eq!(all[0].kubernetes_version.as_deref(), Some("v1.36.3"));
        assert!(all[0].agent_pinned, "a pin is kept across restarts");
        assert_eq!(registry.authenticate(token.expose()), Some(kept.id));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn one_data_directory_serves_one_hub_at_a_time() {
        let dir = std::env::temp_dir().join(format!("sb-registry-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = Registry::open(&dir).unwrap();
        let err = Registry::open(&dir)
            .err()
            .expect("a second registry opened a data directory in use")
            .to_string();
        assert!(err.contains("another shapeblock-hub is using"), "{err}");
        drop(first);
        Registry::open(&dir).expect("the lock outlived its registry");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_corrupt_store_is_refused_not_replaced() {
        let dir = std::env::temp_dir().join(format!("sb-registry-corrupt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(STORE_FILE),
            b"{\"version\":1,\"clusters\":[{\"id\":",
        )
        .unwrap();
        let err = Registry::open(&dir)
            .err()
            .expect("corrupt store accepted")
            .to_string();
        assert!(err.contains("not valid"), "{err}");
        assert!(
            std::fs::read(dir.join(STORE_FILE))
                .unwrap()
                .starts_with(b"{\"version\""),
            "store overwritten"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
