//! An in-process stand-in for kube-apiserver, for tests and benchmarks
//! (no real API server can run where CI runs).
//!
//! It speaks the API's HTTP/JSON protocol to a real client (kube-rs) for
//! the resources ipamd uses, and behaves as the real server does where a
//! client can tell:
//!
//! * **list** with `fieldSelector`, `labelSelector` (equality), `limit` and
//!   `continue` (and `remainingItemCount` when there is no selector); the
//!   list's `metadata.resourceVersion` is the store's;
//! * **watch** (`?watch=true`) from a `resourceVersion`: the changes after
//!   it, then live ones, as newline-delimited `{"type","object"}` events;
//!   `ADDED`/`DELETED` when an object enters or leaves a field selector;
//!   `BOOKMARK` events when `allowWatchBookmarks=true`; an `ERROR` event
//!   with a 410 `Expired` Status when the version is older than the kept
//!   history (as etcd compaction makes it); the stream ends after
//!   `timeoutSeconds`; without a version, synthetic `ADDED` events for what
//!   exists first;
//! * **create** (POST, 409 `AlreadyExists`), **replace** (PUT), **delete**
//!   (and the objects it owns by `metadata.ownerReferences`, as the
//!   garbage collector deletes them);
//! * **patch**: `application/merge-patch+json` (RFC 7386) and
//!   `application/strategic-merge-patch+json` (lists merged by their merge
//!   key where Kubernetes declares one: `status.conditions` and
//!   `status.addresses` by `type`; other lists replaced); a
//!   `metadata.resourceVersion` in the patch is a precondition (409
//!   `Conflict`); JSON patch and server-side apply answer 415;
//! * the **status subresource** of nodes and pods: a write to the object
//!   keeps its status, a write to `/status` changes only the status;
//! * a **bearer token** on every request (401 otherwise); verbs can be
//!   forbidden per resource (403, as RBAC answers) and the whole server
//!   taken down (503, open watches cut) and brought back.
//!
//! Errors are `Status` objects with the real reasons and codes. Resources:
//! nodes, pods, ENIConfigs (`crd.k8s.amazonaws.com/v1alpha1`), Events
//! (`events.k8s.io/v1` and core `v1`) and Leases (`coordination.k8s.io/v1`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

/// A resource the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Res {
    Nodes,
    Pods,
    EniConfigs,
    /// `events.k8s.io/v1` Events.
    Events,
    /// Core `v1` Events.
    CoreEvents,
    /// `coordination.k8s.io/v1` Leases.
    Leases,
}

impl Res {
    const ALL: [Res; 6] = [
        Res::Nodes,
        Res::Pods,
        Res::EniConfigs,
        Res::Events,
        Res::CoreEvents,
        Res::Leases,
    ];

    /// The resource's plural name, as RBAC and URLs name it.
    pub fn plural(self) -> &'static str {
        match self {
            Res::Nodes => "nodes",
            Res::Pods => "pods",
            Res::EniConfigs => "eniconfigs",
            Res::Events | Res::CoreEvents => "events",
            Res::Leases => "leases",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Res::Nodes | Res::Pods | Res::CoreEvents => "v1",
            Res::EniConfigs => "crd.k8s.amazonaws.com/v1alpha1",
            Res::Events => "events.k8s.io/v1",
            Res::Leases => "coordination.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Res::Nodes => "Node",
            Res::Pods => "Pod",
            Res::EniConfigs => "ENIConfig",
            Res::Events | Res::CoreEvents => "Event",
            Res::Leases => "Lease",
        }
    }

    fn namespaced(self) -> bool {
        matches!(
            self,
            Res::Pods | Res::Events | Res::CoreEvents | Res::Leases
        )
    }

    fn has_status(self) -> bool {
        matches!(self, Res::Nodes | Res::Pods)
    }

    /// Field selectors the real server supports for the resource (the
    /// metadata ones for every resource).
    fn field_ok(self, field: &str) -> bool {
        matches!(field, "metadata.name" | "metadata.namespace")
            || match self {
                Res::Pods => matches!(field, "spec.nodeName" | "status.phase"),
                Res::Nodes => field == "spec.unschedulable",
                _ => false,
            }
    }

    fn base(self) -> &'static str {
        match self {
            Res::Nodes | Res::Pods | Res::CoreEvents => "/api/v1",
            Res::EniConfigs => "/apis/crd.k8s.amazonaws.com/v1alpha1",
            Res::Events => "/apis/events.k8s.io/v1",
            Res::Leases => "/apis/coordination.k8s.io/v1",
        }
    }
}

