//! ipamd's settings from the environment, under aws-node's names and with
//! aws-node's meanings (see [`crate::awsnode`]) so a cluster moves over
//! without rewriting them. Every bad setting is reported at once; the
//! daemon exits 64 (EX_USAGE) on any.

use std::collections::HashMap;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::policy::PoolConfig;

/// Where settings come from: the process environment, or a map in tests.
pub trait ConfigSource {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct Env;

impl ConfigSource for Env {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl ConfigSource for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl ConfigSource for HashMap<&str, &str> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).map(|v| v.to_string())
    }
}

/// Every setting ipamd reads from the environment.
pub const KNOWN_VARS: &[&str] = &[
    "WARM_ENI_TARGET",
    "WARM_IP_TARGET",
    "MINIMUM_IP_TARGET",
    "WARM_PREFIX_TARGET",
    "ENABLE_PREFIX_DELEGATION",
    "MAX_ENI",
    "MAX_PODS",
    "IP_COOLDOWN_PERIOD",
    "IPAMD_ADD_WAIT_SECONDS",
    "AWS_VPC_K8S_CNI_EXTERNALSNAT",
    "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
    "CLUSTER_NAME",
    "IPAMD_RECLAIM_GONE_NETNS",
    "AWS_VPC_K8S_CNI_VETHPREFIX",
    "IPAMD_LEAKED_INTERFACE_GC_SECONDS",
    "ENABLE_SUBNET_DISCOVERY",
    "DISABLE_LEAKED_ENI_CLEANUP",
    "ADDITIONAL_ENI_TAGS",
    "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG",
    "ENI_CONFIG_ANNOTATION_DEF",
    "ENI_CONFIG_LABEL_DEF",
    "IPAM_SCALER_BATCH_SIZE",
    "IPAM_SCALER_REQUEST_THRESHOLD_PERCENT",
    "IPAM_SCALER_RELEASE_THRESHOLD_PERCENT",
    "IPAM_SCALER_MAX_IP_COUNT",
    "ADAPTIVE_WARM_TARGET",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Settings {
    pub pool: PoolConfig,
    /// A released address is not handed out again for this long.
    pub cooldown: Duration,
    /// How long an ADD that finds the pool empty waits for it to grow.
    pub add_wait: Duration,
    pub external_snat: bool,
    pub exclude_snat_cidrs: Vec<Ipv4Net>,
    pub cluster_name: String,
    /// Release addresses of pods whose network namespace is gone, judged by
    /// its identity at ADD (see [`crate::netns`]); on by default.
    pub reclaim_gone_netns: bool,
    /// Prefix of the pods' host-side veths (the plugin's `vethPrefix`).
    pub veth_prefix: String,
    /// How often (jittered) leaked interfaces of ours are looked for.
    pub leaked_gc_interval: Duration,
    /// Whether leaked interfaces are looked for at all
    /// (DISABLE_LEAKED_ENI_CLEANUP=true turns it off).
    pub leaked_gc: bool,
    /// New interfaces may go to subnets tagged `kubernetes.io/role/cni`
    /// (ENABLE_SUBNET_DISCOVERY, default true); else the node's subnet only.
    pub subnet_discovery: bool,
    /// Extra tags for new interfaces (ADDITIONAL_ENI_TAGS).
    pub additional_tags: std::collections::BTreeMap<String, String>,
    /// Custom networking (AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG): new
    /// interfaces go to the subnet and security groups of the node's
    /// ENIConfig, and the primary interface gives no pod addresses.
    pub custom_networking: bool,
    /// The node annotation naming its ENIConfig (ENI_CONFIG_ANNOTATION_DEF).
    pub eni_config_annotation_def: String,
    /// The node label naming its ENIConfig (ENI_CONFIG_LABEL_DEF), e.g.
    /// `topology.kubernetes.io/zone` for one ENIConfig per zone.
    pub eni_config_label_def: String,
}

/// aws-node's default for ENI_CONFIG_ANNOTATION_DEF and ENI_CONFIG_LABEL_DEF.
pub const ENI_CONFIG_KEY: &str = "k8s.amazonaws.com/eniConfig";

impl Default for Settings {
    fn default() -> Self {
        Self {
            pool: PoolConfig::default(),
            cooldown: Duration::from_secs(30),
            add_wait: Duration::from_secs(10),
            external_snat: false,
            exclude_snat_cidrs: vec![],
            cluster_name: "default".into(),
            reclaim_gone_netns: true,
            veth_prefix: "eni".into(),
            leaked_gc_interval: Duration::from_secs(600),
            leaked_gc: true,
            subnet_discovery: true,
            additional_tags: Default::default(),
            custom_networking: false,
            eni_config_annotation_def: ENI_CONFIG_KEY.into(),
            eni_config_label_def: ENI_CONFIG_KEY.into(),
        }
    }
}

/// All the problems found in the settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  {}", .problems.join("\n  "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

struct Reader<'a> {
    src: &'a dyn ConfigSource,
    problems: Vec<String>,
}

