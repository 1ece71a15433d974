//! Why an ADD has, or would have, no address: one verdict from the facts
//! the pool and the reconciler hold, with those facts.
//!
//! The same verdict is the reason an ADD that waited in vain gives (the
//! plugin's "failed to assign an IP address to container" error), what
//! `GET /v1/explain` answers and what `ipamctl explain` prints. Every message
//! counts assigned and cooling addresses apart and says when the next
//! cooling address is free.

use serde::Serialize;
use tokio::time::Instant;

use crate::policy::Blocked;

/// What the reconciler last said about growing the pool (pushed to the
/// pool at every change of its status).
#[derive(Debug, Clone, Default)]
pub struct GrowStatus {
    pub blocked: Option<Blocked>,
    pub last_error: Option<String>,
    /// [`providers::ProviderError::metric_label`] or `journal`.
    pub last_error_kind: Option<&'static str>,
    /// When the reconciler tries again after `last_error`.
    pub retry_at: Option<Instant>,
    /// (interfaces the pool may have, addresses per interface for pods).
    pub capacity: Option<(u32, u32)>,
}

/// Everything a verdict rests on, as `/v1/explain` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Facts {
    pub interfaces: u32,
    /// Addresses in the pool, whatever their state.
    pub total: u32,
    /// Interfaces the pool may have (the instance's limit, MAX_ENI,
    /// interfaces ipamd does not manage), once the reconciler has planned.
    pub max_interfaces: Option<u32>,
    /// Addresses an interface holds for pods.
    pub per_interface: Option<u32>,
    /// MAX_PODS, when set.
    pub max_pods: Option<u32>,
    pub assigned: u32,
    pub cooling: u32,
    /// Free on an interface whose node side is in place.
    pub assignable: u32,
    /// Free, but the interface's node side is not in place yet.
    pub free_not_ready: u32,
    /// Seconds until the next cooling address is free.
    pub next_free_in_s: Option<f64>,
    pub cooldown_s: u64,
    pub add_wait_s: u64,
    /// ADDs waiting for an address now.
    pub waiting: u32,
    pub blocked: Option<Blocked>,
    pub last_error: Option<String>,
    pub last_error_kind: Option<&'static str>,
    /// Seconds until the reconciler tries again after `last_error`.
    pub retry_in_s: Option<f64>,
    /// Readiness reasons (empty once ready); filled by [`crate::ipam::Ipam`].
    pub not_ready_because: Vec<String>,
}

/// An address a pod holds.
#[derive(Debug, Clone, Serialize)]
pub struct Held {
    pub network: String,
    pub ifname: String,
    pub ip: std::net::Ipv4Addr,
    /// The interface it is on; `None` while the cloud's last answer lacked
    /// it (the assignment is held until seen again).
    pub interface: Option<String>,
    pub confirmed: bool,
}

/// What `/v1/explain` answers.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// "the next ADD" or "pod NAMESPACE/NAME".
    pub subject: String,
    pub verdict: Verdict,
    pub message: String,
    /// The pod's addresses, when the subject is a pod that holds some.
    pub held: Vec<Held>,
    pub facts: Facts,
}

/// The kinds of answer, most specific first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The pod holds an address.
    Assigned,
    /// An ADD now gets an address at once.
    AddressAvailable,
    /// The cloud refused ipamd's call for lack of permission.
    PermissionDenied,
    /// The subnet (or, under prefix delegation, its free /28 blocks) ran out.
    SubnetExhausted,
    /// The pool holds MAX_PODS addresses.
    MaxPods,
    /// Custom networking is on and the node has no ENIConfig (or it names
    /// no subnet): no interface may be created.
    NoEniConfig,
    /// Every interface the instance may have is attached and full.
    InterfaceLimit,
    /// The cloud throttled the last grow; the reconciler tries again later.
    Throttled,
    /// The last grow failed otherwise (5xx, timeout, a limit, ...).
    CloudError,
    /// Nothing is free yet but nothing stops the pool from growing: a grow
    /// is in flight, or addresses are cooling down.
    PoolGrowing,
}

fn secs(s: f64) -> String {
    format!("{s:.1}s")
}

impl Facts {
    /// The node's pod address capacity: the interfaces the pool may have ×
    /// the addresses each holds for pods, capped by MAX_PODS; `None` until
    /// the reconciler has planned once.
    pub fn pod_capacity(&self) -> Option<u32> {
        let c = self
            .max_interfaces
            .zip(self.per_interface)
            .map(|(i, p)| i.saturating_mul(p))?;
        Some(self.max_pods.map_or(c, |m| m.min(c)))
    }

