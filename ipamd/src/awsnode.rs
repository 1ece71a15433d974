//! aws-node's environment variables: every one ipamd is given is either
//! read with aws-node's meaning, accepted with a warning (it has no effect
//! here), or refused (exit 64) when its value turns on something that
//! changes where pods get addresses or how their traffic is routed and that
//! vpc-cni does not do. So a DaemonSet moved from aws-node with its settings
//! never gets pods in the wrong subnet without a word.
//!
//! The list and the meanings come from aws-node's sources and README
//! (amazon-vpc-cni-k8s 1.18–1.20: `pkg/ipamd/ipamd.go`, `utils/utils.go`,
//! `pkg/networkutils/network.go`, `cmd/aws-vpc-cni/main.go`). The README's
//! table of aws-node variables is checked against [`VARIABLES`] by a test.
//!
//! Booleans are read as aws-node reads them (Go's `strconv.ParseBool`:
//! `1 t T TRUE true True 0 f F FALSE false False`; empty is unset). Where
//! aws-node silently falls back to a default on a value it cannot parse,
//! ipamd stops with the value named instead.

use crate::config::ConfigSource;

/// What ipamd does with one of aws-node's variables.
#[derive(Debug, Clone, Copy)]
pub enum Treatment {
    /// Read, with aws-node's meaning.
    Honoured,
    /// Accepted; it has no effect in vpc-cni. Logged at start when set.
    Warned,
    /// Stops ipamd (exit 64) when the value turns on what vpc-cni does not
    /// do; any other value is accepted.
    Refused(fn(&str) -> Refusal),
}

/// Whether a value of a [`Treatment::Refused`] variable is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Accept,
    Refuse,
    /// Not a value aws-node takes either.
    Invalid(&'static str),
}

/// One aws-node variable.
#[derive(Debug, Clone, Copy)]
pub struct Var {
    pub name: &'static str,
    pub treatment: Treatment,
    /// What vpc-cni does with it, for messages and the README.
    pub note: &'static str,
}

/// Go's `strconv.ParseBool`, which aws-node uses for every boolean.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn refuse_true(v: &str) -> Refusal {
    match parse_bool(v) {
        Some(true) => Refusal::Refuse,
        Some(false) => Refusal::Accept,
        None => Refusal::Invalid("expected true or false (1, t, TRUE, 0, f, FALSE, ...)"),
    }
}

fn refuse_false(v: &str) -> Refusal {
    match parse_bool(v) {
        Some(false) => Refusal::Refuse,
        Some(true) => Refusal::Accept,
        None => Refusal::Invalid("expected true or false (1, t, TRUE, 0, f, FALSE, ...)"),
    }
}

fn refuse_non_empty(v: &str) -> Refusal {
    if v.trim().is_empty() {
        Refusal::Accept
    } else {
        Refusal::Refuse
    }
}

fn refuse_strict(v: &str) -> Refusal {
    match v.to_ascii_lowercase().as_str() {
        "none" | "standard" => Refusal::Accept,
        "strict" => Refusal::Refuse,
        _ => Refusal::Invalid("expected none, standard or strict"),
    }
}

/// An integer as Go's `strconv.ParseInt(v, 0, 64)` reads it (aws-node's
/// connmark): `0x`/`0X` hex, `0o`/`0O` or a leading `0` octal, `0b`/`0B`
/// binary, else decimal.
fn go_int(v: &str) -> Result<u64, std::num::ParseIntError> {
    let lower = v.to_ascii_lowercase();
    if let Some(h) = lower.strip_prefix("0x") {
        u64::from_str_radix(h, 16)
    } else if let Some(b) = lower.strip_prefix("0b") {
        u64::from_str_radix(b, 2)
    } else if let Some(o) = lower.strip_prefix("0o") {
        u64::from_str_radix(o, 8)
    } else if lower.len() > 1 && lower.starts_with('0') {
        u64::from_str_radix(&lower[1..], 8)
    } else {
        lower.parse()
    }
}

fn refuse_other_mark(v: &str) -> Refusal {
    let n = go_int(v);
    match n {
        Ok(0x80) => Refusal::Accept,
        Ok(_) => Refusal::Refuse,
        Err(_) => Refusal::Invalid("expected a number such as 0x80"),
    }
}

use Treatment::{Honoured, Refused, Warned};

