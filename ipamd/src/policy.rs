//! The pool policy: a pure function from the pool as it is and the targets to
//! the cloud actions that bring it where it should be. No I/O, no clock of its
//! own: the daemon and the scale simulator call the same `plan`.
//!
//! Knob meanings follow aws-node:
//! * `WARM_ENI_TARGET` (default 1): keep at least that many whole interfaces'
//!   worth of addresses available; interfaces are filled completely.
//! * `WARM_IP_TARGET` / `MINIMUM_IP_TARGET`: when either is set, the ENI target
//!   is ignored; keep `WARM_IP_TARGET` addresses available and at least
//!   `MINIMUM_IP_TARGET` in total, adding and releasing single addresses.
//! * `ENABLE_PREFIX_DELEGATION` + `WARM_PREFIX_TARGET`: the pool grows by /28
//!   prefixes; keep that many wholly unused prefixes. The IP targets, when set,
//!   apply in addresses and are rounded up to prefixes.
//! * `MAX_ENI` and the max-pods cap bound growth.
//! * `ADAPTIVE_WARM_TARGET=true` (ours): the warm target needs no tuning;
//!   it follows the pods' observed arrival and departure rates, the
//!   measured time a grow takes and the cooldown ([`adaptive_warm`]),
//!   address by address (prefixes in prefix mode), counting addresses in
//!   their cooldown toward it and releasing only above twice it;
//!   `MINIMUM_IP_TARGET` still applies.
//!
//! * The pool scaler of Azure CNS (`IPAM_SCALER_*`, a mode of its own):
//!   batch size B, request and release threshold percents, max IP count;
//!   see [`Scaler`].
//!
//! Where we deliberately differ: addresses in cooldown count as in use (never
//! as available; the adaptive target counts them as soon free), and waiting
//! ADDs count as demand so the pool grows for them even when the targets
//! alone would not.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use providers::{AssignRequest, Limits};
use serde::Serialize;
use tokio::time::Instant;

/// Addresses in one delegated /28.
pub const PREFIX_SIZE: u32 = 16;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolConfig {
    pub warm_eni_target: u32,
    pub warm_ip_target: Option<u32>,
    pub minimum_ip_target: Option<u32>,
    pub warm_prefix_target: Option<u32>,
    pub prefix_delegation: bool,
    pub max_eni: Option<u32>,
    pub max_pods: Option<u32>,
    /// An interface younger than this is never deleted.
    pub min_interface_age: Duration,
    /// Azure CNS's pool scaler instead of the targets above.
    pub scaler: Option<Scaler>,
    /// The adaptive warm target ([`adaptive_warm`], given in
    /// [`PoolView::adaptive_warm`]) instead of the targets above.
    pub adaptive: bool,
}

/// The chance that an ADD finds no address under the adaptive warm
/// target and waits (for a grow, or for an address's cooldown): one in
/// 10,000.
pub const ADAPTIVE_MISS: f64 = 1e-4;

/// The adaptive warm target: addresses to keep free *or cooling* so that
/// an ADD waits with a chance of at most [`ADAPTIVE_MISS`].
///
/// Pods arrive at `arrivals_per_sec` and leave at `departures_per_sec`
/// (both observed). An arrival matched by a departure is covered by the
/// departed pod's address, free again after `cooldown_secs` (the cooling
/// addresses count toward the target, so no grow is made for it even when
/// one would be quicker); an arrival beyond the departures only by a grow
/// taking `refill_secs` (measured). The target is the smallest `k`
/// with P(N ≥ k) ≤ [`ADAPTIVE_MISS`] for N a Poisson count of the arrivals
/// expected in those times: at least 1, so that an idle node still has an
/// address for its next pod. Bounded by the instance's capacity and max
/// pods where the plan applies them.
pub fn adaptive_warm(
    arrivals_per_sec: f64,
    departures_per_sec: f64,
    refill_secs: f64,
    cooldown_secs: f64,
) -> u32 {
    let clean = |x: f64| if x.is_finite() { x.max(0.0) } else { 0.0 };
    let (a, d, r, c) = (
        clean(arrivals_per_sec),
        clean(departures_per_sec),
        clean(refill_secs),
        clean(cooldown_secs),
    );
    let matched = a.min(d);
    let mean = matched * c + (a - matched) * r;
    poisson_tail_quantile(mean, ADAPTIVE_MISS)
}

