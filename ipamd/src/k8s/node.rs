//! ipamd's own Node: the startup taint, the exhaustion condition and
//! taint, the capacity annotation, cordon, and Events.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::eniconfig::{selected_name, target_from, ENIConfig};
use super::{describe, forbidden, KubeSettings, KubeStatus};
use super::{CAPACITY_ANNOTATION, CONDITION, EXHAUSTED_TAINT, REPORTER};
use crate::explain::Verdict;
use crate::ipam::Ipam;

/// What of the Node the plan looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    pub resource_version: String,
    /// The node's taints as the API has them (every field kept, e.g. the
    /// lifecycle controller's `timeAdded`), in its order.
    pub taints: Vec<Value>,
    pub annotations: BTreeMap<String, String>,
    pub unschedulable: bool,
    /// Our condition's (status, reason), if the node has it.
    pub condition: Option<(String, String)>,
}

impl NodeView {
    pub fn of(n: &Node) -> Self {
        let spec = n.spec.clone().unwrap_or_default();
        Self {
            resource_version: n.metadata.resource_version.clone().unwrap_or_default(),
            taints: spec
                .taints
                .unwrap_or_default()
                .iter()
                .filter_map(|t| serde_json::to_value(t).ok())
                .collect(),
            annotations: n.metadata.annotations.clone().unwrap_or_default(),
            unschedulable: spec.unschedulable.unwrap_or(false),
            condition: n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == CONDITION))
                .map(|c| (c.status.clone(), c.reason.clone().unwrap_or_default())),
        }
    }
}

/// What the node should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Remove this startup taint (ipamd is ready and the conflist is in
    /// place); `None` while not ready or when none is configured.
    pub remove_startup_taint: Option<String>,
    /// `Some((reason, message))` while exhausted.
    pub exhausted: Option<(String, String)>,
    /// Whether the exhaustion taint is enabled at all.
    pub exhaustion_taint: bool,
    pub capacity: Option<u32>,
}

/// The patches that bring the node to `want`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodePatch {
    /// A merge patch of the object (taints, the capacity annotation), with
    /// the node's resourceVersion as a precondition: taints are one list,
    /// so a concurrent change to them must not be overwritten.
    pub object: Option<Value>,
    /// A strategic merge patch of `/status` (conditions merge by type).
    pub status: Option<Value>,
}

/// The patches that bring `node` to `want` (none when it is there).
/// `now` is the condition's transition time.
pub fn plan_node(node: &NodeView, want: &Desired, now: &Value) -> NodePatch {
    let mut out = NodePatch::default();
    let mut taints = node.taints.clone();
    if let Some(key) = &want.remove_startup_taint {
        taints.retain(|t| t["key"] != key.as_str());
    }
    let ours = |t: &Value| t["key"] == EXHAUSTED_TAINT;
    match (&want.exhausted, want.exhaustion_taint) {
        (Some(_), true) => {
            if !taints.iter().any(ours) {
                taints.push(json!({"key": EXHAUSTED_TAINT, "effect": "NoSchedule"}));
            }
        }
        // Not exhausted, or the taint was turned off since it was set.
        _ => taints.retain(|t| !ours(t)),
    }
    let mut object = serde_json::Map::new();
    if taints != node.taints {
        object.insert("spec".into(), json!({ "taints": taints }));
    }
    if let Some(c) = want.capacity {
        if node.annotations.get(CAPACITY_ANNOTATION) != Some(&c.to_string()) {
            object.insert(
                "metadata".into(),
                json!({"annotations": {CAPACITY_ANNOTATION: c.to_string()}}),
            );
        }
    }
    if !object.is_empty() {
        let meta = object.entry("metadata").or_insert_with(|| json!({}));
        meta["resourceVersion"] = json!(node.resource_version);
        out.object = Some(Value::Object(object));
    }
    let (status, reason, message) = match &want.exhausted {
        Some((reason, message)) => ("True", reason.as_str(), message.as_str()),
        None => (
            "False",
            "AddressesAvailable",
            "the pool has addresses or can grow",
        ),
    };
    let have = node
        .condition
        .as_ref()
        .map(|(s, r)| (s.as_str(), r.as_str()));
    if have != Some((status, reason)) {
        let mut c = json!({
            "type": CONDITION,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
        });
        // A new reason for the same status is no transition: the merge
        // keeps the old transition time.
        if have.map(|(s, _)| s) != Some(status) {
            c["lastTransitionTime"] = now.clone();
        }
        out.status = Some(json!({"status": {"conditions": [c]}}));
    }
    out
}