/// Every aws-node variable, in the README's order.
pub const VARIABLES: &[Var] = &[
    // Where pods get addresses.
    Var { name: "WARM_ENI_TARGET", treatment: Honoured, note: "whole interfaces kept free; 0: grow by a whole interface when no address is free" },
    Var { name: "WARM_IP_TARGET", treatment: Honoured, note: "addresses kept free; 0 or empty is unset" },
    Var { name: "MINIMUM_IP_TARGET", treatment: Honoured, note: "addresses the pool holds at least; 0 or empty is unset" },
    Var { name: "WARM_PREFIX_TARGET", treatment: Honoured, note: "/28 prefixes kept free under prefix delegation; ignored (with a warning) without it" },
    Var { name: "ENABLE_PREFIX_DELEGATION", treatment: Honoured, note: "/28 prefixes instead of single addresses" },
    Var { name: "MAX_ENI", treatment: Honoured, note: "interfaces at most; 0 or negative (aws-node's default -1) is the instance's limit" },
    Var { name: "IP_COOLDOWN_PERIOD", treatment: Honoured, note: "seconds a released address rests; negative stops ipamd, as in aws-node" },
    Var { name: "ENABLE_SUBNET_DISCOVERY", treatment: Honoured, note: "true (default): new interfaces go to subnets tagged kubernetes.io/role/cni; false: the node's subnet only" },
    Var { name: "DISABLE_LEAKED_ENI_CLEANUP", treatment: Honoured, note: "true: leaked interfaces are not looked for" },
    Var { name: "ADDITIONAL_ENI_TAGS", treatment: Honoured, note: "JSON object of tags for new interfaces; keys with k8s.amazonaws.com or vpc-cni.io are skipped" },
    Var { name: "CLUSTER_NAME", treatment: Honoured, note: "tag value on new interfaces" },
    Var { name: "AWS_VPC_K8S_CNI_BACKING_STORE", treatment: Honoured, note: "aws-node's checkpoint, imported on the first start (when --aws-node-checkpoint is not given)" },
    Var { name: "MANAGE_UNTAGGED_ENI", treatment: Honoured, note: "false is what vpc-cni always does (only interfaces it or aws-node created); true (aws-node's default) is accepted with a warning" },
    Var { name: "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", treatment: Honoured, note: "true: new interfaces go to the subnet and security groups of the node's ENIConfig, and the primary interface gives no pod addresses; needs Kubernetes" },
    Var { name: "ENABLE_POD_ENI", treatment: Refused(refuse_true), note: "true: security groups for pods (branch interfaces) are not supported" },
    Var { name: "ENABLE_IPv6", treatment: Refused(refuse_true), note: "true: vpc-cni is IPv4 only" },
    Var { name: "ENABLE_IPv4", treatment: Refused(refuse_false), note: "false: vpc-cni is IPv4 only" },
    Var { name: "ENABLE_V6_EGRESS", treatment: Refused(refuse_true), note: "true: no IPv6 egress for IPv4 pods" },
    Var { name: "ENABLE_MULTI_NIC", treatment: Refused(refuse_true), note: "true: interfaces on other network cards are not used" },
    Var { name: "DISABLE_NETWORK_RESOURCE_PROVISIONING", treatment: Refused(refuse_true), note: "true: ipamd always attaches and assigns itself" },
    Var { name: "ENABLE_IMDS_ONLY_MODE", treatment: Refused(refuse_true), note: "true: ipamd needs the EC2 API" },
    // Routing and SNAT.
    Var { name: "AWS_VPC_K8S_CNI_EXTERNALSNAT", treatment: Honoured, note: "true: the node does no SNAT" },
    Var { name: "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", treatment: Honoured, note: "IPv4 CIDRs not SNATed; IPv6 entries are skipped with a warning, other bad entries stop ipamd" },
    Var { name: "AWS_VPC_K8S_CNI_VETHPREFIX", treatment: Honoured, note: "host veth prefix, 1 to 4 letters or digits, not eth, lo or vlan (the plugin's vethPrefix must match)" },
    Var { name: "AWS_EXTERNAL_SERVICE_CIDRS", treatment: Refused(refuse_non_empty), note: "routing those destinations through the main table is not built" },
    Var { name: "AWS_VPC_K8S_CNI_CONNMARK", treatment: Refused(refuse_other_mark), note: "vpc-cni's connmark is 0x80; another mark is refused" },
    Var { name: "NETWORK_POLICY_ENFORCING_MODE", treatment: Refused(refuse_strict), note: "strict (deny until policies apply) is not built; none and standard are what vpc-cni does" },
    Var { name: "AWS_VPC_K8S_CNI_RANDOMIZESNAT", treatment: Warned, note: "vpc-cni's SNAT rule chooses ports its own way" },
    Var { name: "AWS_VPC_CNI_NODE_PORT_SUPPORT", treatment: Warned, note: "the connmark rules for NodePort replies are always set" },
    Var { name: "POD_SECURITY_GROUP_ENFORCING_MODE", treatment: Warned, note: "only with ENABLE_POD_ENI, which is refused" },
    Var { name: "AWS_VPC_ENI_MTU", treatment: Warned, note: "interfaces keep the MTU the cloud gives them" },
    Var { name: "POD_MTU", treatment: Warned, note: "set mtu in vpc-cni's network configuration" },
    Var { name: "DISABLE_TCP_EARLY_DEMUX", treatment: Warned, note: "only for security groups for pods" },
    Var { name: "DISABLE_POD_V6", treatment: Warned, note: "pods get no IPv6 address from vpc-cni" },
    Var { name: "ENABLE_BANDWIDTH_PLUGIN", treatment: Warned, note: "chain bandwidth in the network configuration instead" },
    Var { name: "ENABLE_V4_EGRESS", treatment: Warned, note: "only for IPv6 pods, which are refused" },
    Var { name: "AWS_VPC_K8S_CNI_CONFIGURE_RPFILTER", treatment: Warned, note: "no effect in aws-node either since 1.12.1" },
    Var { name: "ENABLE_NFTABLES", treatment: Warned, note: "no effect in aws-node either since 1.13.2; vpc-cni uses nftables" },
    // Operation.
    Var { name: "DISABLE_METRICS", treatment: Honoured, note: "true: no metrics listener (--metrics off)" },
    Var { name: "DISABLE_INTROSPECTION", treatment: Honoured, note: "true: no introspection listener (--introspection off)" },
    Var { name: "INTROSPECTION_BIND_ADDRESS", treatment: Honoured, note: "the introspection address when --introspection is not given; loopback only, no unix: sockets" },
    Var { name: "AWS_EC2_ENDPOINT", treatment: Honoured, note: "the EC2 endpoint (after AWS_ENDPOINT_URL_EC2, before AWS_ENDPOINT_URL)" },
    Var { name: "MY_NODE_NAME", treatment: Honoured, note: "the node's name; required with Kubernetes" },
    Var { name: "AWS_MANAGE_ENIS_NON_SCHEDULABLE", treatment: Honoured, note: "false (default): a cordoned node neither attaches nor deletes interfaces; true: it does" },
    Var { name: "ENI_CONFIG_LABEL_DEF", treatment: Honoured, note: "the node label whose value names its ENIConfig (after the annotation, before `default`)" },
    Var { name: "ENI_CONFIG_ANNOTATION_DEF", treatment: Honoured, note: "the node annotation whose value names its ENIConfig (first)" },
    Var { name: "ANNOTATE_POD_IP", treatment: Warned, note: "pods are not annotated" },
    Var { name: "CLUSTER_ENDPOINT", treatment: Warned, note: "the API server is found in-cluster (KUBERNETES_SERVICE_HOST) or from --kubeconfig" },
    Var { name: "AWS_VPC_K8S_CNI_LOGLEVEL", treatment: Warned, note: "use IPAMD_LOG" },
    Var { name: "AWS_VPC_K8S_CNI_LOG_FILE", treatment: Warned, note: "ipamd logs to stderr" },
    Var { name: "AWS_VPC_K8S_PLUGIN_LOG_FILE", treatment: Warned, note: "set logFile in vpc-cni's network configuration" },
    Var { name: "AWS_VPC_K8S_PLUGIN_LOG_LEVEL", treatment: Warned, note: "set logLevel in vpc-cni's network configuration" },
    Var { name: "AWS_VPC_K8S_EGRESS_V4_PLUGIN_LOG_FILE", treatment: Warned, note: "no egress plugin" },
    Var { name: "AWS_VPC_K8S_EGRESS_V6_PLUGIN_LOG_FILE", treatment: Warned, note: "no egress plugin" },
    Var { name: "HOST_CNI_BIN_PATH", treatment: Warned, note: "the install step's concern" },
    Var { name: "HOST_CNI_CONFDIR_PATH", treatment: Warned, note: "the install step's concern" },
    Var { name: "VPC_CNI_VERSION", treatment: Warned, note: "informational" },
];