/// A verb as RBAC names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
}

type Key = (Res, String, String);

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    res: Res,
    old: Option<Arc<Value>>,
    new: Option<Arc<Value>>,
}

struct Store {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    /// The changes a watch can start after; older versions are "too old".
    log: VecDeque<Change>,
    /// The oldest version a watch may start from.
    compacted_to: u64,
    next_uid: u64,
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    token: String,
    down: AtomicBool,
    /// Incremented when the server goes down: open watches end at once.
    epoch: tokio::sync::watch::Sender<u64>,
    forbidden: Mutex<BTreeSet<(Verb, Res)>>,
    requests: Mutex<Vec<(Verb, Res, String)>>,
    history: usize,
    bookmark_every: Duration,
}

/// A running fake API server (stops when dropped).
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a [`FakeApiServer`] is started.
#[derive(Debug, Clone)]
pub struct Options {
    /// The bearer token every request must carry.
    pub token: String,
    /// Changes kept for watches to resume from (etcd's compaction window).
    pub history: usize,
    /// How often an idle watch gets a bookmark.
    pub bookmark_every: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            token: "fake-apiserver-token".into(),
            history: 10_000,
            bookmark_every: Duration::from_secs(1),
        }
    }
}

fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message.into(),
        "reason": reason,
        "code": code.as_u16(),
    });
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok_json(code: StatusCode, v: &Value) -> Response {
    (code, [("content-type", "application/json")], v.to_string()).into_response()
}

fn name_of(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or_default()
}

fn namespace_of(v: &Value) -> &str {
    v["metadata"]["namespace"].as_str().unwrap_or_default()
}

/// A field's value as field selectors compare it ("" when absent).
fn field(v: &Value, path: &str) -> String {
    let mut cur = v;
    for p in path.split('.') {
        cur = &cur[p];
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Null => match path {
            "spec.unschedulable" => "false".into(),
            _ => String::new(),
        },
        other => other.to_string(),
    }
}

/// `a=b,c!=d` (also `==`) as (path, wanted, equal?).
fn parse_selector(s: &str) -> Result<Vec<(String, String, bool)>, String> {
    let mut out = vec![];
    for term in s.split(',').filter(|t| !t.is_empty()) {
        let (k, v, eq) = if let Some((k, v)) = term.split_once("!=") {
            (k, v, false)
        } else if let Some((k, v)) = term.split_once("==") {
            (k, v, true)
        } else if let Some((k, v)) = term.split_once('=') {
            (k, v, true)
        } else {
            return Err(format!("invalid selector: {term:?}"));
        };
        out.push((k.trim().to_string(), v.trim().to_string(), eq));
    }
    Ok(out)
}

#[derive(Debug, Default, Clone)]
struct Filter {
    namespace: Option<String>,
    fields: Vec<(String, String, bool)>,
    labels: Vec<(String, String, bool)>,
}

impl Filter {
    fn matches(&self, v: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if namespace_of(v) != ns {
                return false;
            }
        }
        self.fields
            .iter()
            .all(|(k, want, eq)| (field(v, k) == *want) == *eq)
            && self.labels.iter().all(|(k, want, eq)| {
                let got = v["metadata"]["labels"][k.as_str()].as_str();
                (got == Some(want.as_str())) == *eq
            })
    }
}

/// RFC 7386 merge patch, or with `strategic` Kubernetes' strategic merge
/// for the lists that declare a merge key.
fn merge(target: &mut Value, patch: &Value, path: &str, strategic: bool) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        let sub = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        if v.is_null() {
            t.remove(k);
            continue;
        }
        let merge_key = match sub.as_str() {
            "status.conditions" | "status.addresses" if strategic => Some("type"),
            _ => None,
        };
        match (merge_key, v) {
            (Some(mk), Value::Array(items)) => {
                let list = t.entry(k.clone()).or_insert_with(|| json!([]));
                if !list.is_array() {
                    *list = json!([]);
                }
                let list = list.as_array_mut().expect("array");
                for item in items {
                    let key = &item[mk];
                    match list.iter_mut().find(|e| &e[mk] == key) {
                        Some(e) => merge(e, item, "", false),
                        None => list.push(item.clone()),
                    }
                }
            }
            _ => {
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                if v.is_object() {
                    merge(slot, v, &sub, strategic);
                } else {
                    *slot = v.clone();
                }
            }
        }
    }
}