    /// "N assigned, M cooling down (IP_COOLDOWN_PERIOD Xs; the next is
    /// free in Ys)".
    pub fn usage(&self) -> String {
        let mut s = format!("{} assigned, {} cooling down", self.assigned, self.cooling);
        if self.cooling > 0 {
            s.push_str(&format!(" (IP_COOLDOWN_PERIOD {}s", self.cooldown_s));
            if let Some(n) = self.next_free_in_s {
                s.push_str(&format!("; the next is free in {}", secs(n)));
            }
            s.push(')');
        }
        if self.free_not_ready > 0 {
            s.push_str(&format!(
                ", {} free on an interface whose node side is not set up yet",
                self.free_not_ready
            ));
        }
        s
    }

    fn error(&self) -> String {
        self.last_error.clone().unwrap_or_default()
    }

    fn retry(&self) -> String {
        match self.retry_in_s {
            Some(s) => format!("; the next attempt is in {}", secs(s)),
            None => String::new(),
        }
    }

    /// The verdict for the next ADD, and its message.
    pub fn next_add(&self) -> (Verdict, String) {
        if self.assignable > 0 {
            return (
                Verdict::AddressAvailable,
                format!("{} addresses are free: {}", self.assignable, self.usage()),
            );
        }
        let kind = self.last_error_kind.unwrap_or_default();
        if kind == "permission_denied" {
            return (
                Verdict::PermissionDenied,
                format!(
                    "the cloud refused ipamd's call for lack of permission ({}); grant the permissions the README lists{}; {}",
                    self.error(),
                    self.retry(),
                    self.usage()
                ),
            );
        }
        if matches!(kind, "subnet_exhausted" | "insufficient_cidr") {
            return (
                Verdict::SubnetExhausted,
                format!(
                    "the subnet cannot give more addresses ({}){}; {}",
                    self.error(),
                    self.retry(),
                    self.usage()
                ),
            );
        }
        // The reconciler says the pool is blocked only while an ADD waits;
        // the same condition without one is read from the counts.
        let blocked = self.blocked.clone().or_else(|| {
            if let Some(max_pods) = self.max_pods.filter(|m| self.total >= *m) {
                return Some(Blocked::MaxPods { max_pods });
            }
            match (self.max_interfaces, self.per_interface) {
                (Some(mi), Some(per))
                    if self.interfaces >= mi && self.total >= self.interfaces * per =>
                {
                    Some(Blocked::InterfaceLimit {
                        interfaces: self.interfaces,
                        per_interface: per,
                    })
                }
                _ => None,
            }
        });
        match &blocked {
            Some(Blocked::NoEniConfig { why }) => {
                return (
                    Verdict::NoEniConfig,
                    format!(
                        "custom networking is on and no interface may be created: {why}; {}",
                        self.usage()
                    ),
                )
            }
            Some(Blocked::MaxPods { max_pods }) => {
                return (
                    Verdict::MaxPods,
                    format!(
                        "max pods ({max_pods}) reached on this node: {}",
                        self.usage()
                    ),
                )
            }
            Some(Blocked::InterfaceLimit {
                interfaces,
                per_interface,
            }) => {
                return (
                    Verdict::InterfaceLimit,
                    format!(
                        "instance is at its limit of {interfaces} interfaces with {per_interface} addresses or prefixes each: {}",
                        self.usage()
                    ),
                )
            }
            None => {}
        }
        if kind == "throttled" {
            return (
                Verdict::Throttled,
                format!(
                    "the cloud throttled the pool's last grow ({}){}; {}",
                    self.error(),
                    self.retry(),
                    self.usage()
                ),
            );
        }
        if self.last_error.is_some() {
            return (
                Verdict::CloudError,
                format!(
                    "the pool's last grow failed ({}){}; {}",
                    self.error(),
                    self.retry(),
                    self.usage()
                ),
            );
        }
        (
            Verdict::PoolGrowing,
            format!(
                "no address is free yet and the pool is growing ({} ADDs waiting; the cloud has not answered yet): {}",
                self.waiting,
                self.usage()
            ),
        )
    }
}