/// `name`'s value in `src`, trimmed; `None` when unset or empty (empty is
/// unset for every aws-node variable).
pub fn value(src: &dyn ConfigSource, name: &str) -> Option<String> {
    src.get(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Whether the boolean `name` is set to true (as [`parse_bool`] reads it).
pub fn is_true(src: &dyn ConfigSource, name: &str) -> bool {
    value(src, name).and_then(|v| parse_bool(&v)) == Some(true)
}

/// The variable named `name`, if it is aws-node's.
pub fn find(name: &str) -> Option<&'static Var> {
    VARIABLES.iter().find(|v| v.name == name)
}

/// What the environment's aws-node variables mean for this start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdicts {
    /// One line per variable set that has no effect (or a partial one).
    pub warnings: Vec<String>,
    /// One line per refused or invalid value: ipamd exits 64.
    pub refusals: Vec<String>,
}

/// Checks every aws-node variable `src` sets (empty counts as unset).
pub fn check(src: &dyn ConfigSource) -> Verdicts {
    let mut out = Verdicts::default();
    for var in VARIABLES {
        let Some(value) = src.get(var.name).filter(|v| !v.trim().is_empty()) else {
            continue;
        };
        let value = value.trim();
        match var.treatment {
            Honoured => {}
            Warned => out.warnings.push(format!(
                "{}={value:?} has no effect in vpc-cni: {}",
                var.name, var.note
            )),
            Refused(judge) => match judge(value) {
                Refusal::Accept => {}
                Refusal::Refuse => out.refusals.push(format!(
                    "{}={value:?} is aws-node's and is not supported: {}",
                    var.name, var.note
                )),
                Refusal::Invalid(why) => {
                    out.refusals.push(format!("{}={value:?}: {why}", var.name))
                }
            },
        }
    }
    let get = |k: &str| value(src, k);
    // Honoured booleans that ipamd's settings do not parse themselves.
    for name in [
        "DISABLE_METRICS",
        "DISABLE_INTROSPECTION",
        "MANAGE_UNTAGGED_ENI",
        "AWS_MANAGE_ENIS_NON_SCHEDULABLE",
    ] {
        if let Some(v) = get(name).filter(|v| parse_bool(v).is_none()) {
            out.refusals.push(format!(
                "{name}={v:?}: expected true or false (1, t, TRUE, 0, f, FALSE, ...)"
            ));
        }
    }
    // Honoured, but only in part.
    if get("MANAGE_UNTAGGED_ENI").and_then(|v| parse_bool(&v)) == Some(true) {
        out.warnings.push(
            "MANAGE_UNTAGGED_ENI=true: vpc-cni never uses interfaces that neither it nor aws-node created".into(),
        );
    }
    let pd = get("ENABLE_PREFIX_DELEGATION").and_then(|v| parse_bool(&v)) == Some(true);
    if !pd && get("WARM_PREFIX_TARGET").is_some() {
        out.warnings.push(
            "WARM_PREFIX_TARGET has no effect without ENABLE_PREFIX_DELEGATION=true (as in aws-node)".into(),
        );
    }
    if let Some(list) = get("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS") {
        for item in list
            .split(',')
            .map(str::trim)
            .filter(|s| s.parse::<ipnet::Ipv6Net>().is_ok())
        {
            out.warnings.push(format!(
                "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS: {item:?} is IPv6 and is skipped (pods are IPv4 only)"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn verdicts(pairs: &[(&str, &str)]) -> Verdicts {
        let m: HashMap<&str, &str> = pairs.iter().copied().collect();
        check(&m)
    }

    #[test]
    fn booleans_are_read_as_go_parses_them() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_bool(t), Some(true), "{t}");
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_bool(f), Some(false), "{f}");
        }
        for bad in ["yes", "no", "tRUE", "", " true", "2"] {
            assert_eq!(parse_bool(bad), None, "{bad:?}");
        }
    }

    /// The README's table is this list: same names, order, verdicts and
    /// notes.
    #[test]
    fn the_readme_table_is_this_list() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("README.md");
        let start = readme
            .find("| variable | vpc-cni | what it does here |")
            .expect("the table of aws-node's variables");
        let rows: Vec<(String, String, String)> = readme[start..]
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
                assert_eq!(cells.len(), 3, "{l}");
                (
                    cells[0].trim_matches('`').to_string(),
                    cells[1].to_string(),
                    cells[2].to_string(),
                )
            })
            .collect();
        let want: Vec<(String, String, String)> = VARIABLES
            .iter()
            .map(|v| {
                let verdict = match v.treatment {
                    Honoured => "honoured",
                    Warned => "accepted, warning",
                    Refused(_) => "refused (exit 64)",
                };
                (v.name.to_string(), verdict.to_string(), v.note.to_string())
            })
            .collect();
        assert_eq!(rows, want);
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = VARIABLES.iter().map(|v| v.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n);
    }

    /// Every refused variable: a value that turns its feature on is
    /// refused by name, one that leaves it off is accepted.
    #[test]
    fn refused_variables_refuse_only_what_turns_their_feature_on() {
        let cases: &[(&str, &str, &str)] = &[
            ("ENABLE_POD_ENI", "TRUE", "false"),
            ("ENABLE_IPv6", "t", "false"),
            ("ENABLE_IPv4", "false", "true"),
            ("ENABLE_V6_EGRESS", "1", "0"),
            ("ENABLE_MULTI_NIC", "True", "F"),
            ("DISABLE_NETWORK_RESOURCE_PROVISIONING", "true", "false"),
            ("ENABLE_IMDS_ONLY_MODE", "true", "false"),
            ("AWS_EXTERNAL_SERVICE_CIDRS", "10.100.0.0/16", " "),
            ("AWS_VPC_K8S_CNI_CONNMARK", "0x100", "0x80"),
            ("NETWORK_POLICY_ENFORCING_MODE", "strict", "standard"),
        ];
        let refused: Vec<&str> = VARIABLES
            .iter()
            .filter(|v| matches!(v.treatment, Refused(_)))
            .map(|v| v.name)
            .collect();
        let tested: Vec<&str> = cases.iter().map(|c| c.0).collect();
        assert_eq!(refused, tested, "every refused variable has a case");
        for (name, on, off) in cases {
            let v = verdicts(&[(name, on)]);
            assert_eq!(v.refusals.len(), 1, "{name}={on}: {v:?}");
            assert!(v.refusals[0].starts_with(&format!("{name}=")), "{v:?}");
            assert!(v.refusals[0].contains("not supported"), "{v:?}");
            let v = verdicts(&[(name, off)]);
            assert!(v.refusals.is_empty(), "{name}={off}: {v:?}");
        }
        // A value aws-node would not take either is named as such.
        let v = verdicts(&[
            ("ENABLE_POD_ENI", "yes"),
            ("NETWORK_POLICY_ENFORCING_MODE", "lax"),
        ]);
        assert_eq!(v.refusals.len(), 2, "{v:?}");
        assert!(
            v.refusals.iter().all(|r| !r.contains("not supported")),
            "{v:?}"
        );
        // The mark in decimal or octal is the same mark (Go's base 0).
        for same in ["128", "0200", "0X80", "0b10000000"] {
            assert!(
                verdicts(&[("AWS_VPC_K8S_CNI_CONNMARK", same)])
                    .refusals
                    .is_empty(),
                "{same}"
            );
        }
    }

    #[test]
    fn warned_variables_are_accepted_and_named_when_set() {
        for var in VARIABLES.iter().filter(|v| matches!(v.treatment, Warned)) {
            let v = verdicts(&[(var.name, "something")]);
            assert!(v.refusals.is_empty(), "{}: {v:?}", var.name);
            assert_eq!(v.warnings.len(), 1, "{}: {v:?}", var.name);
            assert!(v.warnings[0].starts_with(var.name), "{v:?}");
            assert!(v.warnings[0].contains("has no effect"), "{v:?}");
            // Empty is unset: nothing to say.
            assert_eq!(verdicts(&[(var.name, "")]), Verdicts::default());
        }
    }

    #[test]
    fn honoured_booleans_must_be_booleans() {
        let v = verdicts(&[
            ("DISABLE_METRICS", "yes"),
            ("DISABLE_INTROSPECTION", "maybe"),
            ("MANAGE_UNTAGGED_ENI", "garbage"),
            ("AWS_MANAGE_ENIS_NON_SCHEDULABLE", "sometimes"),
        ]);
        assert_eq!(v.refusals.len(), 4, "{v:?}");
        assert!(verdicts(&[("DISABLE_METRICS", "true")]).refusals.is_empty());
    }

    #[test]
    fn partly_honoured_settings_warn() {
        let v = verdicts(&[
            ("MANAGE_UNTAGGED_ENI", "true"),
            ("WARM_PREFIX_TARGET", "1"),
            ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.1.0.0/16,fd00::/8"),
        ]);
        assert!(v.refusals.is_empty(), "{v:?}");
        assert_eq!(v.warnings.len(), 3, "{v:?}");
        assert!(verdicts(&[("MANAGE_UNTAGGED_ENI", "false")])
            .warnings
            .is_empty());
        assert!(verdicts(&[
            ("WARM_PREFIX_TARGET", "1"),
            ("ENABLE_PREFIX_DELEGATION", "true")
        ])
        .warnings
        .is_empty());
    }
}