impl Reader<'_> {
    fn raw(&self, key: &str) -> Option<String> {
        crate::awsnode::value(self.src, key)
    }

    fn uint(&mut self, key: &str) -> Option<u32> {
        let v = self.raw(key)?;
        match v.parse::<u32>() {
            Ok(n) => Some(n),
            Err(_) => {
                self.problems
                    .push(format!("{key}={v:?}: expected a whole number of 0 or more"));
                None
            }
        }
    }

    /// A whole number where 0 means unset (aws-node's WARM_IP_TARGET and
    /// MINIMUM_IP_TARGET).
    fn uint_or_unset(&mut self, key: &str) -> Option<u32> {
        self.uint(key).filter(|n| *n > 0)
    }

    /// Go's `strconv.ParseBool`, as aws-node reads booleans.
    fn boolean(&mut self, key: &str) -> Option<bool> {
        let v = self.raw(key)?;
        match crate::awsnode::parse_bool(&v) {
            Some(b) => Some(b),
            None => {
                self.problems.push(format!(
                    "{key}={v:?}: expected true or false (1, t, TRUE, true, True, 0, f, FALSE, false, False)"
                ));
                None
            }
        }
    }
}

impl Settings {
    /// Reads and checks every setting; lists all problems at once.
    pub fn from_source(src: &dyn ConfigSource) -> Result<Self, ConfigError> {
        let mut r = Reader {
            src,
            problems: vec![],
        };
        let d = Settings::default();
        r.problems.extend(crate::awsnode::check(src).refusals);
        let warm_eni = r.uint("WARM_ENI_TARGET");
        let warm_ip = r.uint_or_unset("WARM_IP_TARGET");
        let min_ip = r.uint_or_unset("MINIMUM_IP_TARGET");
        let warm_prefix = r.uint("WARM_PREFIX_TARGET");
        let pd = r.boolean("ENABLE_PREFIX_DELEGATION").unwrap_or(false);
        let adaptive = r.boolean("ADAPTIVE_WARM_TARGET").unwrap_or(false);
        if adaptive {
            // WARM_IP_TARGET=0 is unset, as aws-node reads it.
            let warm_ip_set = warm_ip.is_some().then_some("WARM_IP_TARGET");
            let others: Vec<&str> = warm_ip_set
                .into_iter()
                .chain(
                    [
                        "WARM_ENI_TARGET",
                        "WARM_PREFIX_TARGET",
                        "IPAM_SCALER_BATCH_SIZE",
                        "IPAM_SCALER_REQUEST_THRESHOLD_PERCENT",
                        "IPAM_SCALER_RELEASE_THRESHOLD_PERCENT",
                        "IPAM_SCALER_MAX_IP_COUNT",
                    ]
                    .into_iter()
                    .filter(|k| r.raw(k).is_some()),
                )
                .collect();
            if !others.is_empty() {
                r.problems.push(format!(
                    "ADAPTIVE_WARM_TARGET=true sizes the warm pool itself; unset {} (MINIMUM_IP_TARGET may stay)",
                    others.join(", ")
                ));
            }
        }
        // Azure CNS's scaler: on when any of its knobs is set.
        let scaler_keys = [
            "IPAM_SCALER_BATCH_SIZE",
            "IPAM_SCALER_REQUEST_THRESHOLD_PERCENT",
            "IPAM_SCALER_RELEASE_THRESHOLD_PERCENT",
            "IPAM_SCALER_MAX_IP_COUNT",
        ];
        let scaler = if scaler_keys.iter().any(|k| r.raw(k).is_some()) {
            let d = crate::policy::Scaler::default();
            let mut knob = |k: &str, default: u32| match r.uint(k) {
                Some(0) => {
                    r.problems.push(format!("{k}=0: must be at least 1"));
                    default
                }
                Some(n) => n,
                None => default,
            };
            let s = crate::policy::Scaler {
                batch_size: knob("IPAM_SCALER_BATCH_SIZE", d.batch_size),
                request_threshold_percent: knob(
                    "IPAM_SCALER_REQUEST_THRESHOLD_PERCENT",
                    d.request_threshold_percent,
                ),
                release_threshold_percent: knob(
                    "IPAM_SCALER_RELEASE_THRESHOLD_PERCENT",
                    d.release_threshold_percent,
                ),
                max_ip_count: knob("IPAM_SCALER_MAX_IP_COUNT", d.max_ip_count),
            };
            let others: Vec<&str> = [
                "WARM_ENI_TARGET",
                "WARM_IP_TARGET",
                "MINIMUM_IP_TARGET",
                "WARM_PREFIX_TARGET",
            ]
            .into_iter()
            .filter(|k| r.raw(k).is_some())
            .collect();
            if !others.is_empty() {
                r.problems.push(format!(
                    "IPAM_SCALER_* (Azure CNS's batches) and {} are two ways to size the pool: set one",
                    others.join(", ")
                ));
            }
            if pd {
                r.problems.push(
                    "IPAM_SCALER_* with ENABLE_PREFIX_DELEGATION=true: the scaler moves single addresses".into(),
                );
            }
            Some(s.clamped())
        } else {
            None
        };
        // aws-node: 0 or negative (its default is -1) is the instance's limit.
        let max_eni = match r.raw("MAX_ENI") {
            None => None,
            Some(v) => match v.parse::<i64>() {
                Ok(n) if n <= 0 => None,
                Ok(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
                Err(_) => {
                    r.problems
                        .push(format!("MAX_ENI={v:?}: expected a whole number"));
                    None
                }
            },
        };
        let subnet_discovery = r.boolean("ENABLE_SUBNET_DISCOVERY").unwrap_or(true);
        let leaked_gc = !r.boolean("DISABLE_LEAKED_ENI_CLEANUP").unwrap_or(false);
        let custom_networking = r
            .boolean("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG")
            .unwrap_or(false);
        let mut eni_key = |name: &str| {
            let v = r.raw(name).unwrap_or_else(|| ENI_CONFIG_KEY.into());
            if let Err(e) = ipamd_api::names::check_k8s_qualified_name(&v) {
                r.problems.push(format!("{name}={v:?}: {e}"));
            }
            v
        };
        let eni_config_annotation_def = eni_key("ENI_CONFIG_ANNOTATION_DEF");
        let eni_config_label_def = eni_key("ENI_CONFIG_LABEL_DEF");
        let mut additional_tags = std::collections::BTreeMap::new();
        if let Some(json) = r.raw("ADDITIONAL_ENI_TAGS") {
            match serde_json::from_str::<std::collections::BTreeMap<String, String>>(&json) {
                Ok(tags) => {
                    // aws-node skips its own keys; ours are ipamd's to set.
                    additional_tags = tags
                        .into_iter()
                        .filter(|(k, _)| {
                            !k.contains("k8s.amazonaws.com") && !k.starts_with("vpc-cni.io/")
                        })
                        .collect();
                }
                Err(e) => r.problems.push(format!(
                    "ADDITIONAL_ENI_TAGS={json:?}: expected a JSON object of strings ({e})"
                )),
            }
        }
        let max_pods = r.uint("MAX_PODS");
        let cooldown = r.uint("IP_COOLDOWN_PERIOD");
        let add_wait = r.uint("IPAMD_ADD_WAIT_SECONDS");
        let external_snat = r.boolean("AWS_VPC_K8S_CNI_EXTERNALSNAT").unwrap_or(false);
        let reclaim_gone_netns = r.boolean("IPAMD_RECLAIM_GONE_NETNS").unwrap_or(true);
        let leaked_gc_secs = r.uint("IPAMD_LEAKED_INTERFACE_GC_SECONDS");
        if leaked_gc_secs == Some(0) {
            r.problems
                .push("IPAMD_LEAKED_INTERFACE_GC_SECONDS=0: must be at least 1".into());
        }
        let veth_prefix = r
            .raw("AWS_VPC_K8S_CNI_VETHPREFIX")
            .unwrap_or(d.veth_prefix.clone());
        if veth_prefix.is_empty()
            || veth_prefix.len() > 4
            || !veth_prefix.chars().all(|c| c.is_ascii_alphanumeric())
            || ["eth", "lo", "vlan"].contains(&veth_prefix.as_str())
        {
            r.problems.push(format!(
                "AWS_VPC_K8S_CNI_VETHPREFIX={veth_prefix:?}: 1 to 4 letters or digits, not eth, lo or vlan"
            ));
        }
        let mut exclude = vec![];
        if let Some(list) = r.raw("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS") {
            // IPv6 entries are skipped (with a warning, see awsnode), as
            // aws-node skips them.
            for item in list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.parse::<ipnet::Ipv6Net>().is_err())
            {
                match item.parse::<Ipv4Net>() {
                    Ok(n) => exclude.push(n.trunc()),
                    Err(_) => r.problems.push(format!(
                        "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS: {item:?} is not an IPv4 CIDR"
                    )),
                }
            }
        }

        let ip_targets = warm_ip.is_some() || min_ip.is_some();
        if max_pods == Some(0) {
            r.problems
                .push("MAX_PODS=0: the node could run no pod".into());
        }
        if add_wait == Some(0) {
            r.problems.push(
                "IPAMD_ADD_WAIT_SECONDS=0: an ADD must be able to wait for the pool to grow".into(),
            );
        }
        // As aws-node's start-up check.
        if pd && warm_prefix == Some(0) && !ip_targets {
            r.problems.push(
                "ENABLE_PREFIX_DELEGATION=true with WARM_PREFIX_TARGET=0 and no WARM_IP_TARGET/MINIMUM_IP_TARGET: the pool would never keep a prefix ready".into(),
            );
        }
        if !r.problems.is_empty() {
            return Err(ConfigError {
                problems: r.problems,
            });
        }
        Ok(Settings {
            pool: PoolConfig {
                warm_eni_target: warm_eni.unwrap_or(d.pool.warm_eni_target),
                warm_ip_target: warm_ip,
                minimum_ip_target: min_ip,
                // aws-node's chart default: one prefix kept warm.
                warm_prefix_target: if pd {
                    Some(warm_prefix.unwrap_or(1))
                } else {
                    None
                },
                prefix_delegation: pd,
                max_eni,
                // The scaler's max IP count is a cap on the pool, as MAX_PODS
                // is (its explain verdict, the node's capacity).
                max_pods: match (max_pods, scaler) {
                    (m, Some(s)) => Some(m.map_or(s.max_ip_count, |m| m.min(s.max_ip_count))),
                    (m, None) => m,
                },
                min_interface_age: d.pool.min_interface_age,
                scaler,
                adaptive,
            },
            cooldown: cooldown.map_or(d.cooldown, |s| Duration::from_secs(s.into())),
            add_wait: add_wait.map_or(d.add_wait, |s| Duration::from_secs(s.into())),
            external_snat,
            exclude_snat_cidrs: exclude,
            cluster_name: r.raw("CLUSTER_NAME").unwrap_or(d.cluster_name),
            reclaim_gone_netns,
            veth_prefix,
            leaked_gc_interval: leaked_gc_secs
                .map_or(d.leaked_gc_interval, |s| Duration::from_secs(s.into())),
            leaked_gc,
            subnet_discovery,
            additional_tags,
            custom_networking,
            eni_config_annotation_def,
            eni_config_label_def,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cns_scaler_is_a_mode_of_its_own() {
        assert_eq!(read(&[]).unwrap().pool.scaler, None);
        // Its max IP count caps the pool as MAX_PODS does.
        let cap = |env: &[(&'static str, &'static str)]| read(env).unwrap().pool.max_pods;
        assert_eq!(cap(&[("IPAM_SCALER_MAX_IP_COUNT", "30")]), Some(30));
        assert_eq!(
            cap(&[("IPAM_SCALER_MAX_IP_COUNT", "30"), ("MAX_PODS", "20")]),
            Some(20)
        );
        assert_eq!(cap(&[("IPAM_SCALER_BATCH_SIZE", "8")]), Some(250));
        let s = read(&[("IPAM_SCALER_BATCH_SIZE", "8")])
            .unwrap()
            .pool
            .scaler
            .unwrap();
        assert_eq!(
            (
                s.batch_size,
                s.request_threshold_percent,
                s.release_threshold_percent,
                s.max_ip_count
            ),
            (8, 50, 150, 250),
            "CNS's defaults for the rest"
        );
        // CNS's clamp: release at least request + 100.
        let s = read(&[
            ("IPAM_SCALER_REQUEST_THRESHOLD_PERCENT", "80"),
            ("IPAM_SCALER_RELEASE_THRESHOLD_PERCENT", "100"),
        ])
        .unwrap()
        .pool
        .scaler
        .unwrap();
        assert_eq!(s.release_threshold_percent, 180);
        // Two ways to size the pool, 0 and junk: every problem named.
        let e = read(&[
            ("IPAM_SCALER_BATCH_SIZE", "0"),
            ("IPAM_SCALER_MAX_IP_COUNT", "many"),
            ("WARM_IP_TARGET", "5"),
        ])
        .unwrap_err()
        .problems
        .join("\n");
        for want in [
            "IPAM_SCALER_BATCH_SIZE=0",
            "IPAM_SCALER_MAX_IP_COUNT",
            "WARM_IP_TARGET",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    /// The chart's `settings:` (values.yaml and values.schema.json) are
    /// exactly ipamd's settings: KNOWN_VARS and the honoured aws-node
    /// variables the chart does not set through values of its own.
    #[test]
    fn the_charts_settings_are_ipamds() {
        use crate::awsnode::{Treatment, VARIABLES};
        use std::collections::BTreeSet;
        // Set by the chart itself: MY_NODE_NAME (the downward API),
        // INTROSPECTION_BIND_ADDRESS and DISABLE_INTROSPECTION (the probes
        // use it; introspectionPort), DISABLE_METRICS (metrics.enabled),
        // AWS_VPC_K8S_CNI_BACKING_STORE (aws-node's path, mounted), and
        // MANAGE_UNTAGGED_ENI (no effect either way).
        let set_by_chart = [
            "MY_NODE_NAME",
            "INTROSPECTION_BIND_ADDRESS",
            "DISABLE_INTROSPECTION",
            "DISABLE_METRICS",
            "AWS_VPC_K8S_CNI_BACKING_STORE",
            "MANAGE_UNTAGGED_ENI",
        ];
        let want: BTreeSet<String> = KNOWN_VARS
            .iter()
            .copied()
            .chain(
                VARIABLES
                    .iter()
                    .filter(|v| matches!(v.treatment, Treatment::Honoured))
                    .map(|v| v.name)
                    .filter(|n| !set_by_chart.contains(n)),
            )
            .map(String::from)
            .collect();
        let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/vpc-cni");
        let values: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(chart.join("values.yaml")).unwrap())
                .unwrap();
        let in_values: BTreeSet<String> = values["settings"]
            .as_mapping()
            .expect("settings: a mapping")
            .keys()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        let schema: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(chart.join("values.schema.json")).unwrap(),
        )
        .unwrap();
        let in_schema: BTreeSet<String> = schema["properties"]["settings"]["properties"]
            .as_object()
            .expect("settings in the schema")
            .keys()
            .cloned()
            .collect();
        assert_eq!(in_values, want, "values.yaml settings vs ipamd's");
        assert_eq!(in_schema, want, "values.schema.json settings vs ipamd's");
        assert_eq!(
            schema["properties"]["settings"]["additionalProperties"], false,
            "a misspelt setting must be refused"
        );
    }

    fn read(pairs: &[(&'static str, &'static str)]) -> Result<Settings, ConfigError> {
        let m: HashMap<&str, &str> = pairs.iter().copied().collect();
        Settings::from_source(&m)
    }

    #[test]
    fn the_adaptive_warm_target_refuses_the_other_targets() {
        let s = read(&[
            ("ADAPTIVE_WARM_TARGET", "true"),
            ("MINIMUM_IP_TARGET", "10"),
        ])
        .unwrap();
        assert!(s.pool.adaptive);
        assert_eq!(s.pool.minimum_ip_target, Some(10));
        let e = read(&[
            ("ADAPTIVE_WARM_TARGET", "true"),
            ("WARM_IP_TARGET", "5"),
            ("IPAM_SCALER_BATCH_SIZE", "8"),
            ("MAX_PODS", "0"),
        ])
        .unwrap_err();
        let all = e.problems.join("\n");
        assert!(
            all.contains("ADAPTIVE_WARM_TARGET=true sizes the warm pool itself; unset WARM_IP_TARGET, IPAM_SCALER_BATCH_SIZE"),
            "{all}"
        );
        assert!(all.contains("MAX_PODS=0"), "every problem at once: {all}");
        assert!(!read(&[]).unwrap().pool.adaptive);
        assert!(read(&[("ADAPTIVE_WARM_TARGET", "maybe")]).is_err());
    }

    #[test]
    fn defaults_match_aws_node() {
        let s = read(&[]).unwrap();
        assert_eq!(s.pool.warm_eni_target, 1);
        assert_eq!(s.pool.warm_ip_target, None);
        assert_eq!(s.cooldown, Duration::from_secs(30));
        assert_eq!(s.add_wait, Duration::from_secs(10));
        assert!(!s.external_snat);
    }

    #[test]
    fn every_bad_setting_is_listed_at_once() {
        let e = read(&[
            ("WARM_IP_TARGET", "lots"),
            ("MAX_ENI", "many"),
            ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "maybe"),
            ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.1.0.0/16,bogus"),
            ("IP_COOLDOWN_PERIOD", "-5"),
            ("ENABLE_POD_ENI", "true"),
        ])
        .unwrap_err();
        assert_eq!(e.problems.len(), 6, "{e}");
        let text = e.to_string();
        for key in [
            "WARM_IP_TARGET",
            "MAX_ENI",
            "EXTERNALSNAT",
            "bogus",
            "IP_COOLDOWN_PERIOD",
            "ENABLE_POD_ENI",
        ] {
            assert!(text.contains(key), "{key} missing from: {text}");
        }
    }

    #[test]
    fn prefix_delegation_with_every_target_zero_is_rejected() {
        let e = read(&[
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_PREFIX_TARGET", "0"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("WARM_PREFIX_TARGET=0"), "{e}");
        // With an IP target the prefix target may be 0.
        let s = read(&[
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_PREFIX_TARGET", "0"),
            ("WARM_IP_TARGET", "5"),
        ])
        .unwrap();
        assert_eq!(s.pool.warm_ip_target, Some(5));
    }

    #[test]
    fn prefix_delegation_defaults_to_one_warm_prefix() {
        let s = read(&[("ENABLE_PREFIX_DELEGATION", "true")]).unwrap();
        assert_eq!(s.pool.warm_prefix_target, Some(1));
    }

    /// aws-node's meanings of 0, negative and empty values.
    #[test]
    fn zero_and_empty_mean_what_they_mean_to_aws_node() {
        // 0 is unset for the IP targets: the ENI target rules again.
        let s = read(&[("WARM_IP_TARGET", "0"), ("MINIMUM_IP_TARGET", "0")]).unwrap();
        assert_eq!(
            (s.pool.warm_ip_target, s.pool.minimum_ip_target),
            (None, None)
        );
        let s = read(&[("WARM_IP_TARGET", "0"), ("MINIMUM_IP_TARGET", "10")]).unwrap();
        assert_eq!(
            (s.pool.warm_ip_target, s.pool.minimum_ip_target),
            (None, Some(10))
        );
        // WARM_ENI_TARGET=0 is accepted: grow when nothing is free.
        assert_eq!(
            read(&[("WARM_ENI_TARGET", "0")])
                .unwrap()
                .pool
                .warm_eni_target,
            0
        );
        // MAX_ENI 0 or negative (aws-node's default -1): the instance's limit.
        for v in ["0", "-1", "-7"] {
            assert_eq!(read(&[("MAX_ENI", v)]).unwrap().pool.max_eni, None, "{v}");
        }
        assert_eq!(read(&[("MAX_ENI", "3")]).unwrap().pool.max_eni, Some(3));
        // WARM_PREFIX_TARGET without prefix delegation is ignored (aws-node's
        // chart sets it to 1 by default).
        let s = read(&[("WARM_PREFIX_TARGET", "1")]).unwrap();
        assert_eq!(s.pool.warm_prefix_target, None);
        // Only what parses as an IPv6 network is skipped as IPv6.
        assert!(read(&[("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "junk:")]).is_err());
        assert!(read(&[("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.1.0.0:16")]).is_err());
        // Empty is unset everywhere.
        assert_eq!(
            read(&[("WARM_ENI_TARGET", ""), ("ENABLE_PREFIX_DELEGATION", " ")]).unwrap(),
            read(&[]).unwrap()
        );
        // Booleans as Go's ParseBool reads them.
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert!(
                read(&[("ENABLE_PREFIX_DELEGATION", t)])
                    .unwrap()
                    .pool
                    .prefix_delegation,
                "{t}"
            );
        }
        assert!(read(&[("ENABLE_PREFIX_DELEGATION", "yes")]).is_err());
        // IP_COOLDOWN_PERIOD 0 is allowed, negative is not (aws-node exits too).
        assert_eq!(
            read(&[("IP_COOLDOWN_PERIOD", "0")]).unwrap().cooldown,
            Duration::ZERO
        );
        assert!(read(&[("IP_COOLDOWN_PERIOD", "-1")]).is_err());
        // The veth prefixes aws-node refuses.
        for p in ["eth", "lo", "vlan", "toolong"] {
            assert!(read(&[("AWS_VPC_K8S_CNI_VETHPREFIX", p)]).is_err(), "{p}");
        }
    }

    /// Every variable the README's table calls honoured, read with its
    /// meaning (the others are tested in `awsnode`; the ones main reads are
    /// in ipamd's start-up test).
    #[test]
    fn honoured_aws_node_variables() {
        use crate::awsnode::{Treatment, VARIABLES};
        let checked: &[(&str, fn())] = &[
            ("WARM_ENI_TARGET", || {
                assert_eq!(
                    read(&[("WARM_ENI_TARGET", "2")])
                        .unwrap()
                        .pool
                        .warm_eni_target,
                    2
                )
            }),
            ("WARM_IP_TARGET", || {
                assert_eq!(
                    read(&[("WARM_IP_TARGET", "5")])
                        .unwrap()
                        .pool
                        .warm_ip_target,
                    Some(5)
                )
            }),
            ("MINIMUM_IP_TARGET", || {
                assert_eq!(
                    read(&[("MINIMUM_IP_TARGET", "9")])
                        .unwrap()
                        .pool
                        .minimum_ip_target,
                    Some(9)
                )
            }),
            ("WARM_PREFIX_TARGET", || {
                let s = read(&[
                    ("WARM_PREFIX_TARGET", "2"),
                    ("ENABLE_PREFIX_DELEGATION", "true"),
                ])
                .unwrap();
                assert_eq!(s.pool.warm_prefix_target, Some(2));
            }),
            ("ENABLE_PREFIX_DELEGATION", || {
                assert!(
                    read(&[("ENABLE_PREFIX_DELEGATION", "T")])
                        .unwrap()
                        .pool
                        .prefix_delegation
                )
            }),
            ("MAX_ENI", || {
                assert_eq!(read(&[("MAX_ENI", "2")]).unwrap().pool.max_eni, Some(2))
            }),
            ("IP_COOLDOWN_PERIOD", || {
                assert_eq!(
                    read(&[("IP_COOLDOWN_PERIOD", "5")]).unwrap().cooldown,
                    Duration::from_secs(5)
                )
            }),
            ("ENABLE_SUBNET_DISCOVERY", || {
                assert!(read(&[]).unwrap().subnet_discovery);
                assert!(
                    !read(&[("ENABLE_SUBNET_DISCOVERY", "false")])
                        .unwrap()
                        .subnet_discovery
                );
            }),
            ("DISABLE_LEAKED_ENI_CLEANUP", || {
                assert!(read(&[]).unwrap().leaked_gc);
                assert!(
                    !read(&[("DISABLE_LEAKED_ENI_CLEANUP", "true")])
                        .unwrap()
                        .leaked_gc
                );
            }),
            ("ADDITIONAL_ENI_TAGS", || {
                let s = read(&[(
                    "ADDITIONAL_ENI_TAGS",
                    r#"{"team": "net", "node.k8s.amazonaws.com/x": "y", "vpc-cni.io/owner": "z"}"#,
                )])
                .unwrap();
                assert_eq!(s.additional_tags.len(), 1);
                assert_eq!(s.additional_tags["team"], "net");
                assert!(read(&[("ADDITIONAL_ENI_TAGS", "team=net")]).is_err());
            }),
            ("CLUSTER_NAME", || {
                assert_eq!(
                    read(&[("CLUSTER_NAME", "prod")]).unwrap().cluster_name,
                    "prod"
                )
            }),
            ("MANAGE_UNTAGGED_ENI", || {
                // Accepted either way; false is what vpc-cni does.
                assert!(read(&[("MANAGE_UNTAGGED_ENI", "false")]).is_ok());
                assert!(read(&[("MANAGE_UNTAGGED_ENI", "true")]).is_ok());
            }),
            ("AWS_VPC_K8S_CNI_EXTERNALSNAT", || {
                assert!(
                    read(&[("AWS_VPC_K8S_CNI_EXTERNALSNAT", "1")])
                        .unwrap()
                        .external_snat
                )
            }),
            ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", || {
                let s = read(&[(
                    "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
                    "10.9.0.0/16, fd00::/8",
                )])
                .unwrap();
                assert_eq!(s.exclude_snat_cidrs, vec!["10.9.0.0/16".parse().unwrap()]);
            }),
            ("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", || {
                assert!(!read(&[]).unwrap().custom_networking);
                assert!(
                    read(&[("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "TRUE")])
                        .unwrap()
                        .custom_networking
                );
                assert!(read(&[("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "yes")]).is_err());
            }),
            ("ENI_CONFIG_LABEL_DEF", || {
                assert_eq!(read(&[]).unwrap().eni_config_label_def, ENI_CONFIG_KEY);
                let zone = "topology.kubernetes.io/zone";
                let s = read(&[("ENI_CONFIG_LABEL_DEF", zone)]).unwrap();
                assert_eq!(s.eni_config_label_def, zone);
                assert!(read(&[("ENI_CONFIG_LABEL_DEF", "not a key")]).is_err());
            }),
            ("ENI_CONFIG_ANNOTATION_DEF", || {
                assert_eq!(read(&[]).unwrap().eni_config_annotation_def, ENI_CONFIG_KEY);
                let s = read(&[("ENI_CONFIG_ANNOTATION_DEF", "example.com/eni")]).unwrap();
                assert_eq!(s.eni_config_annotation_def, "example.com/eni");
            }),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", || {
                assert_eq!(
                    read(&[("AWS_VPC_K8S_CNI_VETHPREFIX", "pod")])
                        .unwrap()
                        .veth_prefix,
                    "pod"
                )
            }),
        ];
        // Read by main (flags and the provider), tested against the binary.
        let in_main = [
            "AWS_VPC_K8S_CNI_BACKING_STORE",
            "DISABLE_METRICS",
            "DISABLE_INTROSPECTION",
            "INTROSPECTION_BIND_ADDRESS",
            "AWS_EC2_ENDPOINT",
            "MY_NODE_NAME",
            // The Kubernetes side (tests/kube.rs).
            "AWS_MANAGE_ENIS_NON_SCHEDULABLE",
        ];
        for var in VARIABLES
            .iter()
            .filter(|v| matches!(v.treatment, Treatment::Honoured))
        {
            match checked.iter().find(|(n, _)| *n == var.name) {
                Some((_, test)) => test(),
                None => assert!(
                    in_main.contains(&var.name),
                    "{} is honoured but untested",
                    var.name
                ),
            }
        }
    }

    #[test]
    fn snat_settings() {
        let s = read(&[
            ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "true"),
            (
                "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
                " 10.1.2.3/16 , 192.168.0.0/24",
            ),
        ])
        .unwrap();
        assert!(s.external_snat);
        assert_eq!(
            s.exclude_snat_cidrs,
            vec![
                "10.1.0.0/16".parse().unwrap(),
                "192.168.0.0/24".parse().unwrap()
            ]
        );
    }
}
