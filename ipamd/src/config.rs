//! ipamd's settings from the environment, under aws-node's names so a
//! cluster moves over without rewriting them. Every bad setting is reported
//! at once; the daemon exits 64 (EX_USAGE) on any.

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
}

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
        self.src
            .get(key)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
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

    fn boolean(&mut self, key: &str) -> Option<bool> {
        let v = self.raw(key)?;
        match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" => Some(false),
            _ => {
                self.problems
                    .push(format!("{key}={v:?}: expected true or false"));
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
        let warm_eni = r.uint("WARM_ENI_TARGET");
        let warm_ip = r.uint("WARM_IP_TARGET");
        let min_ip = r.uint("MINIMUM_IP_TARGET");
        let warm_prefix = r.uint("WARM_PREFIX_TARGET");
        let pd = r.boolean("ENABLE_PREFIX_DELEGATION").unwrap_or(false);
        let max_eni = r.uint("MAX_ENI");
        let max_pods = r.uint("MAX_PODS");
        let cooldown = r.uint("IP_COOLDOWN_PERIOD");
        let add_wait = r.uint("IPAMD_ADD_WAIT_SECONDS");
        let external_snat = r.boolean("AWS_VPC_K8S_CNI_EXTERNALSNAT").unwrap_or(false);
        let reclaim_gone_netns = r.boolean("IPAMD_RECLAIM_GONE_NETNS").unwrap_or(true);
        let leaked_gc = r.uint("IPAMD_LEAKED_INTERFACE_GC_SECONDS");
        if leaked_gc == Some(0) {
            r.problems
                .push("IPAMD_LEAKED_INTERFACE_GC_SECONDS=0: must be at least 1".into());
        }
        let veth_prefix = r
            .raw("AWS_VPC_K8S_CNI_VETHPREFIX")
            .unwrap_or(d.veth_prefix.clone());
        if veth_prefix.is_empty()
            || veth_prefix.len() > 4
            || !veth_prefix.chars().all(|c| c.is_ascii_alphanumeric())
        {
            r.problems.push(format!(
                "AWS_VPC_K8S_CNI_VETHPREFIX={veth_prefix:?}: 1 to 4 letters or digits"
            ));
        }
        let mut exclude = vec![];
        if let Some(list) = r.raw("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS") {
            for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                match item.parse::<Ipv4Net>() {
                    Ok(n) => exclude.push(n.trunc()),
                    Err(_) => r.problems.push(format!(
                        "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS: {item:?} is not an IPv4 CIDR"
                    )),
                }
            }
        }

        let ip_targets = warm_ip.is_some() || min_ip.is_some();
        let ip_targets_zero = ip_targets && warm_ip.unwrap_or(0) == 0 && min_ip.unwrap_or(0) == 0;
        if max_eni == Some(0) {
            r.problems
                .push("MAX_ENI=0: at least the primary interface is needed".into());
        }
        if max_pods == Some(0) {
            r.problems
                .push("MAX_PODS=0: the node could run no pod".into());
        }
        if add_wait == Some(0) {
            r.problems.push(
                "IPAMD_ADD_WAIT_SECONDS=0: an ADD must be able to wait for the pool to grow".into(),
            );
        }
        if ip_targets_zero {
            r.problems.push(
                "WARM_IP_TARGET and MINIMUM_IP_TARGET are both 0: the pool would keep no address ready; unset them to use WARM_ENI_TARGET".into(),
            );
        }
        if pd {
            if warm_prefix == Some(0) && !ip_targets {
                r.problems.push(
                    "ENABLE_PREFIX_DELEGATION=true with WARM_PREFIX_TARGET=0 and no WARM_IP_TARGET/MINIMUM_IP_TARGET: the pool would never keep a prefix ready".into(),
                );
            }
        } else {
            if warm_eni == Some(0) && !ip_targets {
                r.problems.push(
                    "WARM_ENI_TARGET=0 with no WARM_IP_TARGET/MINIMUM_IP_TARGET: the pool would keep no address ready".into(),
                );
            }
            if warm_prefix.is_some() {
                r.problems.push(
                    "WARM_PREFIX_TARGET is set but ENABLE_PREFIX_DELEGATION is not true".into(),
                );
            }
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
                max_pods,
                min_interface_age: d.pool.min_interface_age,
            },
            cooldown: cooldown.map_or(d.cooldown, |s| Duration::from_secs(s.into())),
            add_wait: add_wait.map_or(d.add_wait, |s| Duration::from_secs(s.into())),
            external_snat,
            exclude_snat_cidrs: exclude,
            cluster_name: r.raw("CLUSTER_NAME").unwrap_or(d.cluster_name),
            reclaim_gone_netns,
            veth_prefix,
            leaked_gc_interval: leaked_gc
                .map_or(d.leaked_gc_interval, |s| Duration::from_secs(s.into())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pairs: &[(&'static str, &'static str)]) -> Result<Settings, ConfigError> {
        let m: HashMap<&str, &str> = pairs.iter().copied().collect();
        Settings::from_source(&m)
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
            ("MAX_ENI", "0"),
            ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "maybe"),
            ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.1.0.0/16,bogus"),
            ("IP_COOLDOWN_PERIOD", "-5"),
        ])
        .unwrap_err();
        assert_eq!(e.problems.len(), 5, "{e}");
        let text = e.to_string();
        for key in [
            "WARM_IP_TARGET",
            "MAX_ENI",
            "EXTERNALSNAT",
            "bogus",
            "IP_COOLDOWN_PERIOD",
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

    #[test]
    fn contradictory_targets_are_rejected() {
        assert!(read(&[("WARM_ENI_TARGET", "0")]).is_err());
        assert!(read(&[("WARM_IP_TARGET", "0"), ("MINIMUM_IP_TARGET", "0")]).is_err());
        assert!(
            read(&[("WARM_PREFIX_TARGET", "2")]).is_err(),
            "prefix target without delegation"
        );
        assert!(read(&[("WARM_ENI_TARGET", "0"), ("WARM_IP_TARGET", "3")]).is_ok());
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