/// The verdicts that are the node's capacity running out.
fn exhausted(v: Verdict) -> bool {
    matches!(
        v,
        Verdict::SubnetExhausted | Verdict::MaxPods | Verdict::InterfaceLimit
    )
}

/// The verdicts an operator must act on, with the Event's reason.
fn event_reason(v: Verdict) -> Option<&'static str> {
    Some(match v {
        Verdict::PermissionDenied => "CloudPermissionDenied",
        Verdict::SubnetExhausted => "SubnetExhausted",
        Verdict::InterfaceLimit => "InterfaceLimit",
        Verdict::MaxPods => "MaxPods",
        // Posted when the selection fails (see the ENIConfig below).
        _ => return None,
    })
}

fn verdict_reason(v: Verdict) -> &'static str {
    match v {
        Verdict::SubnetExhausted => "SubnetExhausted",
        Verdict::MaxPods => "MaxPods",
        Verdict::InterfaceLimit => "InterfaceLimit",
        _ => "Exhausted",
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The same Event is not posted again within this (the recorder counts
/// repeats as a series anyway).
const EVENT_EVERY: Duration = Duration::from_secs(60);

pub(super) struct NodeTask {
    client: Client,
    ipam: Arc<Ipam>,
    s: KubeSettings,
    status: Arc<Mutex<KubeStatus>>,
    recorder: Recorder,
    events_sent: BTreeMap<&'static str, Instant>,
}

impl NodeTask {
    pub(super) fn new(cx: super::Ctx) -> Self {
        let super::Ctx {
            client,
            ipam,
            s,
            status,
        } = cx;
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: REPORTER.into(),
                instance: Some(s.node_name.clone()),
            },
        );
        Self {
            client,
            ipam,
            s,
            status,
            recorder,
            events_sent: BTreeMap::new(),
        }
    }

    fn set(&self, f: impl FnOnce(&mut KubeStatus)) {
        f(&mut self.status.lock().expect("lock"));
    }

    async fn event(
        &mut self,
        node: Option<&Node>,
        reason: &'static str,
        note: String,
        warning: bool,
    ) {
        let now = Instant::now();
        if self
            .events_sent
            .get(reason)
            .is_some_and(|t| now.duration_since(*t) < EVENT_EVERY)
        {
            return;
        }
        self.events_sent.insert(reason, now);
        let reference = match node {
            Some(n) => n.object_ref(&()),
            None => k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(self.s.node_name.clone()),
                ..Default::default()
            },
        };
        // events.k8s.io refuses a note over 1 KiB (a cloud's error text can
        // be longer, e.g. EC2's encoded authorization message).
        let mut note = note;
        if note.len() > 1024 {
            let mut cut = 1021;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push_str("...");
        }
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &reference).await {
            warn!(reason, error = %describe(&e), "cannot post an Event on the node");
        }
    }

    pub(super) async fn run(
        mut self,
        mut cni_installed: watch::Receiver<bool>,
        mut stop: watch::Receiver<bool>,
    ) {
        let api: Api<Node> = Api::all(self.client.clone());
        let (reader, writer) = reflector::store::<Node>();
        let cfg = watcher::Config::default().fields(&format!("metadata.name={}", self.s.node_name));
        let stream = reflector::reflector(
            writer,
            watcher(api.clone(), cfg).modify(|n: &mut Node| n.metadata.managed_fields = None),
        );
        let mut stream = Box::pin(stream);
        let key = ObjectRef::<Node>::new(&self.s.node_name);
        // Custom networking: the ENIConfigs, cached by a task of their own;
        // `eni_synced` turns true once they are listed and changes with
        // every event.
        let settings = self.ipam.settings().clone();
        let custom = settings.custom_networking;
        // Read as untyped objects: one ENIConfig that does not match the
        // schema (aws-node's CRD accepts anything) must not stop the list;
        // only the selected one is read, field by field.
        let eni_ar = ApiResource::erase::<ENIConfig>(&());
        let eni_writer = reflector::store::Writer::<DynamicObject>::new(eni_ar.clone());
        let eni_reader = eni_writer.as_reader();
        let (eni_tx, mut eni_synced) = watch::channel(false);
        let _eni_task = custom.then(|| {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &eni_ar);
            let eni_tx = eni_tx.clone();
            let status = self.status.clone();
            AbortOnDrop(tokio::spawn(async move {
                let stream = reflector::reflector(
                    eni_writer,
                    watcher(api, watcher::Config::default())
                        .modify(|e: &mut DynamicObject| e.metadata.managed_fields = None),
                );
                let mut stream = Box::pin(stream);
                let mut backoff = super::WatchBackoff::default();
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(watcher::Event::InitDone) => {
                            backoff.progressed();
                            eni_tx.send_replace(true);
                        }
                        Ok(watcher::Event::Init) => {}
                        Ok(_) => {
                            backoff.progressed();
                            eni_tx.send_modify(|_| {});
                        }
                        Err(e) => {
                            backoff.failed();
                            status.lock().expect("lock").watch_failures += 1;
                            warn!(error = %e, "ENIConfig watch failed; retrying");
                            tokio::time::sleep_until(backoff.not_before()).await;
                        }
                    }
                }
            }))
        });
        let mut last_target_err: Option<String> = None;
        let mut changes = self.ipam.pool.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let pp = PatchParams {
            field_manager: Some(REPORTER.into()),
            ..Default::default()
        };
        // (shown, since): the exhaustion state the node shows and when the
        // other state began.
        let mut shown: Option<(String, String)> = None;
        // Seeded from the node's condition when first seen, so a restart
        // on an exhausted node does not clear and re-set it.
        let mut seeded = false;
        // After a write, the version the watch must bring before the node
        // is planned again (the cache has not seen the write yet); a
        // deadline so a lost event does not stall it.
        let mut wait_for: Option<(u64, Instant)> = None;
        let mut other_since: Option<Instant> = None;
        let mut last_verdict = None;
        let mut held = false;
        let mut retry_at = Instant::now();
        let mut backoff = Duration::from_millis(500);
        let mut forbidden_logged = false;
        let mut watch_backoff = super::WatchBackoff::default();
        loop {
            tokio::select! {
                ev = stream.next(), if watch_backoff.ready() => match ev {
                    Some(Err(e)) => {
                        watch_backoff.failed();
                        self.set(|s| {
                            s.last_error = Some(format!("node watch: {e}"));
                            s.watch_failures += 1;
                        });
                        continue;
                    }
                    Some(Ok(watcher::Event::Init)) => {}
                    Some(Ok(_)) => watch_backoff.progressed(),
                    None => return,
                },
                _ = changes.changed() => {}
                _ = cni_installed.changed() => {}
                _ = eni_synced.changed() => {}
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let node = reader.get(&key);
            self.set(|s| s.node_seen = node.is_some());
            // Cordon: hold interface changes (aws-node's meaning).
            let cordoned = node.as_ref().is_some_and(|n| NodeView::of(n).unschedulable);
            let hold = cordoned && !self.s.manage_enis_non_schedulable;
            if hold != held {
                held = hold;
                self.ipam.reconciler.hold_interfaces(hold);
                info!(
                    cordoned,
                    "interfaces {} (AWS_MANAGE_ENIS_NON_SCHEDULABLE={})",
                    if hold {
                        "are neither attached nor deleted while the node is cordoned"
                    } else {
                        "are managed again"
                    },
                    self.s.manage_enis_non_schedulable
                );
            }
            self.set(|s| s.cordoned = cordoned);
            // Custom networking: the node's ENIConfig.
            if custom {
                let target = match (&node, *eni_synced.borrow()) {
                    (None, _) => Err("this node is not in the Kubernetes API yet".to_string()),
                    (_, false) => Err("the ENIConfigs have not been listed yet".to_string()),
                    (Some(n), true) => {
                        let (name, by) = selected_name(
                            n.metadata.annotations.as_ref().unwrap_or(&BTreeMap::new()),
                            n.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
                            &settings.eni_config_annotation_def,
                            &settings.eni_config_label_def,
                        );
                        let found = eni_reader.get(&ObjectRef::new_with(&name, eni_ar.clone()));
                        target_from(name, &by, found.as_ref().map(|e| &e.data["spec"]))
                    }
                };
                let listed = node.is_some() && *eni_synced.borrow();
                match &target {
                    Err(why) if listed && last_target_err.as_ref() != Some(why) => {
                        last_target_err = Some(why.clone());
                        warn!("custom networking: {why}; no interface is created until it does");
                        self.event(
                            node.as_deref(),
                            "ENIConfigMissing",
                            format!(
                                "custom networking: {why}; no interface is created until it does"
                            ),
                            true,
                        )
                        .await;
                    }
                    Ok(t)
                        if last_target_err.is_some()
                            || self.status.lock().expect("lock").eni_config.is_none() =>
                    {
                        last_target_err = None;
                        info!(eni_config = %t.eni_config, subnet = %t.subnet_id, security_groups = ?t.security_groups, "custom networking: new interfaces follow this ENIConfig");
                    }
                    _ => {}
                }
                let shown = match &target {
                    Ok(t) => format!("{}: {}", t.eni_config, t.subnet_id),
                    Err(why) => why.clone(),
                };
                self.set(|s| s.eni_config = Some(shown));
                self.ipam.reconciler.set_interface_target(target);
            }
            // The pool's verdict, settled.
            let facts = self.ipam.pool.facts();
            let (verdict, message) = facts.next_add();
            let now_state =
                exhausted(verdict).then(|| (verdict_reason(verdict).to_string(), message.clone()));
            let now = Instant::now();
            if now_state.is_some() != shown.is_some() {
                let since = *other_since.get_or_insert(now);
                if now.duration_since(since) >= self.s.settle {
                    shown = now_state.clone();
                    other_since = None;
                    match &shown {
                        Some((reason, m)) => {
                            warn!(reason, "pod addresses exhausted on this node: {m}")
                        }
                        None => info!("pod addresses available again on this node"),
                    }
                }
            } else {
                other_since = None;
                if now_state.is_some() {
                    // Keep the reason current (e.g. interface limit, then
                    // subnet exhausted).
                    shown = now_state.clone();
                }
            }
            if last_verdict != Some(verdict) {
                last_verdict = Some(verdict);
                if let Some(reason) = event_reason(verdict) {
                    self.event(node.as_deref(), reason, message.clone(), true)
                        .await;
                }
            }
            let capacity = facts.pod_capacity();
            let ready = self.ipam.readiness().is_ok() && *cni_installed.borrow();
            self.set(|s| {
                s.exhausted = shown.is_some();
                s.capacity = capacity;
            });
            let Some(node) = node else { continue };
            if !seeded {
                seeded = true;
                if let Some((status, reason)) = NodeView::of(&node).condition {
                    if status == "True" && shown.is_none() {
                        shown = Some((reason, "(as the node said at start)".into()));
                    }
                }
            }
            if Instant::now() < retry_at {
                continue;
            }
            let seen: u64 = node
                .metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            match wait_for {
                Some((rv, until)) if seen < rv && Instant::now() < until => continue,
                _ => wait_for = None,
            }
            let want = Desired {
                remove_startup_taint: if ready {
                    self.s.startup_taint.clone()
                } else {
                    None
                },
                exhausted: shown.clone(),
                exhaustion_taint: self.s.exhaustion_taint,
                capacity,
            };
            let view = NodeView::of(&node);
            let stamp =
                serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap_or_default();
            let patch = plan_node(&view, &want, &stamp);
            let startup_present = self
                .s
                .startup_taint
                .as_ref()
                .is_some_and(|k| view.taints.iter().any(|t| t["key"] == k.as_str()));
            let mut failed = None;
            let mut written = |n: &Node| {
                let rv = n
                    .metadata
                    .resource_version
                    .as_deref()
                    .and_then(|v| v.parse().ok());
                if let Some(rv) = rv {
                    wait_for = Some((rv, Instant::now() + Duration::from_secs(5)));
                }
            };
            if let Some(p) = &patch.object {
                match api.patch(&self.s.node_name, &pp, &Patch::Merge(p)).await {
                    Ok(n) => {
                        written(&n);
                        if startup_present && want.remove_startup_taint.is_some() {
                            info!(
                                taint = want.remove_startup_taint.as_deref().unwrap_or_default(),
                                "startup taint removed: pods may be scheduled here"
                            );
                        }
                    }
                    // The node changed under us: the watch brings the new
                    // version, and the plan is made again on it.
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => failed = Some(e),
                }
            }
            if failed.is_none() {
                if let Some(p) = &patch.status {
                    match api
                        .patch_status(&self.s.node_name, &pp, &Patch::Strategic(p))
                        .await
                    {
                        Ok(n) => written(&n),
                        Err(e) => failed = Some(e),
                    }
                }
            }
            if ready && !startup_present {
                self.set(|s| s.startup_taint_removed = true);
            }
            match failed {
                None => {
                    backoff = Duration::from_millis(500);
                    if patch != NodePatch::default() {
                        self.set(|s| s.last_error = None);
                    }
                }
                Some(e) => {
                    let text = describe(&e);
                    retry_at = Instant::now() + crate::reconciler::jittered(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    if forbidden(&e) {
                        if !forbidden_logged {
                            forbidden_logged = true;
                            warn!(error = %text, "RBAC forbids ipamd to update its node (see the chart's ClusterRole)");
                        }
                        self.event(
                            Some(&node),
                            "KubernetesForbidden",
                            format!("ipamd cannot update its node: {text}"),
                            true,
                        )
                        .await;
                    } else {
                        warn!(error = %text, "cannot update the node; retrying");
                    }
                    self.set(|s| s.last_error = Some(text));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(taints: &[&str]) -> NodeView {
        NodeView {
            resource_version: "7".into(),
            taints: taints
                .iter()
                .map(|k| json!({"key": k, "effect": "NoSchedule"}))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn other_taints_keep_every_field_and_a_new_reason_is_no_transition() {
        let now = json!("t2");
        let mut v = view(&[super::super::DEFAULT_STARTUP_TAINT]);
        let lifecycle = json!({"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "timeAdded": "2026-01-01T00:00:00Z"});
        v.taints.push(lifecycle.clone());
        v.condition = Some(("True".into(), "InterfaceLimit".into()));
        let w = Desired {
            remove_startup_taint: Some(super::super::DEFAULT_STARTUP_TAINT.into()),
            exhausted: Some(("SubnetExhausted".into(), "m".into())),
            ..want()
        };
        let p = plan_node(&v, &w, &now);
        assert_eq!(p.object.unwrap()["spec"]["taints"], json!([lifecycle]));
        let c = &p.status.unwrap()["status"]["conditions"][0];
        assert_eq!(c["reason"], "SubnetExhausted");
        assert!(c.get("lastTransitionTime").is_none(), "still True: {c}");
    }

    fn want() -> Desired {
        Desired {
            remove_startup_taint: None,
            exhausted: None,
            exhaustion_taint: false,
            capacity: None,
        }
    }

    #[test]
    fn the_startup_taint_goes_only_when_ready_and_others_stay() {
        let now = json!("t");
        let v = view(&[super::super::DEFAULT_STARTUP_TAINT, "other"]);
        let p = plan_node(&v, &want(), &now);
        assert!(p.object.is_none(), "not ready: the taint stays");
        let w = Desired {
            remove_startup_taint: Some(super::super::DEFAULT_STARTUP_TAINT.into()),
            ..want()
        };
        let p = plan_node(&v, &w, &now);
        let o = p.object.unwrap();
        assert_eq!(
            o["spec"]["taints"],
            json!([{"key": "other", "effect": "NoSchedule"}])
        );
        assert_eq!(
            o["metadata"]["resourceVersion"], "7",
            "a precondition on the version"
        );
        // The condition is written once, False.
        assert_eq!(
            p.status.unwrap()["status"]["conditions"][0]["status"],
            "False"
        );
    }

    #[test]
    fn exhaustion_sets_the_condition_and_the_taint_only_when_enabled() {
        let now = json!("t");
        let mut v = view(&[]);
        v.condition = Some(("False".into(), "AddressesAvailable".into()));
        let w = Desired {
            exhausted: Some(("InterfaceLimit".into(), "full".into())),
            ..want()
        };
        let p = plan_node(&v, &w, &now);
        assert!(p.object.is_none(), "the taint is off");
        let c = &p.status.unwrap()["status"]["conditions"][0];
        assert_eq!(
            (
                c["type"].as_str(),
                c["status"].as_str(),
                c["reason"].as_str()
            ),
            (Some(CONDITION), Some("True"), Some("InterfaceLimit"))
        );
        let w = Desired {
            exhaustion_taint: true,
            ..w
        };
        let o = plan_node(&v, &w, &now).object.unwrap();
        assert_eq!(
            o["spec"]["taints"],
            json!([{"key": EXHAUSTED_TAINT, "effect": "NoSchedule"}])
        );
        // Back to normal: the taint goes, the condition turns False.
        let v2 = NodeView {
            condition: Some(("True".into(), "InterfaceLimit".into())),
            ..view(&[EXHAUSTED_TAINT])
        };
        let p = plan_node(
            &v2,
            &Desired {
                exhaustion_taint: true,
                ..want()
            },
            &now,
        );
        assert_eq!(p.object.unwrap()["spec"]["taints"], json!([]));
        assert_eq!(
            p.status.unwrap()["status"]["conditions"][0]["status"],
            "False"
        );
        // Nothing to do when the node already says it.
        let v3 = NodeView {
            condition: Some(("False".into(), "AddressesAvailable".into())),
            ..view(&[])
        };
        assert_eq!(plan_node(&v3, &want(), &now), NodePatch::default());
    }

    #[test]
    fn the_capacity_annotation_is_written_when_it_differs() {
        let now = json!("t");
        let mut v = view(&[]);
        v.condition = Some(("False".into(), "AddressesAvailable".into()));
        let w = Desired {
            capacity: Some(27),
            ..want()
        };
        let o = plan_node(&v, &w, &now).object.unwrap();
        assert_eq!(o["metadata"]["annotations"][CAPACITY_ANNOTATION], "27");
        assert!(o.get("spec").is_none(), "taints untouched");
        v.annotations
            .insert(CAPACITY_ANNOTATION.into(), "27".into());
        assert!(plan_node(&v, &w, &now).object.is_none());
    }
}