/// The smallest `k` with P(N ≥ k) ≤ `miss` for N Poisson with `mean`
/// (above a mean of 500 a normal approximation: the exact sum's first
/// term, e^−mean, underflows from a mean of about 745).
fn poisson_tail_quantile(mean: f64, miss: f64) -> u32 {
    const CAP: f64 = (u32::MAX / 2) as f64;
    if !mean.is_finite() || mean <= 0.0 {
        return 1;
    }
    if mean > 500.0 {
        // 1e-4 one-sided: 3.72 standard deviations.
        return (mean + 3.72 * mean.sqrt()).ceil().min(CAP) as u32 + 1;
    }
    // P(N ≥ k) = 1 − P(N ≤ k − 1).
    let (mut pmf, mut below) = ((-mean).exp(), 0.0);
    let mut k = 0u32;
    loop {
        if 1.0 - below <= miss {
            return k.max(1);
        }
        below += pmf;
        k += 1;
        pmf *= mean / f64::from(k);
    }
}

/// Azure CNS's pool scaler (its NodeNetworkConfig `scaler`): the pool
/// moves in batches of `batch_size` addresses. It grows when fewer than
/// `batch_size × request_threshold_percent / 100` addresses are free and
/// shrinks when at least `batch_size × release_threshold_percent / 100` are,
/// both to the same target computed in one step from the demand (CNS v2:
/// `B × ceil(0.5 + used / B)` at the default 50%), never above
/// `max_ip_count`. Between the two thresholds nothing moves, and CNS clamps
/// the release threshold to at least the request threshold + 100 so that a
/// shrink never triggers a grow. When the subnet is nearly exhausted the
/// batch drops to 1: the pool keeps one address free (it grows at none and
/// releases down to one at two).
///
/// Source: Azure CNS's pool scaling (NodeNetworkConfig `scaler`; the v2
/// pool monitor's target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Scaler {
    pub batch_size: u32,
    pub request_threshold_percent: u32,
    pub release_threshold_percent: u32,
    pub max_ip_count: u32,
}

impl Default for Scaler {
    /// CNS's defaults: 16, 50%, 150%, 250.
    fn default() -> Self {
        Self {
            batch_size: 16,
            request_threshold_percent: 50,
            release_threshold_percent: 150,
            max_ip_count: 250,
        }
    }
}

impl Scaler {
    /// With CNS's clamps: a batch of at least 1 and at most the max IP
    /// count, a request threshold of 1 to 100%, a release threshold of at
    /// least the request threshold + 100%.
    pub fn clamped(self) -> Self {
        let max_ip_count = self.max_ip_count.max(1);
        let request = self.request_threshold_percent.clamp(1, 100);
        Self {
            batch_size: self.batch_size.clamp(1, max_ip_count),
            request_threshold_percent: request,
            release_threshold_percent: self.release_threshold_percent.max(request + 100),
            max_ip_count,
        }
    }

    /// The scaler while the subnet is nearly exhausted: batches of one.
    pub fn exhausted(self) -> Self {
        Self {
            batch_size: 1,
            ..self
        }
    }

    /// The pool's size for `demand` addresses in use or wanted: the
    /// smallest multiple of the batch leaving at least the request
    /// threshold free, at most the max IP count.
    pub fn target(&self, demand: u32) -> u32 {
        let b = u64::from(self.batch_size.max(1));
        let need = 100 * u64::from(demand) + b * u64::from(self.request_threshold_percent);
        let t = b * need.div_ceil(100 * b);
        u32::try_from(t).unwrap_or(u32::MAX).min(self.max_ip_count)
    }

    /// Whether `free` addresses call for a grow.
    pub fn should_grow(&self, free: u32) -> bool {
        u64::from(free) * 100
            < u64::from(self.batch_size) * u64::from(self.request_threshold_percent)
    }

    /// Whether `free` addresses call for a release.
    pub fn should_release(&self, free: u32) -> bool {
        u64::from(free) * 100
            >= u64::from(self.batch_size) * u64::from(self.release_threshold_percent)
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            warm_eni_target: 1,
            warm_ip_target: None,
            minimum_ip_target: None,
            warm_prefix_target: None,
            prefix_delegation: false,
            max_eni: None,
            max_pods: None,
            min_interface_age: Duration::from_secs(60),
            scaler: None,
            adaptive: false,
        }
    }
}

impl PoolConfig {
    fn ip_targets(&self) -> bool {
        self.warm_ip_target.is_some() || self.minimum_ip_target.is_some()
    }

    /// The pool moves address by address (IP targets or the scaler), not
    /// by whole interfaces.
    fn fine_grained(&self) -> bool {
        self.ip_targets() || self.scaler.is_some() || self.adaptive
    }