impl Store {
    fn record(
        &mut self,
        res: Res,
        old: Option<Arc<Value>>,
        new: Option<Arc<Value>>,
        history: usize,
    ) -> Change {
        let c = Change {
            rv: self.rv,
            res,
            old,
            new,
        };
        self.log.push_back(c.clone());
        while self.log.len() > history {
            let gone = self.log.pop_front().expect("non-empty");
            self.compacted_to = gone.rv;
        }
        c
    }

    fn stamp(&mut self, res: Res, v: &mut Value, created: Option<&Value>) {
        self.rv += 1;
        let m = &mut v["metadata"];
        if !m.is_object() {
            *m = json!({});
        }
        m["resourceVersion"] = json!(self.rv.to_string());
        match created {
            Some(old) => {
                m["uid"] = old["metadata"]["uid"].clone();
                m["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
            }
            None => {
                self.next_uid += 1;
                m["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.next_uid));
                m["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
        }
        v["kind"] = json!(res.kind());
        v["apiVersion"] = json!(res.api_version());
    }
}

impl FakeApiServer {
    /// Starts on an ephemeral loopback port.
    pub async fn start(opts: Options) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake apiserver");
        let addr = listener.local_addr().expect("local addr");
        let (changes, _) = broadcast::channel(65_536);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 1000,
                objects: BTreeMap::new(),
                log: VecDeque::new(),
                compacted_to: 1000,
                next_uid: 0,
            }),
            changes,
            token: opts.token,
            down: AtomicBool::new(false),
            epoch: tokio::sync::watch::Sender::new(0),
            forbidden: Mutex::new(BTreeSet::new()),
            requests: Mutex::new(vec![]),
            history: opts.history.max(1),
            bookmark_every: opts.bookmark_every,
        });
        let s = shared.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let s = s.clone();
                async move { handle(s, method, uri, headers, body).await }
            },
        );
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        Self { shared, addr, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// Writes a kubeconfig for this server (its URL and token) into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let cfg = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url()}}],
            "users": [{"name": "ipamd", "user": {"token": self.shared.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "ipamd"}}],
            "current-context": "fake",
        });
        let path = dir.join("kubeconfig");
        std::fs::write(&path, serde_json::to_vec_pretty(&cfg).expect("json")).expect("kubeconfig");
        path
    }

    /// Creates or replaces an object (its kind and version are set from
    /// `res`); returns it as stored.
    pub fn put(&self, res: Res, mut obj: Value) -> Value {
        let sh = &self.shared;
        let mut st = sh.store.lock().expect("lock");
        let key = (
            res,
            namespace_of(&obj).to_string(),
            name_of(&obj).to_string(),
        );
        let old = st.objects.get(&key).cloned();
        st.stamp(res, &mut obj, old.as_deref());
        let new = Arc::new(obj);
        st.objects.insert(key, new.clone());
        let c = st.record(res, old, Some(new.clone()), sh.history);
        sh.changes.send(c).ok();
        (*new).clone()
    }

    /// Puts many objects at once (one change each).
    pub fn put_all(&self, res: Res, objs: impl IntoIterator<Item = Value>) {
        for o in objs {
            self.put(res, o);
        }
    }

    /// Deletes an object; whether it existed.
    pub fn delete(&self, res: Res, namespace: &str, name: &str) -> bool {
        let sh = &self.shared;
        let mut st = sh.store.lock().expect("lock");
        delete_locked(sh, &mut st, res, namespace, name).is_some()
    }

    pub fn get(&self, res: Res, namespace: &str, name: &str) -> Option<Value> {
        let st = self.shared.store.lock().expect("lock");
        st.objects
            .get(&(res, namespace.to_string(), name.to_string()))
            .map(|v| (**v).clone())
    }

    /// Every object of `res`.
    pub fn list(&self, res: Res) -> Vec<Value> {
        let st = self.shared.store.lock().expect("lock");
        st.objects
            .iter()
            .filter(|((r, _, _), _)| *r == res)
            .map(|(_, v)| (**v).clone())
            .collect()
    }

    /// Takes the server down (every request answered 503, open watches
    /// cut) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            self.shared.epoch.send_modify(|e| *e += 1);
        }
    }

    /// Answers `verb` on `res` with 403, as RBAC does without a rule.
    pub fn forbid(&self, verb: Verb, res: Res) {
        self.shared
            .forbidden
            .lock()
            .expect("lock")
            .insert((verb, res));
    }

    pub fn allow(&self, verb: Verb, res: Res) {
        self.shared
            .forbidden
            .lock()
            .expect("lock")
            .remove(&(verb, res));
    }

    /// Forgets the history: a watch resuming from an older version gets
    /// 410 Gone.
    pub fn compact(&self) {
        let mut st = self.shared.store.lock().expect("lock");
        st.log.clear();
        st.compacted_to = st.rv;
    }

    /// Requests served so far (verb, resource, path), authorized or not.
    pub fn requests(&self) -> Vec<(Verb, Res, String)> {
        self.shared.requests.lock().expect("lock").clone()
    }
}

