//! Prometheus metrics: `GET /metrics` in the Prometheus text format 0.0.4,
//! encoded by `prometheus-client`, on the metrics address (default
//! `0.0.0.0:61678`, aws-node's port) and on the introspection address.
//!
//! **aws-node's names** are kept where the meaning is the same, so that
//! dashboards and alerts written for aws-node keep working (the names and
//! labels are those of aws-node's `utils/prometheusmetrics`). aws-node's
//! counters are named without `_total` (e.g. `awscni_add_ip_req_count`);
//! prometheus-client appends `_total` to anything typed `counter`, so these
//! are exposed under their exact names typed `untyped` (PromQL's `rate()`
//! does not look at the type). `awscni_aws_api_latency_ms` breaks one of
//! promtool's lint rules (milliseconds); `scripts/check-metrics.sh` accepts
//! exactly the findings listed in `ipamd/metrics-lint.allow` and fails on
//! any other. **Our own** metrics are named `vpc_cni_*` and follow
//! Prometheus's naming rules.
//!
//! Pool figures are read at scrape time; request counters and latency
//! histograms are counted as calls happen ([`Events`]). No label carries a
//! container id, an address of a pod, or anything secret: labels are API
//! names, interface ids, error kinds and setting names.

use std::sync::LazyLock;
use std::time::Instant;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::datastore::Slot;
use crate::ipam::Ipam;

/// aws-node's metrics port (`cmd/aws-k8s-agent`'s `metricsPort`).
pub const DEFAULT_PORT: u16 = 61678;

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

static PROCESS_STARTED: LazyLock<Instant> = LazyLock::new(Instant::now);

/// When this process started, as first asked (ipamd's `main` asks first
/// thing): the origin of `awscni_ipamd_startup_duration_seconds`.
pub fn process_started() -> Instant {
    *PROCESS_STARTED
}

/// Bounds of the ADD/DEL handler histograms, seconds: tens of microseconds
/// (an address from the warm pool) up to the 10 s an ADD may wait.
const CALL_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
];

/// Bounds of the start-up histogram, seconds.
const STARTUP_BUCKETS: [f64; 8] = [1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// What is counted as it happens (clones share their values).
#[derive(Debug, Clone)]
pub struct Events {
    /// AddNetwork calls (`awscni_add_ip_req_count`).
    pub add_requests: Counter,
    /// DelNetwork calls (`awscni_del_ip_req_count{reason="PodDeleted"}`).
    pub del_requests: Counter,
    /// ADDs that found no address within their wait
    /// (`awscni_no_available_ip_addresses`).
    pub no_available: Counter,
    /// ADDs that found the pool empty and waited (`vpc_cni_add_waits_total`).
    pub add_waits: Counter,
    /// AddNetwork handler time, seconds, transport excluded; failed ADDs
    /// included.
    pub add_seconds: Histogram,
    /// DelNetwork handler time, seconds.
    pub del_seconds: Histogram,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            add_requests: Counter::default(),
            del_requests: Counter::default(),
            no_available: Counter::default(),
            add_waits: Counter::default(),
            add_seconds: Histogram::new(CALL_BUCKETS),
            del_seconds: Histogram::new(CALL_BUCKETS),
        }
    }
}

