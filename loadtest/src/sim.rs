//! A simulated Kubernetes cluster, held in memory: for the load test only, never for the
//! product or its correctness tests (those run on a real kube-apiserver).
//!
//! It answers what the hub's controllers ask of a cluster, through the real agent code: list
//! and watch (resource versions, a bounded change log to resume from, `410 Gone` past it,
//! label and field selectors, metadata-only responses), get, create, server-side apply and
//! merge patches (resourceVersion preconditions, no-op writes that change nothing, the
//! `status` subresource), delete with finalizers and owner-reference cascade, pod logs; CRDs
//! are Established and namespaces Active as soon as they exist; Jobs get a pod that runs and
//! then ends as the kubelet and the Job controller would write it (git commit and image digest
//! in the termination messages). Apply is a deep merge, not field ownership: enough for a
//! controller that owns every field it writes.
//!
//! Every change of a ShapeBlock object's `status.phase` is stamped with the time it was
//! written ([`Cluster::phase_written`]), which the relay latency is measured from.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, mpsc};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of a simulated apiserver response (watches stream).
pub type SimBody = BoxBody<Bytes, BoxError>;

/// Changes kept per cluster for watches resuming from a resource version.
const CHANGE_LOG: usize = 4096;
/// The group of the ShapeBlock kinds, whose phase changes are stamped.
const SHAPEBLOCK_GROUP: &str = "apps.shapeblock.io";
/// The kind an App's runtime state changes are stamped and measured under.
pub const HEALTH_KIND: &str = "AppRuntime";
/// Git commit the simulated clone resolves to.
pub const COMMIT: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

/// How long simulated Jobs run.
#[derive(Clone, Copy, Debug)]
pub struct JobTimings {
    /// From Job creation until its pod runs.
    pub start: Duration,
    /// Build Jobs (named `*-build`), from running to done.
    pub build: Duration,
    /// Every other Job (Helm deploys, installs), from running to done.
    pub other: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One committed change, as watches see it.
struct Change {
    rv: u64,
    resource: Arc<str>,
    kind: ChangeType,
    object: Arc<Value>,
}

type Objects = BTreeMap<(String, String), Arc<Value>>;

#[derive(Default)]
struct State {
    rv: u64,
    uid: u64,
    /// By resource (`<group>/<plural>`, core group empty), then (namespace, name).
    objects: HashMap<Arc<str>, Objects>,
    log: VecDeque<Arc<Change>>,
}

/// Counters a scenario reads.
#[derive(Default)]
pub struct SimStats {
    /// Watches being served (the hub's controllers keep 14 open per cluster).
    pub open_watches: AtomicUsize,
}

/// One simulated cluster.
pub struct Cluster {
    /// The hub's id for this cluster (what relay events name).
    pub id: String,
    state: Mutex<State>,
    changes: broadcast::Sender<Arc<Change>>,
    timings: JobTimings,
    phases: Arc<DashMap<String, Instant>>,
    pub stats: SimStats,
}

/// Key under which a phase change is stamped.
pub fn phase_key(cluster: &str, kind: &str, namespace: &str, name: &str, phase: &str) -> String {
    format!("{cluster}/{kind}/{namespace}/{name}/{phase}")
}

/// Where a request points.
#[derive(Debug)]
struct Target {
    resource: Arc<str>,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match segments.as_slice() {
            ["api", _version, rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => return None,
        };
        let owned = |s: Option<&&str>| s.map(|s| s.to_string());
        let target = match rest {
            ["namespaces", ns, resource, tail @ ..]
                if !(group.is_empty() && matches!(*resource, "status" | "finalize")) =>
            {
                Target {
                    resource: format!("{group}/{resource}").into(),
                    namespace: Some(ns.to_string()),
                    name: owned(tail.first()),
                    sub: owned(tail.get(1)),
                }
            }
            [resource, tail @ ..] => Target {
                resource: format!("{group}/{resource}").into(),
                namespace: None,
                name: owned(tail.first()),
                sub: owned(tail.get(1)),
            },
            [] => return None,
        };
        Some(target)
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &http::Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(pair), String::new()),
        })
        .collect()
}

