//! One watch per kind per cluster, shared by every controller that needs that kind: a
//! cluster's Projects are watched once, not by four controllers, and so are its Apps, its
//! hub-made Jobs and its App Deployments. Each watch is one reflector store (one copy of each
//! object) and one stream through the tunnel, whatever the number of readers.
//!
//! kube's own shared reflector (`reflect_shared`) tells its subscribers of objects applied,
//! never of objects deleted, which a controller's triggers need (a Job deleted by hand brings
//! its owner back): hence this small one.
//!
//! A reader subscribes at any time: it first gets every object the store holds, then every
//! change, in the order the store took them. The store is updated before a reader hears of a
//! change, as with kube's reflector, so a reconcile that a change triggered reads the store
//! with that change in it.

use std::sync::{Arc, Mutex};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use kube::Resource;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Lookup, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;

use super::Context;
use crate::crd::{App, Project};

/// The watches of one cluster that more than one controller reads.
pub struct Watches {
    /// Projects, `managedFields` dropped, relayed: the Project controller's own kind, and the
    /// App, Service and Team controllers' triggers (the Team controller's store as well).
    pub projects: Arc<SharedWatch<Project>>,
    /// Apps, `managedFields` dropped, relayed: the App and runtime controllers' own kind, and
    /// the AppBuild controller's trigger.
    pub apps: Arc<SharedWatch<App>>,
    /// The Jobs the hub made (metadata only): owned by Apps, AppBuilds and Services.
    pub jobs: Arc<SharedWatch<PartialObjectMeta<Job>>>,
    /// The Deployments of Apps, trimmed to what the runtime status reads: the runtime
    /// controller's store, and the AppBuild controller's trigger (a rollout moves its deploy).
    pub deployments: Arc<SharedWatch<Deployment>>,
}

impl Watches {
    pub fn new() -> Self {
        Self {
            projects: SharedWatch::new(),
            apps: SharedWatch::new(),
            jobs: SharedWatch::new(),
            deployments: SharedWatch::new(),
        }
    }

    /// Runs the four watches; stop them by dropping the future.
    pub async fn run(&self, ctx: &Context) {
        let client = &ctx.client;
        let managed = format!("{}={}", super::MANAGED_BY.0, super::MANAGED_BY.1);
        let jobs = watcher(
            Api::<PartialObjectMeta<Job>>::all(client.clone()),
            super::watch_config().labels(&managed),
        );
        let deployments = watcher(
            Api::<Deployment>::all(client.clone()),
            super::watch_config().labels(crate::render::app::APP_LABEL),
        )
        .modify(super::runtime::trim_deployment);
        futures_util::join!(
            self.projects
                .clone()
                .run(super::tapped_watch(Api::all(client.clone()), ctx)),
            self.apps
                .clone()
                .run(super::tapped_watch(Api::all(client.clone()), ctx)),
            self.jobs.clone().run(jobs),
            self.deployments.clone().run(deployments),
        );
    }
}

impl Default for Watches {
    fn default() -> Self {
        Self::new()
    }
}

/// What a reader is told of.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Wants {
    /// Objects created or changed (a controller's own kind).
    Applied,
    /// Objects created, changed or deleted (a controller's triggers).
    Touched,
}

struct Reader<K> {
    wants: Wants,
    tx: mpsc::UnboundedSender<Arc<K>>,
}

/// One watch of one kind in one cluster, and its readers.
pub struct SharedWatch<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    store: Store<K>,
    /// The store's writer and the readers, under one lock: a reader subscribing while a
    /// change is applied gets that change either in its first copy of the store or after it,
    /// never both and never neither.
    state: Mutex<State<K>>,
}

struct State<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    writer: reflector::store::Writer<K>,
    readers: Vec<Reader<K>>,
}