/// Why an ADD that waited `waited_s` seconds got nothing: the verdict's
/// message, and whether the next cooling address frees after its wait.
pub fn exhausted_reason(f: &Facts) -> String {
    let (_, msg) = f.next_add();
    match f.next_free_in_s {
        Some(n) if f.cooling > 0 && n > 0.0 => {
            format!("{msg}; that is after this ADD's wait of {}s", f.add_wait_s)
        }
        _ => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Facts {
        Facts {
            interfaces: 3,
            assigned: 20,
            cooling: 7,
            next_free_in_s: Some(12.34),
            cooldown_s: 30,
            add_wait_s: 10,
            ..Facts::default()
        }
    }

    #[test]
    fn verdicts_in_order_of_precedence() {
        let limit = Blocked::InterfaceLimit {
            interfaces: 3,
            per_interface: 9,
        };
        let cases: Vec<(Facts, Verdict, &str)> = vec![
            (
                Facts {
                    assignable: 2,
                    ..base()
                },
                Verdict::AddressAvailable,
                "2 addresses are free",
            ),
            (
                Facts {
                    last_error: Some("UnauthorizedOperation".into()),
                    last_error_kind: Some("permission_denied"),
                    blocked: Some(limit.clone()),
                    ..base()
                },
                Verdict::PermissionDenied,
                "lack of permission (UnauthorizedOperation)",
            ),
            (
                Facts {
                    last_error: Some("subnet subnet-1 has no free addresses".into()),
                    last_error_kind: Some("subnet_exhausted"),
                    retry_in_s: Some(4.0),
                    ..base()
                },
                Verdict::SubnetExhausted,
                "subnet-1 has no free addresses); the next attempt is in 4.0s",
            ),
            (
                Facts {
                    blocked: Some(Blocked::MaxPods { max_pods: 27 }),
                    ..base()
                },
                Verdict::MaxPods,
                "max pods (27) reached",
            ),
            (
                Facts {
                    blocked: Some(limit),
                    last_error_kind: Some("throttled"),
                    last_error: Some("throttled".into()),
                    ..base()
                },
                Verdict::InterfaceLimit,
                "limit of 3 interfaces with 9 addresses",
            ),
            (
                Facts {
                    last_error_kind: Some("throttled"),
                    last_error: Some(
                        "throttled by the cloud API (AssignPrivateIpAddresses)".into(),
                    ),
                    retry_in_s: Some(2.5),
                    ..base()
                },
                Verdict::Throttled,
                "the next attempt is in 2.5s",
            ),
            (
                Facts {
                    last_error_kind: Some("server"),
                    last_error: Some("cloud server error: 503".into()),
                    ..base()
                },
                Verdict::CloudError,
                "last grow failed (cloud server error: 503)",
            ),
            (
                Facts {
                    waiting: 2,
                    ..base()
                },
                Verdict::PoolGrowing,
                "2 ADDs waiting",
            ),
        ];
        for (facts, want, text) in cases {
            let (got, msg) = facts.next_add();
            assert_eq!(got, want, "{msg}");
            assert!(msg.contains(text), "{want:?}: {msg}");
            // Assigned and cooling counted apart, with the next free time.
            assert!(
                msg.contains("20 assigned, 7 cooling down (IP_COOLDOWN_PERIOD 30s; the next is free in 12.3s)"),
                "{msg}"
            );
        }
    }

    #[test]
    fn limits_are_read_from_the_counts_when_no_add_waits() {
        let full = Facts {
            total: 27,
            max_pods: Some(27),
            ..base()
        };
        assert_eq!(full.next_add().0, Verdict::MaxPods);
        let at_limit = Facts {
            total: 27,
            max_interfaces: Some(3),
            per_interface: Some(9),
            ..base()
        };
        let (v, msg) = at_limit.next_add();
        assert_eq!(v, Verdict::InterfaceLimit, "{msg}");
        assert!(
            msg.contains("limit of 3 interfaces with 9 addresses"),
            "{msg}"
        );
        let room = Facts {
            total: 18,
            interfaces: 2,
            max_interfaces: Some(3),
            per_interface: Some(9),
            ..base()
        };
        assert_eq!(room.next_add().0, Verdict::PoolGrowing);
    }

    #[test]
    fn an_exhausted_add_says_the_next_address_frees_after_its_wait() {
        let f = Facts {
            blocked: Some(Blocked::MaxPods { max_pods: 27 }),
            ..base()
        };
        let r = exhausted_reason(&f);
        assert!(r.ends_with("after this ADD's wait of 10s"), "{r}");
        let none_cooling = Facts {
            cooling: 0,
            next_free_in_s: None,
            ..f
        };
        assert_eq!(
            exhausted_reason(&none_cooling),
            "max pods (27) reached on this node: 20 assigned, 0 cooling down"
        );
    }
}