    /// Whether `warm_eni_target` sizes the pool: not under the IP targets,
    /// the scaler, the adaptive target or prefix delegation (as aws-node
    /// ignores WARM_ENI_TARGET once WARM_IP_TARGET or WARM_PREFIX_TARGET
    /// is set).
    pub fn warm_eni_target_applies(&self) -> bool {
        !self.prefix_delegation && !self.fine_grained()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixView {
    pub prefix: Ipv4Net,
    /// Addresses of the prefix held by pods or cooling down.
    pub in_use: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceView {
    pub id: String,
    pub subnet_id: String,
    /// Its subnet said lately that it cannot give more: the pool grows on
    /// another interface (in another subnet) instead.
    pub subnet_full: bool,
    pub device_index: u32,
    pub attached_at: Instant,
    /// Secondary addresses held one by one (not via a prefix).
    pub ips: u32,
    pub prefixes: Vec<PrefixView>,
    /// Addresses held by pods.
    pub assigned: u32,
    /// Addresses released within the cooldown.
    pub cooling: u32,
    /// Individually held addresses that are free and not cooling: the only
    /// ones that may be released.
    pub free_ips: Vec<Ipv4Addr>,
}

impl IfaceView {
    fn primary(&self) -> bool {
        self.device_index == 0
    }
    fn total(&self) -> u32 {
        self.ips + PREFIX_SIZE * self.prefixes.len() as u32
    }
    fn used(&self) -> u32 {
        self.assigned + self.cooling
    }
    fn slots_used(&self) -> u32 {
        self.ips + self.prefixes.len() as u32
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    /// Attached interfaces, not counting ones being deleted.
    pub interfaces: Vec<IfaceView>,
    pub limits: Limits,
    pub hot_attach: bool,
    /// ADDs waiting for an address right now.
    pub waiting: u32,
    /// The subnet was found nearly exhausted lately (the scaler's batch
    /// drops to 1).
    pub subnet_low: bool,
    /// The adaptive warm target now ([`adaptive_warm`]), when
    /// [`PoolConfig::adaptive`]; the plan keeps 1 instead while the subnet
    /// is low.
    pub adaptive_warm: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    AssignIps {
        interface_id: String,
        count: u32,
    },
    AssignPrefixes {
        interface_id: String,
        count: u32,
    },
    CreateInterface {
        initial: AssignRequest,
    },
    ReleaseIps {
        interface_id: String,
        ips: Vec<Ipv4Addr>,
    },
    ReleasePrefixes {
        interface_id: String,
        prefixes: Vec<Ipv4Net>,
    },
    DeleteInterface {
        interface_id: String,
    },
}

impl Action {
    /// The kind of cloud change it is (what the provider may put off).
    pub fn change(&self) -> providers::Change {
        match self {
            Self::AssignIps { .. } | Self::AssignPrefixes { .. } => providers::Change::Assign,
            Self::CreateInterface { .. } => providers::Change::CreateInterface,
            Self::ReleaseIps { .. } | Self::ReleasePrefixes { .. } => providers::Change::Release,
            Self::DeleteInterface { .. } => providers::Change::DeleteInterface,
        }
    }

    /// The action's kind in snake case (`assign_ips`, `create_interface`,
    /// ...), as `/v1/pool` and the `fn` label of `awscni_reconcile_count`
    /// name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AssignIps { .. } => "assign_ips",
            Self::AssignPrefixes { .. } => "assign_prefixes",
            Self::CreateInterface { .. } => "create_interface",
            Self::ReleaseIps { .. } => "release_ips",
            Self::ReleasePrefixes { .. } => "release_prefixes",
            Self::DeleteInterface { .. } => "delete_interface",
        }
    }
}

/// Why the pool cannot grow although it is short.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Blocked {
    /// Every interface is full and no more can be attached.
    InterfaceLimit { interfaces: u32, per_interface: u32 },
    /// The pool already holds max-pods addresses.
    MaxPods { max_pods: u32 },
    /// Custom networking, and no ENIConfig is known for this node: no
    /// interface may be created (set by the reconciler, not the plan).
    NoEniConfig { why: String },
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InterfaceLimit {
                interfaces,
                per_interface,
            } => write!(
                f,
                "instance is at its limit: {interfaces} interfaces with {per_interface} addresses or prefixes each, all assigned or cooling down"
            ),
            Self::MaxPods { max_pods } => write!(f, "max pods ({max_pods}) reached on this node"),
            Self::NoEniConfig { why } => write!(
                f,
                "custom networking is on and no interface may be created: {why}"
            ),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub blocked: Option<Blocked>,
    /// Addresses the ADDs waiting need beyond the pool's (free ones
    /// serve them first): the first grows of `actions`, up to this many
    /// addresses, are for them; the rest of the grows are for the warm
    /// target, ahead of demand. The reconciler counts it down by the
    /// addresses each grow did make free, which a nearly full subnet may
    /// make fewer than planned (a /28 sent as single addresses), so that
    /// the grows after it serve the ADDs still waiting.
    pub for_adds: u32,
}

fn div_ceil(a: u32, b: u32) -> u32 {
    a.div_ceil(b.max(1))
}

/// Decides what the pool should do now.
pub fn plan(view: &PoolView, cfg: &PoolConfig, now: Instant) -> Plan {
    let slots = view.limits.slots_per_interface();
    let max_ifaces = cfg.max_eni.map_or(view.limits.max_interfaces, |m| {
        m.min(view.limits.max_interfaces)
    });
    let pd = cfg.prefix_delegation;
    let unit = if pd { PREFIX_SIZE } else { 1 };

    let total: u32 = view.interfaces.iter().map(IfaceView::total).sum();
    let used: u32 = view.interfaces.iter().map(IfaceView::used).sum();
    let assigned: u32 = view.interfaces.iter().map(|i| i.assigned).sum();
    let demand = used + view.waiting;
    let for_adds = demand.saturating_sub(total);
    let plan_of = |actions, blocked| Plan {
        actions,
        blocked,
        for_adds,
    };

    // The adaptive target now, and how many addresses the pool releases
    // down to: it keeps up to twice its warm target free or cooling, so
    // addresses coming out of their cooldown under churn are reused rather
    // than released and assigned again.
    let adaptive_warm = if view.subnet_low {
        1
    } else {
        view.adaptive_warm.max(1)
    };
    let mut release_to = None;
    if cfg.adaptive {
        let floor = cfg.minimum_ip_target.unwrap_or(0);
        let r = div_ceil(
            (assigned + view.waiting)
                .saturating_add(adaptive_warm.saturating_mul(2))
                .max(floor),
            unit,
        ) * unit;
        // Never above the max-pods cap (what is above it is released).
        let cap = cfg.max_pods.map_or(u32::MAX, |m| {
            (div_ceil(m, unit) * unit).max(div_ceil(used, unit) * unit)
        });
        release_to = Some(r.min(cap));
    }
    // How many addresses the pool should hold.
    let mut want = if let Some(s) = cfg.scaler {
        let s = if view.subnet_low {
            s.clamped().exhausted()
        } else {
            s.clamped()
        };
        let free = total.saturating_sub(used);
        if view.waiting > 0 || s.should_grow(free) {
            // A waiting ADD is demand the scaler serves at once.
            s.target(demand).max(total)
        } else if s.should_release(free) {
            s.target(demand)
        } else {
            total
        }
    } else if cfg.adaptive {
        // Cooling addresses count toward the target (each is free again
        // within the cooldown, which `adaptive_warm` covers): under churn a
        // grow for every ADD would be released again as the departed pod's
        // address cooled down. An ADD waiting gets an address at once.
        // Never more than the node can run pods (MAX_PODS, else the
        // instance's max pods), whatever the arrivals say.
        let pods = cfg.max_pods.unwrap_or_else(|| view.limits.max_pods());
        assigned
            .saturating_add(view.waiting)
            .saturating_add(adaptive_warm)
            .max(demand)
            .min(pods.max(demand))
            .max(cfg.minimum_ip_target.unwrap_or(0))
    } else if cfg.ip_targets() {
        (demand + cfg.warm_ip_target.unwrap_or(0)).max(cfg.minimum_ip_target.unwrap_or(0))
    } else if pd {
        // Wholly unused prefixes to keep, on top of what is needed for demand.
        let in_use_prefixes = div_ceil(demand, PREFIX_SIZE);
        let partial: u32 = view
            .interfaces
            .iter()
            .flat_map(|i| &i.prefixes)
            .filter(|p| p.in_use > 0)
            .count() as u32;
        PREFIX_SIZE * (in_use_prefixes.max(partial) + cfg.warm_prefix_target.unwrap_or(0))
    } else {
        // WARM_ENI_TARGET=0 is aws-node's "grow when no address is free":
        // one address's worth, filled to a whole interface below.
        demand + (cfg.warm_eni_target * slots).max(1)
    };
    // In prefix mode the pool moves in whole prefixes.
    want = div_ceil(want, unit) * unit;

    let mut blocked = None;
    // Slots the max-pods cap still allows to be added.
    let mut room = u32::MAX;
    if let Some(max_pods) = cfg.max_pods {
        let cap_slots = div_ceil(max_pods, unit);
        room = cap_slots.saturating_sub(div_ceil(total, unit));
        let cap = (div_ceil(max_pods, unit) * unit).max(div_ceil(used, unit) * unit);
        if want > cap {
            want = cap;
            if view.waiting > 0 && total >= cap {
                blocked = Some(Blocked::MaxPods { max_pods });
            }
        }
    }

    let mut actions = Vec::new();
    if want > total {
        let mut short = div_ceil(want - total, unit); // in slots
        let fill_whole = !pd && !cfg.fine_grained();
        // A subnet that said it is full is not asked again while a new
        // interface can be made elsewhere; where none can (Azure, or the
        // instance's interfaces all there) it is asked for one unit at a
        // time, so what it still has is used.
        let can_attach = view.hot_attach && (view.interfaces.len() as u32) < max_ifaces;
        for i in &view.interfaces {
            if short == 0 {
                break;
            }
            let free_slots = slots.saturating_sub(i.slots_used());
            if free_slots == 0 || (i.subnet_full && can_attach) {
                continue;
            }
            let n = if fill_whole {
                free_slots
            } else {
                free_slots.min(short)
            }
            .min(room)
            .min(if i.subnet_full { 1 } else { u32::MAX });
            if n == 0 {
                break;
            }
            short = short.saturating_sub(n);
            room -= n;
            actions.push(if pd {
                Action::AssignPrefixes {
                    interface_id: i.id.clone(),
                    count: n,
                }
            } else {
                Action::AssignIps {
                    interface_id: i.id.clone(),
                    count: n,
                }
            });
        }
        if short > 0 && room > 0 {
            if can_attach {
                let n = if fill_whole { slots } else { short.min(slots) }.min(room);
                actions.push(Action::CreateInterface {
                    initial: if pd {
                        AssignRequest::Prefixes(n)
                    } else {
                        AssignRequest::Ips(n)
                    },
                });
            } else if blocked.is_none() {
                blocked = Some(Blocked::InterfaceLimit {
                    interfaces: view.interfaces.len() as u32,
                    per_interface: slots,
                });
            }
        }
        return plan_of(actions, blocked);
    }

    if view.waiting > 0 {
        return plan_of(actions, blocked);
    }

    // Shrink. First a whole idle interface, at most one per step.
    let keep = release_to.map_or(want, |r| r.max(want));
    if total <= keep {
        return plan_of(actions, blocked);
    }
    let excess = total - keep;
    let deletable = view
        .interfaces
        .iter()
        .filter(|i| {
            !i.primary()
                && i.used() == 0
                && now.saturating_duration_since(i.attached_at) >= cfg.min_interface_age
                && i.total() <= excess
        })
        .max_by_key(|i| i.device_index);
    if let Some(i) = deletable {
        actions.push(Action::DeleteInterface {
            interface_id: i.id.clone(),
        });
        return plan_of(actions, blocked);
    }
    // Under the ENI target aws-node keeps interfaces whole.
    if !pd && !cfg.fine_grained() {
        return plan_of(actions, blocked);
    }
    // Then single addresses or wholly unused prefixes, emptiest interface first.
    let mut order: Vec<&IfaceView> = view.interfaces.iter().collect();
    order.sort_by_key(|i| (i.assigned, std::cmp::Reverse(i.device_index)));
    let mut excess = excess;
    for i in order {
        if excess < unit {
            break;
        }
        if pd {
            let free: Vec<Ipv4Net> = i
                .prefixes
                .iter()
                .filter(|p| p.in_use == 0)
                .map(|p| p.prefix)
                .take((excess / PREFIX_SIZE) as usize)
                .collect();
            if !free.is_empty() {
                excess -= PREFIX_SIZE * free.len() as u32;
                actions.push(Action::ReleasePrefixes {
                    interface_id: i.id.clone(),
                    prefixes: free,
                });
            }
        }
        // Single addresses also exist in prefix mode after a fallback.
        let ips: Vec<Ipv4Addr> = i.free_ips.iter().copied().take(excess as usize).collect();
        if !ips.is_empty() {
            excess -= ips.len() as u32;
            actions.push(Action::ReleaseIps {
                interface_id: i.id.clone(),
                ips,
            });
        }
    }
    plan_of(actions, blocked)
}