/// An equality-based label selector (`a=b`, `a==b`, `a!=b`, `a`, `!a`).
fn labels_match(selector: &str, object: &Value) -> bool {
    let labels = object.pointer("/metadata/labels");
    let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
    selector
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .all(|requirement| {
            if let Some((k, v)) = requirement.split_once("!=") {
                label(k.trim()) != Some(v.trim())
            } else if let Some((k, v)) = requirement
                .split_once("==")
                .or_else(|| requirement.split_once('='))
            {
                label(k.trim()) == Some(v.trim())
            } else if let Some(k) = requirement.strip_prefix('!') {
                label(k.trim()).is_none()
            } else {
                label(requirement).is_some()
            }
        })
}

/// `metadata.name=x` and `metadata.namespace=x` field selectors.
fn fields_match(selector: &str, object: &Value) -> bool {
    selector
        .split(',')
        .filter(|r| !r.is_empty())
        .all(|requirement| match requirement.split_once('=') {
            Some((field, value)) => {
                let pointer = format!("/{}", field.trim_end_matches('=').replace('.', "/"));
                object
                    .pointer(&pointer)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    == value
            }
            None => true,
        })
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn status_body(code: StatusCode, reason: &str, message: &str) -> Response<SimBody> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn json_response(code: StatusCode, body: &Value) -> Response<SimBody> {
    let mut response = Response::new(full(Bytes::from(body.to_string())));
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn full(bytes: Bytes) -> SimBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// RFC 7386 merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let map = target.as_object_mut().expect("just made an object");
            for (key, value) in fields {
                if value.is_null() {
                    map.remove(key);
                } else {
                    merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// An object reduced to what a metadata-only request returns.
fn metadata_only(object: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": object.get("metadata").cloned().unwrap_or_default()})
}

fn name_of(object: &Value) -> (String, String) {
    let field = |f: &str| {
        object
            .pointer(&format!("/metadata/{f}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (field("namespace"), field("name"))
}

fn phase_of(object: &Value) -> Option<&str> {
    object.pointer("/status/phase").and_then(Value::as_str)
}

impl Cluster {
    pub fn new(
        id: String,
        timings: JobTimings,
        phases: Arc<DashMap<String, Instant>>,
    ) -> Arc<Self> {
        let (changes, _) = broadcast::channel(1024);
        Arc::new(Self {
            id,
            state: Mutex::new(State::default()),
            changes,
            timings,
            phases,
            stats: SimStats::default(),
        })
    }

    /// Creates an object from outside the hub (the load test's users), as `POST` would.
    pub fn create(self: &Arc<Self>, resource: &str, object: Value) -> Result<(), String> {
        let mut state = self.state.lock().expect("sim state");
        self.insert(&mut state, resource.into(), object).map(|_| ())
    }

    /// Number of objects of a resource.
    pub fn count(&self, resource: &str) -> usize {
        let state = self.state.lock().expect("sim state");
        state.objects.get(resource).map_or(0, BTreeMap::len)
    }

    /// One object as stored.
    pub fn object(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let state = self.state.lock().expect("sim state");
        state
            .objects
            .get(resource)
            .and_then(|o| o.get(&(namespace.to_string(), name.to_string())))
            .map(|o| (**o).clone())
    }

    /// Phases of a resource's objects (`namespace/name` → phase).
    pub fn phases(&self, resource: &str) -> BTreeMap<String, String> {
        let state = self.state.lock().expect("sim state");
        state
            .objects
            .get(resource)
            .into_iter()
            .flatten()
            .map(|((ns, name), o)| {
                (
                    format!("{ns}/{name}"),
                    phase_of(o).unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    fn commit(&self, state: &mut State, resource: Arc<str>, kind: ChangeType, object: Arc<Value>) {
        let change = Arc::new(Change {
            rv: state.rv,
            resource,
            kind,
            object,
        });
        if state.log.len() == CHANGE_LOG {
            state.log.pop_front();
        }
        state.log.push_back(change.clone());
        let _ = self.changes.send(change);
    }

    fn stamp_phase(&self, resource: &str, old: Option<&Value>, new: &Value) {
        if !resource.starts_with(SHAPEBLOCK_GROUP) {
            return;
        }
        let Some(phase) = phase_of(new) else { return };
        if old.and_then(phase_of) == Some(phase) {
            return;
        }
        let kind = new.get("kind").and_then(Value::as_str).unwrap_or_default();
        let (ns, name) = name_of(new);
        self.phases
            .insert(phase_key(&self.id, kind, &ns, &name, phase), Instant::now());
    }

    /// Fills in server-set metadata and stores a new object. Err(message) if it exists.
    fn insert(
        self: &Arc<Self>,
        state: &mut State,
        resource: Arc<str>,
        mut object: Value,
    ) -> Result<Arc<Value>, String> {
        let (ns, mut name) = name_of(&object);
        if name.is_empty() {
            let prefix = object
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
                .unwrap_or("object-")
                .to_string();
            name = format!("{prefix}{:05x}", rand::random::<u32>() & 0xfffff);
        }
        let objects = state.objects.entry(resource.clone()).or_default();
        if objects.contains_key(&(ns.clone(), name.clone())) {
            return Err(format!("{resource} \"{name}\" already exists"));
        }
        state.rv += 1;
        state.uid += 1;
        let meta = object
            .as_object_mut()
            .map(|o| o.entry("metadata").or_insert_with(|| json!({})));
        if let Some(Value::Object(meta)) = meta {
            meta.insert("name".into(), name.clone().into());
            if !ns.is_empty() {
                meta.insert("namespace".into(), ns.clone().into());
            }
            meta.insert(
                "uid".into(),
                format!("{}-{:012}", self.id, state.uid).into(),
            );
            meta.insert("resourceVersion".into(), state.rv.to_string().into());
            meta.insert("creationTimestamp".into(), now().into());
            meta.insert("generation".into(), 1.into());
            meta.remove("managedFields");
        }
        match &*resource {
            "/namespaces" => merge_patch(&mut object, &json!({"status": {"phase": "Active"}})),
            "apiextensions.k8s.io/customresourcedefinitions" => merge_patch(
                &mut object,
                &json!({"status": {"conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "", "lastTransitionTime": now()},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "", "lastTransitionTime": now()}]}}),
            ),
            _ => {}
        }
        self.stamp_phase(&resource, None, &object);
        let object = Arc::new(object);
        state
            .objects
            .get_mut(&resource)
            .expect("entry made above")
            .insert((ns, name), object.clone());
        self.commit(state, resource.clone(), ChangeType::Added, object.clone());
        if &*resource == "batch/jobs" {
            self.drive_job(object.clone());
        }
        Ok(object)
    }

    /// Stores a changed object (a no-op when nothing changed), removing it when it is being
    /// deleted and has no finalizer left.
    fn update(
        self: &Arc<Self>,
        state: &mut State,
        resource: &Arc<str>,
        key: &(String, String),
        old: &Arc<Value>,
        mut new: Value,
    ) -> Arc<Value> {
        if new == **old {
            return old.clone();
        }
        if new.get("spec") != old.get("spec") {
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            new["metadata"]["generation"] = (generation + 1).into();
        }
        state.rv += 1;
        new["metadata"]["resourceVersion"] = state.rv.to_string().into();
        self.stamp_phase(resource, Some(old), &new);
        let deleting = new.pointer("/metadata/deletionTimestamp").is_some();
        let finalizers = new
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        let new = Arc::new(new);
        if deleting && !finalizers {
            self.remove(state, resource, key);
            return new;
        }
        if let Some(objects) = state.objects.get_mut(resource) {
            objects.insert(key.clone(), new.clone());
        }
        self.commit(state, resource.clone(), ChangeType::Modified, new.clone());
        new
    }

    /// Removes an object and, as the garbage collector would, everything it owns.
    fn remove(&self, state: &mut State, resource: &Arc<str>, key: &(String, String)) {
        let Some(object) = state.objects.get_mut(resource).and_then(|o| o.remove(key)) else {
            return;
        };
        state.rv += 1;
        let mut gone = (*object).clone();
        gone["metadata"]["resourceVersion"] = state.rv.to_string().into();
        self.commit(state, resource.clone(), ChangeType::Deleted, Arc::new(gone));
        let uid = object
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        // A deleted namespace takes its contents with it.
        let namespace = (&**resource == "/namespaces").then(|| key.1.clone());
        let mut dependents = vec![];
        for (resource, objects) in &state.objects {
            for (key, o) in objects {
                let owned = o
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|refs| {
                        refs.iter()
                            .any(|r| r.get("uid").and_then(Value::as_str) == Some(&uid))
                    });
                if owned || namespace.as_ref() == Some(&key.0) {
                    dependents.push((resource.clone(), key.clone()));
                }
            }
        }
        for (resource, key) in dependents {
            self.remove(state, &resource, &key);
        }
    }

    /// Serves one request.
    pub async fn handle<B>(self: Arc<Self>, request: Request<B>) -> Response<SimBody>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let (parts, body) = request.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => {
                return status_body(StatusCode::BAD_REQUEST, "BadRequest", &err.to_string());
            }
        };
        if parts.uri.path() == "/version" {
            return json_response(
                StatusCode::OK,
                &json!({"major": "1", "minor": "36", "gitVersion": "v1.36.3-simulated",
                    "platform": "linux/amd64"}),
            );
        }
        let Some(target) = Target::parse(parts.uri.path()) else {
            return status_body(
                StatusCode::NOT_FOUND,
                "NotFound",
                "no such path in the simulated cluster",
            );
        };
        let query = query(&parts.uri);
        let metadata = parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
        let parse = || serde_json::from_slice::<Value>(&body);
        match (&parts.method, target.name.as_deref(), target.sub.as_deref()) {
            (&Method::GET, None, _)
                if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) =>
            {
                self.watch(&target, &query, metadata)
            }
            (&Method::GET, None, _) => self.list(&target, &query, metadata),
            (&Method::GET, Some(name), Some("log")) => self.log(&target, name),
            (&Method::GET, Some(name), _) => self.get(&target, name, metadata),
            (&Method::POST, None, _) => match parse() {
                Ok(object) => self.post(&target, object),
                Err(err) => status_body(StatusCode::BAD_REQUEST, "BadRequest", &err.to_string()),
            },
            (&Method::PATCH, Some(name), sub) => match parse() {
                Ok(patch) => {
                    let content_type = parts
                        .headers
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    self.patch(&target, name, sub, content_type, patch)
                }
                Err(err) => status_body(StatusCode::BAD_REQUEST, "BadRequest", &err.to_string()),
            },
            (&Method::DELETE, Some(name), None) => self.delete(&target, name),
            _ => status_body(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the simulated cluster does not serve this request",
            ),
        }
    }

    fn key(target: &Target, name: &str) -> (String, String) {
        (
            target.namespace.clone().unwrap_or_default(),
            name.to_string(),
        )
    }

    fn get(&self, target: &Target, name: &str, metadata: bool) -> Response<SimBody> {
        let state = self.state.lock().expect("sim state");
        match state
            .objects
            .get(&target.resource)
            .and_then(|o| o.get(&Self::key(target, name)))
        {
            Some(object) if metadata => json_response(StatusCode::OK, &metadata_only(object)),
            Some(object) => json_response(StatusCode::OK, object),
            None => not_found(target, name),
        }
    }

    fn list(
        &self,
        target: &Target,
        query: &HashMap<String, String>,
        metadata: bool,
    ) -> Response<SimBody> {
        let state = self.state.lock().expect("sim state");
        let labels = query.get("labelSelector").map(String::as_str).unwrap_or("");
        let fields = query.get("fieldSelector").map(String::as_str).unwrap_or("");
        let items: Vec<Value> = state
            .objects
            .get(&target.resource)
            .into_iter()
            .flatten()
            .filter(|((ns, _), _)| target.namespace.as_ref().is_none_or(|t| t == ns))
            .filter(|(_, o)| labels_match(labels, o) && fields_match(fields, o))
            .map(|(_, o)| {
                if metadata {
                    metadata_only(o)
                } else {
                    (**o).clone()
                }
            })
            .collect();
        let kind = if metadata {
            "PartialObjectMetadataList"
        } else {
            "List"
        };
        json_response(
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": kind,
                "metadata": {"resourceVersion": state.rv.to_string()}, "items": items}),
        )
    }

    fn log(&self, target: &Target, name: &str) -> Response<SimBody> {
        let state = self.state.lock().expect("sim state");
        if state
            .objects
            .get(&target.resource)
            .and_then(|o| o.get(&Self::key(target, name)))
            .is_none()
        {
            return not_found(target, name);
        }
        let mut response = Response::new(full(Bytes::from_static(
            b"Step 1/3 : FROM scratch\nStep 2/3 : COPY . /app\nStep 3/3 : CMD [\"/app/run\"]\n",
        )));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain"),
        );
        response
    }

    fn post(self: &Arc<Self>, target: &Target, mut object: Value) -> Response<SimBody> {
        if let Some(ns) = &target.namespace {
            object["metadata"]["namespace"] = ns.clone().into();
        }
        let mut state = self.state.lock().expect("sim state");
        match self.insert(&mut state, target.resource.clone(), object) {
            Ok(object) => json_response(StatusCode::CREATED, &object),
            Err(message) => status_body(StatusCode::CONFLICT, "AlreadyExists", &message),
        }
    }

    fn patch(
        self: &Arc<Self>,
        target: &Target,
        name: &str,
        sub: Option<&str>,
        content_type: &str,
        patch: Value,
    ) -> Response<SimBody> {
        let apply = content_type.starts_with("application/apply-patch");
        if !apply
            && !content_type.starts_with("application/merge-patch+json")
            && !content_type.starts_with("application/strategic-merge-patch+json")
        {
            return status_body(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                &format!("the simulated cluster does not take {content_type} patches"),
            );
        }
        let key = Self::key(target, name);
        let mut state = self.state.lock().expect("sim state");
        let existing = state
            .objects
            .get(&target.resource)
            .and_then(|o| o.get(&key))
            .cloned();
        let Some(old) = existing else {
            if apply && sub.is_none() {
                let mut object = patch;
                object["metadata"]["name"] = name.into();
                if let Some(ns) = &target.namespace {
                    object["metadata"]["namespace"] = ns.clone().into();
                }
                return match self.insert(&mut state, target.resource.clone(), object) {
                    Ok(object) => json_response(StatusCode::CREATED, &object),
                    Err(message) => status_body(StatusCode::CONFLICT, "AlreadyExists", &message),
                };
            }
            return not_found(target, name);
        };
        if let Some(wanted) = patch
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
        {
            let current = old
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str);
            if Some(wanted) != current {
                return status_body(
                    StatusCode::CONFLICT,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        target.resource
                    ),
                );
            }
        }
        let mut new = (*old).clone();
        match sub {
            Some("status") => {
                if let Some(status) = patch.get("status") {
                    merge_patch(&mut new, &json!({"status": status}));
                }
            }
            _ => {
                let mut patch = patch;
                if let Some(meta) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                    for server_set in [
                        "uid",
                        "resourceVersion",
                        "creationTimestamp",
                        "generation",
                        "managedFields",
                    ] {
                        meta.remove(server_set);
                    }
                }
                // Status is its own subresource: a write to the object leaves it alone.
                if let Some(object) = patch.as_object_mut() {
                    object.remove("status");
                }
                merge_patch(&mut new, &patch);
            }
        }
        let new = self.update(&mut state, &target.resource, &key, &old, new);
        json_response(StatusCode::OK, &new)
    }

    fn delete(self: &Arc<Self>, target: &Target, name: &str) -> Response<SimBody> {
        let key = Self::key(target, name);
        let mut state = self.state.lock().expect("sim state");
        let Some(old) = state
            .objects
            .get(&target.resource)
            .and_then(|o| o.get(&key))
            .cloned()
        else {
            return not_found(target, name);
        };
        let finalizers = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if finalizers {
            if old.pointer("/metadata/deletionTimestamp").is_none() {
                let mut new = (*old).clone();
                new["metadata"]["deletionTimestamp"] = now().into();
                let new = self.update(&mut state, &target.resource, &key, &old, new);
                return json_response(StatusCode::OK, &new);
            }
            return json_response(StatusCode::OK, &old);
        }
        self.remove(&mut state, &target.resource, &key);
        json_response(StatusCode::OK, &old)
    }

    fn watch(
        self: &Arc<Self>,
        target: &Target,
        query: &HashMap<String, String>,
        metadata: bool,
    ) -> Response<SimBody> {
        let labels = query.get("labelSelector").cloned().unwrap_or_default();
        let fields = query.get("fieldSelector").cloned().unwrap_or_default();
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|s| s.parse().ok())
            .map_or(Duration::from_secs(300), Duration::from_secs);
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let resource = target.resource.clone();
        let namespace = target.namespace.clone();
        let matches = move |resource_of: &str, object: &Value| {
            resource_of == &*resource
                && namespace.as_ref().is_none_or(|ns| {
                    object
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        == Some(ns)
                })
                && labels_match(&labels, object)
                && fields_match(&fields, object)
        };
        // Under the lock: what the watch starts with, and a subscription that misses nothing
        // committed after it.
        let (initial, mut changes, gone) = {
            let state = self.state.lock().expect("sim state");
            let changes = self.changes.subscribe();
            let oldest = state.log.front().map_or(state.rv + 1, |c| c.rv);
            if from == 0 {
                let current: Vec<(u64, ChangeType, Arc<Value>)> = state
                    .objects
                    .get(&target.resource)
                    .into_iter()
                    .flatten()
                    .filter(|(_, o)| matches(&target.resource, o))
                    .map(|(_, o)| (state.rv, ChangeType::Added, o.clone()))
                    .collect();
                (current, changes, false)
            } else if from + 1 < oldest && from < state.rv {
                (vec![], changes, true)
            } else {
                let replay = state
                    .log
                    .iter()
                    .filter(|c| c.rv > from && matches(&c.resource, &c.object))
                    .map(|c| (c.rv, c.kind, c.object.clone()))
                    .collect();
                (replay, changes, false)
            }
        };
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
        let line = move |kind: ChangeType, object: &Value| {
            let object = if metadata {
                metadata_only(object)
            } else {
                object.clone()
            };
            let mut text = json!({"type": kind.as_str(), "object": object}).to_string();
            text.push('\n');
            Ok(Frame::data(Bytes::from(text)))
        };
        let this = self.clone();
        this.stats.open_watches.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut last = from;
            'stream: {
                if gone {
                    let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                        "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
                        "message": format!("too old resource version: {from}")}});
                    let _ = tx
                        .send(Ok(Frame::data(Bytes::from(format!("{status}\n")))))
                        .await;
                    break 'stream;
                }
                for (rv, kind, object) in initial {
                    last = last.max(rv);
                    if tx.send(line(kind, &object)).await.is_err() {
                        break 'stream;
                    }
                }
                loop {
                    tokio::select! {
                        change = changes.recv() => match change {
                            Ok(change) => {
                                if change.rv <= last || !matches(&change.resource, &change.object) {
                                    continue;
                                }
                                last = change.rv;
                                if tx.send(line(change.kind, &change.object)).await.is_err() {
                                    break 'stream;
                                }
                            }
                            // Fell behind or the cluster is gone: end the watch; the client
                            // resumes from the last version it saw.
                            Err(_) => break 'stream,
                        },
                        _ = &mut deadline => break 'stream,
                        _ = tx.closed() => break 'stream,
                    }
                }
            }
            this.stats.open_watches.fetch_sub(1, Ordering::Relaxed);
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        });
        let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        response
    }

    /// Runs a Job as the Job controller and a kubelet would: a pod appears and runs, then
    /// ends with the termination messages the real images write; the Job completes.
    fn drive_job(self: &Arc<Self>, job: Arc<Value>) {
        let this = self.clone();
        let timings = self.timings;
        tokio::spawn(async move {
            let (ns, job_name) = name_of(&job);
            let uid = job
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            tokio::time::sleep(timings.start).await;
            let template = job.pointer("/spec/template").cloned().unwrap_or_default();
            let mut labels = template
                .pointer("/metadata/labels")
                .cloned()
                .unwrap_or_else(|| json!({}));
            merge_patch(
                &mut labels,
                &json!({"batch.kubernetes.io/job-name": job_name, "job-name": job_name,
                    "batch.kubernetes.io/controller-uid": uid, "controller-uid": uid}),
            );
            let pod_name = format!("{job_name}-{:05x}", rand::random::<u32>() & 0xfffff);
            let spec = template.get("spec").cloned().unwrap_or_default();
            let container_names = |field: &str| -> Vec<String> {
                spec.get(field)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.get("name").and_then(Value::as_str).map(String::from))
                    .collect()
            };
            let (init, main) = (
                container_names("initContainers"),
                container_names("containers"),
            );
            let pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": ns, "labels": labels,
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                        "uid": uid, "controller": true, "blockOwnerDeletion": true}]},
                "spec": spec,
                "status": {"phase": "Running", "startTime": now()}});
            {
                let mut state = this.state.lock().expect("sim state");
                if this.insert(&mut state, "/pods".into(), pod).is_err() {
                    return;
                }
                this.set_job_status(
                    &mut state,
                    &ns,
                    &job_name,
                    json!({"active": 1, "startTime": now()}),
                );
            }
            let running_for = if job_name.ends_with("-build") {
                timings.build
            } else {
                timings.other
            };
            tokio::time::sleep(running_for).await;
            let terminated = |name: &str| {
                let message = match name {
                    "commit" => COMMIT.to_string(),
                    "build" => format!("sha256:{:064x}", rand::random::<u128>()),
                    _ => String::new(),
                };
                json!({"name": name, "image": "", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": message,
                        "startedAt": now(), "finishedAt": now()}}})
            };
            let status = json!({"status": {"phase": "Succeeded",
                "initContainerStatuses": init.iter().map(|n| terminated(n)).collect::<Vec<_>>(),
                "containerStatuses": main.iter().map(|n| terminated(n)).collect::<Vec<_>>()}});
            let mut state = this.state.lock().expect("sim state");
            this.merge_stored(&mut state, "/pods", &ns, &pod_name, &status);
            if job.pointer("/metadata/labels/shapeblock.io~1step") == Some(&json!("deploy")) {
                this.helm_deploys(&mut state, &ns, &job);
            }
            let done = now();
            this.set_job_status(
                &mut state,
                &ns,
                &job_name,
                json!({"active": 0, "succeeded": 1, "completionTime": done, "conditions": [
                    {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": done},
                    {"type": "Complete", "status": "True", "lastTransitionTime": done}]}),
            );
        });
    }

    /// What helm does for an App's deploy Job: the release's Deployment, named after the App
    /// and running the image of the values Secret, rolled out at once (pods are not
    /// simulated).
    fn helm_deploys(self: &Arc<Self>, state: &mut State, ns: &str, job: &Value) {
        let Some(app) = job
            .pointer("/metadata/labels/shapeblock.io~1app")
            .and_then(Value::as_str)
        else {
            return;
        };
        let secret_name = job
            .pointer("/spec/template/spec/volumes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|v| v["name"] == "values")
            .and_then(|v| v.pointer("/secret/secretName"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let secret = state
            .objects
            .get("/secrets")
            .and_then(|o| o.get(&(ns.to_string(), secret_name.to_string())))
            .cloned();
        let values: Value = secret
            .and_then(|s| {
                s.pointer("/stringData/values.yaml")
                    .and_then(Value::as_str)
                    .map(String::from)
            })
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        let replicas = values["replicas"].as_i64().unwrap_or(1);
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": app, "namespace": ns,
                "labels": {"shapeblock.io/app": app, "app.kubernetes.io/managed-by": "Helm"},
                "annotations": {"meta.helm.sh/release-name": app, "meta.helm.sh/release-namespace": ns}},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [
                {"name": "app", "image": values["image"]}]}}},
            "status": {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                "readyReplicas": replicas, "availableReplicas": replicas}});
        // The App's health turns Running from this write on: its relay latency is measured
        // from here (Deployment committed → runtime event at the ShapeBlock server).
        self.phases.insert(
            phase_key(&self.id, HEALTH_KIND, ns, app, "Running"),
            Instant::now(),
        );
        let key = (ns.to_string(), app.to_string());
        let resource: Arc<str> = "apps/deployments".into();
        let existing = state
            .objects
            .get(&resource)
            .and_then(|o| o.get(&key))
            .cloned();
        match existing {
            Some(old) => {
                let mut new = (*old).clone();
                merge_patch(&mut new, &deployment);
                // The Deployment controller observes the generation a changed spec brings.
                let generation = old
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(1)
                    + i64::from(new.get("spec") != old.get("spec"));
                new["status"]["observedGeneration"] = generation.into();
                self.update(state, &resource, &key, &old, new);
            }
            None => {
                let _ = self.insert(state, resource, deployment);
            }
        }
    }

    fn set_job_status(self: &Arc<Self>, state: &mut State, ns: &str, job: &str, status: Value) {
        self.merge_stored(state, "batch/jobs", ns, job, &json!({"status": status}));
    }

    /// Merges a patch into a stored object, as a controller of the cluster would write it.
    fn merge_stored(
        self: &Arc<Self>,
        state: &mut State,
        resource: &str,
        ns: &str,
        name: &str,
        patch: &Value,
    ) {
        let key = (ns.to_string(), name.to_string());
        let resource: Arc<str> = resource.into();
        if let Some(old) = state
            .objects
            .get(&resource)
            .and_then(|o| o.get(&key))
            .cloned()
        {
            let mut new = (*old).clone();
            merge_patch(&mut new, patch);
            self.update(state, &resource, &key, &old, new);
        }
    }
}