type Labels = Vec<(&'static str, String)>;

/// One sample's value, read at scrape time.
#[derive(Debug)]
enum Value {
    Int(i64),
    Float(f64),
    Count(u64),
    /// Non-cumulative bucket counts, the last bound `+Inf`.
    Histogram {
        sum: f64,
        count: u64,
        buckets: Vec<(f64, u64)>,
    },
}

/// A metric family read at scrape time: its type and its samples.
#[derive(Debug)]
struct Series {
    kind: MetricType,
    samples: Vec<(Labels, Value)>,
}

impl EncodeMetric for Series {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (labels, value) in &self.samples {
            let mut e = encoder.encode_family(labels)?;
            match value {
                Value::Int(v) => e.encode_gauge(v)?,
                Value::Float(v) => e.encode_gauge(v)?,
                Value::Count(v) => e.encode_counter::<NoLabelSet, _, u64>(v, None)?,
                Value::Histogram {
                    sum,
                    count,
                    buckets,
                } => e.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?,
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        self.kind
    }
}

/// A registry filled for one scrape.
struct Scrape(Registry);

impl Scrape {
    fn add(&mut self, name: &str, help: &str, kind: MetricType, samples: Vec<(Labels, Value)>) {
        self.0.register(name, help, Series { kind, samples });
    }
    fn gauge(&mut self, name: &str, help: &str, v: i64) {
        self.add(name, help, MetricType::Gauge, vec![(vec![], Value::Int(v))]);
    }
    /// One of aws-node's counters, under its exact name (see the module
    /// documentation).
    fn aws_node_counter(&mut self, name: &str, help: &str, samples: Vec<(Labels, u64)>) {
        let samples = samples
            .into_iter()
            .map(|(l, v)| (l, Value::Count(v)))
            .collect();
        self.add(name, help, MetricType::Unknown, samples);
    }
    /// A counter of ours; the encoder appends `_total` to `name`.
    fn counter(&mut self, name: &str, help: &str, samples: Vec<(Labels, u64)>) {
        let samples = samples
            .into_iter()
            .map(|(l, v)| (l, Value::Count(v)))
            .collect();
        self.add(name, help, MetricType::Counter, samples);
    }
}

fn per<T>(
    label: &'static str,
    items: impl IntoIterator<Item = (impl Into<String>, T)>,
) -> Vec<(Labels, T)> {
    items
        .into_iter()
        .map(|(k, v)| (vec![(label, k.into())], v))
        .collect()
}

/// The exposition for one scrape.
///
/// # Errors
/// Only if formatting into a `String` fails, which it does not.
pub fn render(ipam: &Ipam) -> Result<String, std::fmt::Error> {
    let mut out = Scrape(Registry::default());
    let r = &ipam.reconciler;
    let settings = ipam.settings();
    let status = r.status();
    let events = &ipam.pool.events;
    let now = tokio::time::Instant::now();
    let (counts, waiting, per_eni) = ipam.pool.read(|p| {
        let per_eni: Vec<(String, i64)> =
            p.ds.interfaces()
                .filter(|e| !e.draining)
                .map(|e| {
                    let n = e
                        .addrs
                        .values()
                        .filter(|s| matches!(s, Slot::Assigned(_)))
                        .count();
                    (e.info.id.clone(), n as i64)
                })
                .collect();
        (p.ds.counts(now), p.waiting, per_eni)
    });

    // aws-node's pool gauges.
    let limits = r.provider().current_limits().unwrap_or(r.instance().limits);
    let unmanaged = (r.foreign().len() + r.frozen().len()) as u32;
    let mut eni_max = limits.max_interfaces.saturating_sub(unmanaged);
    if let Some(m) = settings.pool.max_eni {
        eni_max = eni_max.min(m);
    }
    let per_slot = if settings.pool.prefix_delegation {
        crate::policy::PREFIX_SIZE
    } else {
        1
    };
    let ip_max = i64::from(eni_max) * i64::from(limits.slots_per_interface() * per_slot);
    out.gauge(
        "awscni_eni_allocated",
        "Interfaces in ipamd's pool (aws-node's name)",
        i64::from(counts.interfaces),
    );
    out.gauge(
        "awscni_eni_max",
        "Interfaces this node may have for pods: the instance's limit (or MAX_ENI) minus interfaces ipamd does not manage",
        i64::from(eni_max),
    );
    out.gauge(
        "awscni_ip_max",
        "Addresses the node could hold for pods at awscni_eni_max interfaces",
        ip_max,
    );
    out.gauge(
        "awscni_total_ip_addresses",
        "Addresses in the pool, whatever their state",
        i64::from(counts.total),
    );
    out.gauge(
        "awscni_assigned_ip_addresses",
        "Addresses assigned to pods",
        i64::from(counts.assigned),
    );
    out.gauge(
        "awscni_total_ipv4_prefixes",
        "Delegated /28 prefixes in the pool (0 without prefix delegation)",
        i64::from(counts.prefixes),
    );
    out.add(
        "awscni_assigned_ip_per_eni",
        "Addresses assigned to pods, per interface",
        MetricType::Gauge,
        per("eni", per_eni.into_iter().map(|(k, v)| (k, Value::Int(v)))),
    );

    // aws-node's counters, exact names.
    out.aws_node_counter(
        "awscni_add_ip_req_count",
        "AddNetwork calls received",
        vec![(vec![], events.add_requests.get())],
    );
    out.aws_node_counter(
        "awscni_del_ip_req_count",
        "DelNetwork calls received",
        vec![(
            vec![("reason", "PodDeleted".to_string())],
            events.del_requests.get(),
        )],
    );
    out.aws_node_counter(
        "awscni_no_available_ip_addresses",
        "ADDs that got no address within their wait",
        vec![(vec![], events.no_available.get())],
    );
    out.aws_node_counter(
        "awscni_reconcile_count",
        "Pool actions carried out, by kind (fn: assign_ips, create_interface, release_ips, ...)",
        per("fn", status.actions_by_kind.clone()),
    );
    out.aws_node_counter(
        "awscni_ipamd_error_count",
        "ipamd's failures, by where they happened (fn: an action's kind, resync, node_setup, snat, journal)",
        per("fn", status.errors_by_site.clone()),
    );
    let api = r.provider().api_figures();
    out.aws_node_counter(
        "awscni_aws_api_error_count",
        "Failed cloud API attempts, by API and error kind (throttled, server, timeout, limit, ...)",
        api.iter()
            .flat_map(|(name, s)| {
                s.errors_by_kind.iter().map(move |(kind, n)| {
                    (vec![("api", name.clone()), ("error", kind.clone())], *n)
                })
            })
            .collect(),
    );
    out.add(
        "awscni_aws_api_latency_ms",
        "Cloud API attempt latency in milliseconds, by API (a histogram; aws-node's is a summary with the same _sum and _count)",
        MetricType::Histogram,
        per(
            "api",
            api.iter().map(|(name, s)| {
                let bounds = providers::layer::LATENCY_BOUNDS_MS
                    .iter()
                    .copied()
                    .chain([f64::INFINITY]);
                let buckets = bounds.zip(s.latency_ms_buckets.iter().copied()).collect();
                (
                    name.clone(),
                    Value::Histogram {
                        sum: s.latency_ms_total,
                        count: s.calls,
                        buckets,
                    },
                )
            }),
        ),
    );
    if let Some(took) = ipam.ready_after() {
        let secs = took.as_secs_f64();
        let i = STARTUP_BUCKETS.partition_point(|b| *b < secs);
        let buckets = STARTUP_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .enumerate()
            .map(|(n, b)| (b, u64::from(n == i)))
            .collect();
        out.add(
            "awscni_ipamd_startup_duration_seconds",
            "Seconds from the process's start until ipamd was first ready (one observation, once ready)",
            MetricType::Histogram,
            vec![(
                vec![("success", "true".to_string())],
                Value::Histogram {
                    sum: secs,
                    count: 1,
                    buckets,
                },
            )],
        );
    }
    out.add(
        "awscni_build_info",
        "vpc-cni's version (always 1)",
        MetricType::Gauge,
        vec![(
            vec![("version", env!("CARGO_PKG_VERSION").to_string())],
            Value::Int(1),
        )],
    );

    // Our own.
    out.gauge(
        "vpc_cni_cooling_ip_addresses",
        "Released addresses still in their cooldown (IP_COOLDOWN_PERIOD)",
        i64::from(counts.cooling),
    );
    out.gauge(
        "vpc_cni_assignable_ip_addresses",
        "Addresses an ADD could be given now",
        i64::from(counts.assignable),
    );
    out.gauge(
        "vpc_cni_add_waiting",
        "ADDs waiting for an address now",
        i64::from(waiting),
    );
    out.counter(
        "vpc_cni_add_waits",
        "ADDs that found the pool empty and waited for it to grow",
        vec![(vec![], events.add_waits.get())],
    );
    let p = &settings.pool;
    // Under ADAPTIVE_WARM_TARGET the warm targets do not apply: the
    // adaptive target the last plan computed does.
    let targets = if p.adaptive {
        [
            ("ADAPTIVE_WARM_TARGET", status.adaptive_warm),
            ("MINIMUM_IP_TARGET", p.minimum_ip_target),
            ("WARM_IP_TARGET", None),
            ("WARM_PREFIX_TARGET", None),
        ]
    } else {
        [
            (
                "WARM_ENI_TARGET",
                p.warm_eni_target_applies().then_some(p.warm_eni_target),
            ),
            ("WARM_IP_TARGET", p.warm_ip_target),
            ("MINIMUM_IP_TARGET", p.minimum_ip_target),
            ("WARM_PREFIX_TARGET", p.warm_prefix_target),
        ]
    };
    out.add(
        "vpc_cni_warm_target",
        "The pool's configured targets, by setting (only those set)",
        MetricType::Gauge,
        per(
            "setting",
            targets
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k, Value::Int(i64::from(v))))),
        ),
    );
    let blocked = status
        .blocked
        .as_ref()
        .and_then(|b| serde_json::to_value(b).ok())
        .and_then(|v| v["reason"].as_str().map(str::to_string));
    out.add(
        "vpc_cni_pool_blocked",
        "1 while the pool is short and cannot grow, with the reason (interface_limit, max_pods, no_eni_config)",
        MetricType::Gauge,
        per("reason", blocked.map(|r| (r, Value::Int(1)))),
    );
    out.gauge(
        "vpc_cni_ready",
        "1 once ipamd is ready (the readiness latch, /readyz)",
        i64::from(ipam.readiness().is_ok()),
    );
    out.gauge(
        "vpc_cni_unconfirmed_assignments",
        "Assignments whose address the cloud's last answer lacked (held until seen again)",
        status.unconfirmed_assignments as i64,
    );
    let calls = |f: fn(&providers::layer::ApiStats) -> u64| {
        per("api", api.iter().map(|(k, s)| (k.clone(), f(s))))
    };
    out.counter(
        "vpc_cni_cloud_api_calls",
        "Cloud API attempts sent, retries included, by API",
        calls(|s| s.calls),
    );
    out.counter(
        "vpc_cni_cloud_api_retries",
        "Cloud API attempts that retried a transient failure, by API",
        calls(|s| s.retries),
    );
    out.counter(
        "vpc_cni_cloud_api_throttles",
        "Cloud API attempts the cloud throttled (EC2 RequestLimitExceeded), by API",
        calls(|s| s.throttles),
    );
    out.counter(
        "vpc_cni_cloud_api_bucket_waits",
        "Cloud API calls that waited for the client-side token bucket, by API",
        calls(|s| s.bucket_waits),
    );
    out.add(
        "vpc_cni_cloud_api_client_rate",
        "The client-side bucket's refill rate now, calls per second, by API (lowered after throttling)",
        MetricType::Gauge,
        per(
            "api",
            api.iter()
                .map(|(k, s)| (k.clone(), Value::Float(s.client_rate_per_sec))),
        ),
    );
    out.gauge(
        "vpc_cni_journal_size_bytes",
        "The journal's length as last written (compacted at start and when it grows)",
        ipam.pool.journal_size_bytes() as i64,
    );
    out.0.register(
        "vpc_cni_journal_sync_duration_seconds",
        "Time to write and sync a batch of journal records",
        ipam.pool.journal_sync_seconds(),
    );
    out.0.register(
        "vpc_cni_add_duration_seconds",
        "AddNetwork handler time, transport excluded",
        events.add_seconds.clone(),
    );
    out.0.register(
        "vpc_cni_del_duration_seconds",
        "DelNetwork handler time, transport excluded",
        events.del_seconds.clone(),
    );

    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &out.0)?;
    Ok(text)
}

/// Serves `GET /metrics` alone on `listener` until `shutdown`.
pub async fn serve(
    ipam: std::sync::Arc<Ipam>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(handler))
        .with_state(ipam);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The `/metrics` handler, shared with the introspection server.
pub async fn handler(
    axum::extract::State(ipam): axum::extract::State<std::sync::Arc<Ipam>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match render(&ipam) {
        Ok(text) => ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