fn delete_locked(
    sh: &Shared,
    st: &mut Store,
    res: Res,
    ns: &str,
    name: &str,
) -> Option<Arc<Value>> {
    let old = st
        .objects
        .remove(&(res, ns.to_string(), name.to_string()))?;
    st.rv += 1;
    let mut gone = (*old).clone();
    gone["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    let c = st.record(res, Some(Arc::new(gone)), None, sh.history);
    sh.changes.send(c).ok();
    // The garbage collector: objects owned by the one deleted go too
    // (the real one does it in the background, soon after).
    let uid = old["metadata"]["uid"].clone();
    let owned: Vec<(Res, String, String)> = st
        .objects
        .iter()
        .filter(|(_, v)| {
            v["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|refs| refs.iter().any(|r| !uid.is_null() && r["uid"] == uid))
        })
        .map(|(k, _)| k.clone())
        .collect();
    for (r, n, o) in owned {
        delete_locked(sh, st, r, &n, &o);
    }
    Some(old)
}

/// What a URL names: the resource, the namespace, the object and whether
/// it is the status subresource.
struct Target {
    res: Res,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn route(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (res_base, rest): (Option<(&str, usize)>, _) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => (Some(("core", 2)), rest),
        ["apis", "crd.k8s.amazonaws.com", "v1alpha1", rest @ ..] => (Some(("crd", 3)), rest),
        ["apis", "events.k8s.io", "v1", rest @ ..] => (Some(("events", 3)), rest),
        ["apis", "coordination.k8s.io", "v1", rest @ ..] => (Some(("coordination", 3)), rest),
        _ => (None, &[][..]),
    };
    let (group, _) = res_base?;
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(*s)),
        _ => return None,
    };
    let res = match (group, plural) {
        ("core", "nodes") => Res::Nodes,
        ("core", "pods") => Res::Pods,
        ("core", "events") => Res::CoreEvents,
        ("crd", "eniconfigs") => Res::EniConfigs,
        ("events", "events") => Res::Events,
        ("coordination", "leases") => Res::Leases,
        _ => return None,
    };
    if res.namespaced() != namespace.is_some() && !(name.is_none() && res.namespaced()) {
        return None;
    }
    let status = match sub {
        None => false,
        Some("status") if res.has_status() => true,
        Some(_) => return None,
    };
    Some(Target {
        res,
        namespace,
        name,
        status,
    })
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pair in uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(decode(k), decode(v));
    }
    out
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    sh: Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(t) = route(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "the server could not find the requested resource ({})",
                uri.path()
            ),
        );
    };
    let q = query(&uri);
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&method, &t.name) {
        (&Method::GET, None) if watching => Verb::Watch,
        (&Method::GET, None) => Verb::List,
        (&Method::GET, Some(_)) => Verb::Get,
        (&Method::POST, None) => Verb::Create,
        (&Method::PUT, Some(_)) => Verb::Update,
        (&Method::PATCH, Some(_)) => Verb::Patch,
        (&Method::DELETE, Some(_)) => Verb::Delete,
        _ => {
            return status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} is not supported on {}", uri.path()),
            )
        }
    };
    sh.requests
        .lock()
        .expect("lock")
        .push((verb, t.res, uri.path().to_string()));
    if sh.down.load(Ordering::SeqCst) {
        return status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        );
    }
    let authorized = headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .is_some_and(|tok| tok == sh.token);
    if !authorized {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    if sh.forbidden.lock().expect("lock").contains(&(verb, t.res)) {
        let verb_s = format!("{verb:?}").to_lowercase();
        let name = t
            .name
            .as_deref()
            .map(|n| format!(" {n:?}"))
            .unwrap_or_default();
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "{}{name} is forbidden: User \"system:serviceaccount:kube-system:vpc-cni\" cannot {verb_s} resource \"{}\" in API group \"{}\"",
                t.res.plural(),
                t.res.plural(),
                t.res.api_version().split_once('/').map_or("", |(g, _)| g)
            ),
        );
    }
    match verb {
        Verb::List => list(&sh, &t, &q),
        Verb::Watch => watch(sh, t, q),
        Verb::Get => {
            let st = sh.store.lock().expect("lock");
            let key = (
                t.res,
                t.namespace.clone().unwrap_or_default(),
                t.name.clone().unwrap_or_default(),
            );
            match st.objects.get(&key) {
                Some(v) => ok_json(StatusCode::OK, v),
                None => not_found(&t),
            }
        }
        Verb::Create => create(&sh, &t, &body),
        Verb::Update | Verb::Patch => write(&sh, &t, verb, &headers, &body),
        Verb::Delete => {
            let mut st = sh.store.lock().expect("lock");
            let ns = t.namespace.clone().unwrap_or_default();
            let name = t.name.clone().unwrap_or_default();
            match delete_locked(&sh, &mut st, t.res, &ns, &name) {
                Some(old) => ok_json(StatusCode::OK, &old),
                None => not_found(&t),
            }
        }
    }
}