fn not_found(target: &Target, name: &str) -> Response<SimBody> {
    status_body(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", target.resource),
    )
}

/// The agent's upstream when this cluster serves its requests (the agent code run in-process).
pub struct Upstream(pub Arc<Cluster>);

impl shapeblock::agent::Upstream for Upstream {
    fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> shapeblock::agent::apiserver::UpstreamFuture<'_> {
        let cluster = self.0.clone();
        Box::pin(async move {
            Ok(cluster
                .handle(request)
                .await
                .map(|body| body.boxed_unsync()))
        })
    }
}

#[cfg(test)]
// benches/fleet_real.rs mounts this file; a harness-less bench compiles no #[test] function.
#[allow(unused_imports)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_resource_namespace_and_subresource() {
        let t =
            Target::parse("/apis/apps.shapeblock.io/v1alpha1/namespaces/shop/appbuilds/b1/status")
                .unwrap();
        assert_eq!(&*t.resource, "apps.shapeblock.io/appbuilds");
        assert_eq!(t.namespace.as_deref(), Some("shop"));
        assert_eq!(t.name.as_deref(), Some("b1"));
        assert_eq!(t.sub.as_deref(), Some("status"));
        let t = Target::parse("/api/v1/namespaces/shop").unwrap();
        assert_eq!(
            (&*t.resource, t.namespace, t.name.as_deref()),
            ("/namespaces", None, Some("shop"))
        );
        let t = Target::parse("/api/v1/namespaces/shop/status").unwrap();
        assert_eq!(
            (&*t.resource, t.sub.as_deref()),
            ("/namespaces", Some("status"))
        );
        let t = Target::parse("/apis/batch/v1/jobs").unwrap();
        assert_eq!(
            (&*t.resource, t.namespace, t.name),
            ("batch/jobs", None, None)
        );
        assert!(Target::parse("/version").is_none());
    }

    #[test]
    fn selectors_match_like_the_apiserver() {
        let o =
            json!({"metadata": {"name": "x", "namespace": "n", "labels": {"a": "1", "b": "2"}}});
        assert!(labels_match("a=1,b", &o));
        assert!(labels_match("a==1,c!=3,!c", &o));
        assert!(!labels_match("a=2", &o));
        assert!(!labels_match("c", &o));
        assert!(fields_match("metadata.name=x,metadata.namespace=n", &o));
        assert!(!fields_match("metadata.name=y", &o));
        assert_eq!(percent_decode("a%3Db%2Cc"), "a=b,c");
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut target = json!({"a": {"b": 1, "c": 2}, "d": [1, 2]});
        merge_patch(&mut target, &json!({"a": {"b": null, "e": 3}, "d": [3]}));
        assert_eq!(target, json!({"a": {"c": 2, "e": 3}, "d": [3]}));
    }
}