impl<K> SharedWatch<K>
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    pub fn new() -> Arc<Self> {
        let (store, writer) = reflector::store();
        Arc::new(Self {
            store,
            state: Mutex::new(State {
                writer,
                readers: Vec::new(),
            }),
        })
    }

    /// The objects seen so far (empty until the first list arrives: see
    /// [`Store::wait_until_ready`]).
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// Objects as they are created or changed, starting with every object the store holds.
    pub fn applied(&self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        self.subscribe(Wants::Applied)
    }

    /// Objects as they are created, changed or deleted, starting with every object the store
    /// holds.
    pub fn touched(&self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        self.subscribe(Wants::Touched)
    }

    fn subscribe(&self, wants: Wants) -> impl Stream<Item = Arc<K>> + Send + 'static {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for object in self.store.state() {
            let _ = tx.send(object);
        }
        state.readers.push(Reader { wants, tx });
        drop(state);
        futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|object| (object, rx))
        })
    }

    /// Runs the watch: applies each event to the store and tells the readers. Never ends (a
    /// failed watch is started again by the watcher); stop it by dropping the future.
    pub async fn run(
        self: Arc<Self>,
        events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    ) {
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => self.apply(&event),
                Err(error) => tracing::debug!(%error, kind = %K::kind(&Default::default()),
                    "a shared watch failed; it starts again"),
            }
        }
    }

    fn apply(&self, event: &watcher::Event<K>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.writer.apply_watcher_event(event);
        let (objects, wants) = match event {
            // The store's own copies: no second one per reader.
            watcher::Event::Apply(object) => {
                let key = object.to_object_ref(Default::default());
                (self.store.get(&key).into_iter().collect(), Wants::Applied)
            }
            // A (re-)list is in the store once it is whole: then every object is news.
            watcher::Event::InitDone => (self.store.state(), Wants::Applied),
            watcher::Event::Delete(object) => (vec![Arc::new(object.clone())], Wants::Touched),
            watcher::Event::Init | watcher::Event::InitApply(_) => return,
        };
        state.readers.retain(|reader| {
            if wants == Wants::Touched && reader.wants == Wants::Applied {
                return !reader.tx.is_closed();
            }
            objects
                .iter()
                .all(|object| reader.tx.send(object.clone()).is_ok())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn map(name: &str, version: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn names(batch: &[Arc<ConfigMap>]) -> Vec<String> {
        batch
            .iter()
            .map(|m| {
                format!(
                    "{}@{}",
                    m.metadata.name.as_deref().unwrap_or(""),
                    m.metadata.resource_version.as_deref().unwrap_or("")
                )
            })
            .collect()
    }

    async fn next_n(stream: impl Stream<Item = Arc<ConfigMap>>, n: usize) -> Vec<Arc<ConfigMap>> {
        stream.take(n).collect().await
    }

    #[tokio::test]
    async fn readers_get_the_store_first_then_changes_and_only_touched_ones_get_deletes() {
        let watch = SharedWatch::<ConfigMap>::new();
        let early = watch.touched();
        watch.apply(&watcher::Event::Init);
        watch.apply(&watcher::Event::InitApply(map("a", "1")));
        watch.apply(&watcher::Event::InitApply(map("b", "1")));
        assert!(
            watch.store().is_empty(),
            "a list is in the store once it is whole"
        );
        watch.apply(&watcher::Event::InitDone);
        // A late reader gets the objects it missed from the store.
        let late = watch.applied();
        watch.apply(&watcher::Event::Apply(map("a", "2")));
        watch.apply(&watcher::Event::Delete(map("b", "1")));
        watch.apply(&watcher::Event::Apply(map("c", "1")));

        let mut early = names(&next_n(early, 5).await);
        early[..2].sort();
        assert_eq!(early, ["a@1", "b@1", "a@2", "b@1", "c@1"]);
        let mut late = names(&next_n(late, 4).await);
        late[..2].sort();
        assert_eq!(late, ["a@1", "b@1", "a@2", "c@1"]);
        let mut kept = names(&watch.store().state());
        kept.sort();
        assert_eq!(kept, ["a@2", "c@1"]);
    }

    #[tokio::test]
    async fn a_reader_that_went_is_forgotten() {
        let watch = SharedWatch::<ConfigMap>::new();
        drop(watch.touched());
        drop(watch.applied());
        let kept = watch.touched();
        watch.apply(&watcher::Event::Apply(map("a", "1")));
        watch.apply(&watcher::Event::Delete(map("a", "1")));
        assert_eq!(watch.state.lock().unwrap().readers.len(), 1);
        assert_eq!(names(&next_n(kept, 2).await), ["a@1", "a@1"]);
    }
}