fn not_found(t: &Target) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!(
            "{} {:?} not found",
            t.res.plural(),
            t.name.as_deref().unwrap_or_default()
        ),
    )
}

/// The request's selectors; the text of a 400 when they are bad.
fn filter(t: &Target, q: &BTreeMap<String, String>) -> Result<Filter, String> {
    let fields = parse_selector(q.get("fieldSelector").map_or("", String::as_str))?;
    if let Some((f, _, _)) = fields.iter().find(|(f, _, _)| !t.res.field_ok(f)) {
        return Err(format!("field label not supported: {f}"));
    }
    let labels = parse_selector(q.get("labelSelector").map_or("", String::as_str))?;
    Ok(Filter {
        namespace: t.namespace.clone(),
        fields,
        labels,
    })
}

fn list(sh: &Shared, t: &Target, q: &BTreeMap<String, String>) -> Response {
    let f = match filter(t, q) {
        Ok(f) => f,
        Err(m) => return status(StatusCode::BAD_REQUEST, "BadRequest", m),
    };
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let st = sh.store.lock().expect("lock");
    // continue = "<resourceVersion>/<items already given>".
    let (rv, skip) = match q.get("continue").filter(|c| !c.is_empty()) {
        None => (st.rv, 0),
        Some(c) => match c
            .split_once('/')
            .and_then(|(r, s)| Some((r.parse().ok()?, s.parse().ok()?)))
        {
            Some(x) => x,
            None => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "invalid continue token",
                )
            }
        },
    };
    let mut items = vec![];
    let mut remaining = 0u64;
    let mut seen = 0usize;
    for ((r, _, _), v) in &st.objects {
        if *r != t.res || !f.matches(v) {
            continue;
        }
        seen += 1;
        if seen <= skip {
            continue;
        }
        if items.len() == limit {
            remaining += 1;
            continue;
        }
        items.push(v.clone());
    }
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if remaining > 0 {
        meta["continue"] = json!(format!("{rv}/{}", skip + items.len()));
        // As the real API server: counted only for a list without
        // selectors.
        if !q.contains_key("labelSelector") && !q.contains_key("fieldSelector") {
            meta["remainingItemCount"] = json!(remaining);
        }
    }
    // Serialized by hand: the items are shared, not copied.
    let mut body = format!(
        "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{},\"items\":[",
        t.res.kind(),
        t.res.api_version(),
        meta
    );
    for (i, v) in items.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&v.to_string());
    }
    body.push_str("]}");
    (StatusCode::OK, [("content-type", "application/json")], body).into_response()
}

fn event_line(kind: &str, obj: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": obj}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn watch(sh: Arc<Shared>, t: Target, q: BTreeMap<String, String>) -> Response {
    let f = match filter(&t, &q) {
        Ok(f) => f,
        Err(m) => return status(StatusCode::BAD_REQUEST, "BadRequest", m),
    };
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let from: Option<u64> = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(v) => match v.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("invalid resourceVersion {v:?}"),
                )
            }
        },
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1024);
    let res = t.res;
    let (backlog, mut live, mut last_rv) = {
        let st = sh.store.lock().expect("lock");
        let live = sh.changes.subscribe();
        let mut backlog = vec![];
        match from {
            Some(v) if v < st.compacted_to => {
                let gone = json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {v} ({})", st.compacted_to),
                    "reason": "Expired", "code": 410,
                });
                backlog.push(event_line("ERROR", &gone));
                drop(st);
                let tx2 = tx.clone();
                tokio::spawn(async move {
                    for b in backlog {
                        tx2.send(Ok(b)).await.ok();
                    }
                });
                drop(tx);
                return stream_response(rx);
            }
            Some(v) => {
                for c in st.log.iter().filter(|c| c.rv > v && c.res == res) {
                    if let Some(line) = translate(c, &f) {
                        backlog.push(line);
                    }
                }
            }
            None => {
                for ((r, _, _), v) in &st.objects {
                    if *r == res && f.matches(v) {
                        backlog.push(event_line("ADDED", v));
                    }
                }
            }
        }
        (backlog, live, st.rv)
    };
    let mut epoch = sh.epoch.subscribe();
    epoch.mark_unchanged();
    tokio::spawn(async move {
        for b in backlog {
            if tx.send(Ok(b)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval(sh.bookmark_every);
        tick.tick().await;
        loop {
            tokio::select! {
                biased;
                // The server went down: the connection is cut.
                _ = epoch.changed() => return,
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tick.tick() => {
                    if bookmarks {
                        let obj = json!({"kind": res.kind(), "apiVersion": res.api_version(),
                            "metadata": {"resourceVersion": last_rv.to_string()}});
                        if tx.send(Ok(event_line("BOOKMARK", &obj))).await.is_err() {
                            return;
                        }
                    }
                }
                c = live.recv() => match c {
                    Ok(c) => {
                        last_rv = last_rv.max(c.rv);
                        if c.res != res {
                            continue;
                        }
                        if let Some(line) = translate(&c, &f) {
                            if tx.send(Ok(line)).await.is_err() {
                                return;
                            }
                        }
                    }
                    // Too slow a watcher is cut off, as the real server does.
                    Err(_) => return,
                },
            }
        }
    });
    stream_response(rx)
}

fn stream_response(rx: tokio::sync::mpsc::Receiver<Result<Bytes, Infallible>>) -> Response {
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    (StatusCode::OK, [("content-type", "application/json")], body).into_response()
}

/// The watch event a change is to a watcher with filter `f`.
fn translate(c: &Change, f: &Filter) -> Option<Bytes> {
    let was = c.old.as_deref().is_some_and(|o| f.matches(o));
    let is = c.new.as_deref().is_some_and(|n| f.matches(n));
    match (was, is, &c.new) {
        (false, true, Some(n)) => Some(event_line("ADDED", n)),
        (true, true, Some(n)) => Some(event_line("MODIFIED", n)),
        // Leaving the selector: the object as the watcher knew it, at the
        // new version (as the real server sends it).
        (true, false, Some(n)) => {
            let mut old = c.old.as_deref()?.clone();
            old["metadata"]["resourceVersion"] = n["metadata"]["resourceVersion"].clone();
            Some(event_line("DELETED", &old))
        }
        (true, false, None) => Some(event_line("DELETED", c.old.as_deref()?)),
        _ => None,
    }
}

fn create(sh: &Shared, t: &Target, body: &[u8]) -> Response {
    let mut obj: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the body is not a JSON object",
            )
        }
    };
    if name_of(&obj).is_empty() {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name: Required value: name is required",
        );
    }
    if let Some(ns) = &t.namespace {
        match obj["metadata"]["namespace"].as_str() {
            Some(given) if given != ns => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            }
            _ => obj["metadata"]["namespace"] = json!(ns),
        }
    }
    let mut st = sh.store.lock().expect("lock");
    let key = (
        t.res,
        namespace_of(&obj).to_string(),
        name_of(&obj).to_string(),
    );
    if st.objects.contains_key(&key) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} {:?} already exists", t.res.plural(), key.2),
        );
    }
    st.stamp(t.res, &mut obj, None);
    let new = Arc::new(obj);
    st.objects.insert(key, new.clone());
    let c = st.record(t.res, None, Some(new.clone()), sh.history);
    sh.changes.send(c).ok();
    ok_json(StatusCode::CREATED, &new)
}

fn write(sh: &Shared, t: &Target, verb: Verb, headers: &HeaderMap, body: &[u8]) -> Response {
    let patch: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("the body is not JSON: {e}"),
            )
        }
    };
    let ctype = headers
        .get("content-type")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let strategic = match (verb, ctype.as_str()) {
        (Verb::Update, _) => false,
        (Verb::Patch, "application/merge-patch+json") => false,
        (Verb::Patch, "application/strategic-merge-patch+json") if t.res != Res::EniConfigs => true,
        (Verb::Patch, other) => {
            return status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format ({other}) for this stand-in: merge-patch+json and strategic-merge-patch+json are served"),
            )
        }
        _ => false,
    };
    let mut st = sh.store.lock().expect("lock");
    let key = (
        t.res,
        t.namespace.clone().unwrap_or_default(),
        t.name.clone().unwrap_or_default(),
    );
    let Some(old) = st.objects.get(&key).cloned() else {
        return not_found(t);
    };
    if let Some(want) = patch["metadata"]["resourceVersion"].as_str() {
        if old["metadata"]["resourceVersion"].as_str() != Some(want) {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} {:?}: the object has been modified; please apply your changes to the latest version and try again",
                    t.res.plural(),
                    key.2
                ),
            );
        }
    }
    let mut new = if verb == Verb::Update {
        patch.clone()
    } else {
        let mut n = (*old).clone();
        merge(&mut n, &patch, "", strategic);
        n
    };
    if name_of(&new) != key.2 {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the name of the object does not match the name on the URL",
        );
    }
    if t.res.has_status() {
        // The status subresource: each side keeps what is not its own.
        if t.status {
            let s = new["status"].clone();
            new = (*old).clone();
            new["status"] = s;
        } else {
            new["status"] = old["status"].clone();
        }
    }
    st.stamp(t.res, &mut new, Some(&old));
    let new = Arc::new(new);
    st.objects.insert(key, new.clone());
    let c = st.record(t.res, Some(old), Some(new.clone()), sh.history);
    sh.changes.send(c).ok();
    ok_json(StatusCode::OK, &new)
}

impl Res {
    /// The list URL of the resource (all namespaces).
    pub fn list_path(self) -> String {
        format!("{}/{}", self.base(), self.plural())
    }

    /// Every resource the fake serves.
    pub fn all() -> [Res; 6] {
        Self::ALL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategic_merge_merges_conditions_by_type_and_replaces_other_lists() {
        let mut node = json!({
            "spec": {"taints": [{"key": "a", "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        });
        let patch = json!({
            "spec": {"taints": [{"key": "b", "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "X", "status": "True"}, {"type": "Ready", "reason": "r"}]},
        });
        merge(&mut node, &patch, "", true);
        assert_eq!(
            node["spec"]["taints"],
            json!([{"key": "b", "effect": "NoSchedule"}])
        );
        assert_eq!(
            node["status"]["conditions"],
            json!([{"type": "Ready", "status": "True", "reason": "r"}, {"type": "X", "status": "True"}])
        );
        // A merge patch replaces the list.
        merge(
            &mut node,
            &json!({"status": {"conditions": []}, "spec": {"taints": null}}),
            "",
            false,
        );
        assert_eq!(node["status"]["conditions"], json!([]));
        assert!(node["spec"].get("taints").is_none());
    }

    #[test]
    fn selectors_and_routes() {
        let pod = json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"}});
        let f = Filter {
            fields: parse_selector("spec.nodeName=n1,metadata.name!=q").unwrap(),
            ..Default::default()
        };
        assert!(f.matches(&pod));
        let f = Filter {
            fields: parse_selector("spec.nodeName==n2").unwrap(),
            ..Default::default()
        };
        assert!(!f.matches(&pod));
        let t = route("/api/v1/nodes/n1/status").unwrap();
        assert!(t.res == Res::Nodes && t.status && t.name.as_deref() == Some("n1"));
        let t = route("/apis/events.k8s.io/v1/namespaces/default/events").unwrap();
        assert!(t.res == Res::Events && t.namespace.as_deref() == Some("default"));
        assert!(route("/api/v1/pods").is_some(), "pods in all namespaces");
        assert!(route("/api/v1/nodes/n1/proxy").is_none());
        assert_eq!(decode("spec.nodeName%3Dn1"), "spec.nodeName=n1");
    }
}
