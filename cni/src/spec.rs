//! The CNI specification's types: environment, network configuration,
//! results in each supported version, and errors with the spec's codes.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipamd_api::names;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// 0.3.0 and 0.3.1 because Calico's and Cilium's chaining guides write
/// conflists at 0.3.1 with vpc-cni first.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Error codes from the CNI spec.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const CONTAINER_UNKNOWN: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADDs now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// Anything of the plugin's own.
    pub const PLUGIN: u32 = 999;
}

/// What an error says: the spec's `msg` and `details`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub msg: String,
    pub details: String,
}

impl Msg {
    pub fn new(msg: impl Into<String>, details: impl std::fmt::Display) -> Self {
        Self {
            msg: msg.into(),
            details: details.to_string(),
        }
    }
}

impl std::fmt::Display for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.details.is_empty() {
            write!(f, "{}", self.msg)
        } else {
            write!(f, "{}: {}", self.msg, self.details)
        }
    }
}

/// An error as the spec prints it on stdout. The variant says what went
/// wrong; [`CniError::code`] alone turns that into the spec's code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CniError {
    /// The configuration's `cniVersion` is not one this plugin speaks, or
    /// the command needs a newer one (STATUS and GC need 1.1.0).
    #[error("{0}")]
    IncompatibleVersion(Msg),
    /// A CNI_* variable is missing or malformed, or CNI_NETNS is not a
    /// pod's network namespace.
    #[error("{0}")]
    InvalidEnv(Msg),
    /// The plugin could not do its own I/O: read stdin, start its runtime,
    /// enter the pod's network namespace.
    #[error("{0}")]
    IoFailure(Msg),
    /// The network configuration is not JSON of the expected shape.
    #[error("{0}")]
    DecodingFailure(Msg),
    /// The network configuration (or what the command needs of it, such as
    /// prevResult or GC's list) is invalid; also ipamd's InvalidArgument.
    #[error("{0}")]
    InvalidConfig(Msg),
    /// ipamd cannot be reached or the call to it broke off.
    #[error("{0}")]
    IpamdUnreachable(Msg),
    /// ipamd answered that it cannot serve now (pool empty past its wait,
    /// draining, deadline): the runtime retries.
    #[error("{0}")]
    TryAgainLater(Msg),
    /// STATUS: the plugin cannot serve ADDs now.
    #[error("{0}")]
    NotAvailable(Msg),
    /// ipamd refused otherwise, answered something unusable, or does not
    /// hold what the pod was given.
    #[error("{0}")]
    Ipamd(Msg),
    /// Wiring, checking or removing the pod's network failed.
    #[error("{0}")]
    Datapath(Msg),
    /// A bug of the plugin's own (a command reached a path it should not).
    #[error("{0}")]
    Internal(Msg),
}

impl CniError {
    /// The spec's error code for this failure: the one place it is chosen.
    pub fn code(&self) -> u32 {
        match self {
            Self::IncompatibleVersion(_) => code::INCOMPATIBLE_VERSION,
            Self::InvalidEnv(_) => code::INVALID_ENV,
            Self::IoFailure(_) => code::IO_FAILURE,
            Self::DecodingFailure(_) => code::DECODE_FAILURE,
            Self::InvalidConfig(_) => code::INVALID_CONFIG,
            Self::IpamdUnreachable(_) | Self::TryAgainLater(_) => code::TRY_AGAIN_LATER,
            Self::NotAvailable(_) => code::NOT_AVAILABLE,
            Self::Ipamd(_) | Self::Datapath(_) | Self::Internal(_) => code::PLUGIN,
        }
    }

    fn text(&self) -> &Msg {
        match self {
            Self::IncompatibleVersion(m)
            | Self::InvalidEnv(m)
            | Self::IoFailure(m)
            | Self::DecodingFailure(m)
            | Self::InvalidConfig(m)
            | Self::IpamdUnreachable(m)
            | Self::TryAgainLater(m)
            | Self::NotAvailable(m)
            | Self::Ipamd(m)
            | Self::Datapath(m)
            | Self::Internal(m) => m,
        }
    }

    pub fn msg(&self) -> &str {
        &self.text().msg
    }

    pub fn details(&self) -> &str {
        &self.text().details
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "code": self.code(),
            "msg": self.msg(),
            "details": self.details(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            "VERSION" => Self::Version,
            other => {
                return Err(CniError::InvalidEnv(Msg::new(
                    "unknown CNI_COMMAND",
                    format!("{other:?}"),
                )))
            }
        })
    }
}

/// The runtime's CNI_* variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: HashMap<String, String>,
}

impl Env {
    /// Reads what `cmd` needs and checks it before anything is done with
    /// it: every missing or malformed variable is named at once (code 4).
    /// Names follow the spec and the kernel (see [`ipamd_api::names`]).
    pub fn load(cmd: Command, get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let mut missing = vec![];
        let mut need = |k: &str, required: bool| {
            let v = get(k).unwrap_or_default();
            if required && v.is_empty() {
                missing.push(k.to_string());
            }
            v
        };
        let per_container = matches!(cmd, Command::Add | Command::Del | Command::Check);
        let container_id = need("CNI_CONTAINERID", per_container);
        let netns = need("CNI_NETNS", matches!(cmd, Command::Add | Command::Check));
        let ifname = need("CNI_IFNAME", per_container);
        if !missing.is_empty() {
            return Err(CniError::InvalidEnv(Msg::new(
                "required environment variables are missing",
                missing.join(", "),
            )));
        }
        let mut bad = vec![];
        if !container_id.is_empty() {
            if let Err(e) = names::check_id("CNI_CONTAINERID", &container_id) {
                bad.push(e.to_string());
            }
        }
        if !ifname.is_empty() {
            if let Err(e) = names::check_ifname("CNI_IFNAME", &ifname) {
                bad.push(e.to_string());
            }
        }
        if !netns.is_empty() && !netns.starts_with('/') {
            bad.push(format!("CNI_NETNS {netns:?} is not an absolute path"));
        }
        if netns.len() > PATH_MAX {
            bad.push(format!("CNI_NETNS is longer than {PATH_MAX} bytes"));
        }
        let args: HashMap<String, String> = get("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // Kubernetes names stop at 253 bytes; ipamd journals these.
        for k in ["K8S_POD_NAMESPACE", "K8S_POD_NAME"] {
            if args.get(k).is_some_and(|v| v.len() > K8S_NAME_MAX) {
                bad.push(format!("CNI_ARGS {k} is longer than {K8S_NAME_MAX} bytes"));
            }
        }
        if !bad.is_empty() {
            return Err(CniError::InvalidEnv(Msg::new(
                "invalid CNI environment",
                bad.join("; "),
            )));
        }
        Ok(Self {
            container_id,
            netns,
            ifname,
            args,
        })
    }
}

/// The network configuration on stdin. Unknown keys are ignored, as the
/// spec asks of plugins.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(default)]
    pub ipamd_socket: Option<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub veth_prefix: Option<String>,
    /// TX and RX queues of each veth end. The kernel's default is one per
    /// possible CPU, which only XDP on the veth uses, and which makes every
    /// pod's veth dearer to create the bigger the node.
    #[serde(default)]
    pub veth_queues: Option<u32>,
    #[serde(default)]
    pub log_file: Option<String>,
    #[serde(default)]
    pub log_level: Option<String>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// GC: the runtime's complete list of attachments still valid (an
    /// empty list is a statement; an absent one is not).
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// The same list under the key an early text of CNI 1.1 used; read
    /// only when `cni.dev/valid-attachments` is absent.
    #[serde(rename = "cni.dev/attachments", default)]
    pub early_attachments: Option<Vec<ValidAttachment>>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// Longest `CNI_NETNS` path (Linux's PATH_MAX).
pub const PATH_MAX: usize = 4096;
/// Longest Kubernetes object name (a DNS subdomain, RFC 1123).
pub const K8S_NAME_MAX: usize = 253;

pub const DEFAULT_MTU: u32 = 9001;
pub const DEFAULT_VETH_PREFIX: &str = "eni";
pub const DEFAULT_VETH_QUEUES: u32 = 1;
pub const DEFAULT_LOG_FILE: &str = "/var/log/vpc-cni/plugin.log";

impl NetConf {
    /// Parses and checks the configuration, naming every bad field at once.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(bytes).map_err(|e| {
            CniError::DecodingFailure(Msg::new("cannot decode the network configuration", e))
        })?;
        if !SUPPORTED.contains(&conf.cni_version.as_str()) {
            return Err(CniError::IncompatibleVersion(Msg::new(
                "incompatible CNI version",
                format!(
                    "config asks for {}; this plugin supports {}",
                    conf.cni_version,
                    SUPPORTED.join(", ")
                ),
            )));
        }
        let mut bad = vec![];
        if let Err(e) = names::check_id("name", &conf.name) {
            bad.push(e.to_string());
        }
        if let Some(m) = conf.mtu {
            if !(576..=65535).contains(&m) {
                bad.push(format!("mtu {m} is outside 576..65535"));
            }
        }
        if let Some(p) = &conf.veth_prefix {
            if p.is_empty() || p.len() > 4 || !p.chars().all(|c| c.is_ascii_alphanumeric()) {
                bad.push(format!("vethPrefix {p:?} must be 1 to 4 letters or digits"));
            }
        }
        if let Some(q) = conf.veth_queues {
            if !(1..=4096).contains(&q) {
                bad.push(format!("vethQueues {q} is outside 1..4096"));
            }
        }
        if !bad.is_empty() {
            return Err(CniError::InvalidConfig(Msg::new(
                "invalid network configuration",
                bad.join("; "),
            )));
        }
        Ok(conf)
    }

    pub fn mtu(&self) -> u32 {
        self.mtu.unwrap_or(DEFAULT_MTU)
    }

    pub fn veth_queues(&self) -> u32 {
        self.veth_queues.unwrap_or(DEFAULT_VETH_QUEUES)
    }

    pub fn veth_prefix(&self) -> &str {
        self.veth_prefix.as_deref().unwrap_or(DEFAULT_VETH_PREFIX)
    }

    /// GC's list of valid attachments, if the runtime gave one.
    pub fn valid_list(&self) -> Option<&[ValidAttachment]> {
        self.valid_attachments
            .as_deref()
            .or(self.early_attachments.as_deref())
    }

    /// The pod's address in `prevResult`, for DEL when ipamd is down and
    /// for CHECK.
    pub fn prev_ipv4(&self) -> Option<Ipv4Addr> {
        let ips = self.prev_result.as_ref()?.get("ips")?.as_array()?;
        ips.iter()
            .filter_map(|i| i.get("address")?.as_str())
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .next()
    }
}

/// What ADD produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddResult {
    pub host_ifname: String,
    pub host_mac: String,
    pub pod_ifname: String,
    pub pod_mac: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
}

impl AddResult {
    /// The result in the version the configuration asked for.
    pub fn to_json(&self, version: &str) -> Value {
        let mut ip = json!({
            "address": format!("{}/32", self.ip),
            "gateway": self.gateway.to_string(),
            "interface": 1,
        });
        // Before 1.0.0 each IP names its family (spec 0.3.x and 0.4.0,
        // "IP Allocation": `version`).
        if matches!(version, "0.3.0" | "0.3.1" | "0.4.0") {
            ip["version"] = json!("4");
        }
        json!({
            "cniVersion": version,
            "interfaces": [
                {"name": self.host_ifname, "mac": self.host_mac},
                {"name": self.pod_ifname, "mac": self.pod_mac, "sandbox": self.netns},
            ],
            "ips": [ip],
            "routes": [{"dst": "0.0.0.0/0", "gw": self.gateway.to_string()}],
            "dns": {},
        })
    }
}

/// The name of the pod's veth peer in the host; shared with ipamd and kept
/// here under its old path.
pub use ipamd_api::datapath::host_veth_name;

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn missing_environment_is_listed_with_code_4() {
        let e = Env::load(Command::Add, env(&[("CNI_IFNAME", "eth0")])).unwrap_err();
        assert_eq!(e.code(), code::INVALID_ENV);
        assert!(
            e.details().contains("CNI_CONTAINERID") && e.details().contains("CNI_NETNS"),
            "{e}"
        );
        // DEL does not need a netns: the runtime may have removed it already.
        assert!(Env::load(
            Command::Del,
            env(&[("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0")])
        )
        .is_ok());
    }

    #[test]
    fn names_the_kernel_or_the_spec_refuse_are_code_4() {
        for ifname in ["eth:0", ".", "..", "eth\t0", "eth 0", "sixteen-bytes-xx"] {
            let e = Env::load(
                Command::Add,
                env(&[
                    ("CNI_CONTAINERID", "c"),
                    ("CNI_NETNS", "/var/run/netns/x"),
                    ("CNI_IFNAME", ifname),
                ]),
            )
            .unwrap_err();
            assert_eq!(e.code(), code::INVALID_ENV, "{ifname:?}: {e}");
            assert!(e.details().contains("CNI_IFNAME"), "{e}");
        }
        for id in ["-x", "a b", "a/b", "a:b", "x\u{e9}"] {
            for cmd in [Command::Add, Command::Del, Command::Check] {
                let e = Env::load(
                    cmd,
                    env(&[
                        ("CNI_CONTAINERID", id),
                        ("CNI_NETNS", "/var/run/netns/x"),
                        ("CNI_IFNAME", "eth0"),
                    ]),
                )
                .unwrap_err();
                assert_eq!(e.code(), code::INVALID_ENV, "{id:?}: {e}");
            }
        }
        // Every problem at once.
        let e = Env::load(
            Command::Add,
            env(&[
                ("CNI_CONTAINERID", "a b"),
                ("CNI_NETNS", "relative/ns"),
                ("CNI_IFNAME", "eth:0"),
            ]),
        )
        .unwrap_err();
        assert!(
            e.details().contains("CNI_CONTAINERID")
                && e.details().contains("CNI_IFNAME")
                && e.details().contains("CNI_NETNS"),
            "{e}"
        );
        // Sizes a runtime never sends, refused before they reach ipamd.
        let long = "a".repeat(300);
        let args = format!("K8S_POD_NAMESPACE={long};K8S_POD_NAME=p");
        for (k, v) in [
            ("CNI_CONTAINERID", long.as_str()),
            ("CNI_NETNS", &format!("/{}", "a".repeat(PATH_MAX))),
            ("CNI_ARGS", &args),
        ] {
            let mut vars = vec![
                ("CNI_CONTAINERID", "c"),
                ("CNI_NETNS", "/var/run/netns/x"),
                ("CNI_IFNAME", "eth0"),
            ];
            vars.retain(|(n, _)| *n != k);
            vars.push((k, v));
            let e = Env::load(Command::Add, env(&vars)).unwrap_err();
            assert_eq!(e.code(), code::INVALID_ENV, "{k}: {e}");
        }
        // A network name outside the spec's pattern is configuration: 7.
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"my net"}"#).unwrap_err();
        assert_eq!(e.code(), code::INVALID_CONFIG, "{e}");
    }

    #[test]
    fn gc_lists_are_read_from_either_key_and_absence_is_kept() {
        let none = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n"}"#).unwrap();
        assert_eq!(none.valid_list(), None);
        let empty =
            NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[]}"#)
                .unwrap();
        assert_eq!(empty.valid_list().map(<[_]>::len), Some(0));
        let early = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","cni.dev/attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(early.valid_list().map(<[_]>::len), Some(1));
    }

    #[test]
    fn cni_args_are_split() {
        let e = Env::load(
            Command::Add,
            env(&[
                ("CNI_CONTAINERID", "c"),
                ("CNI_NETNS", "/var/run/netns/x"),
                ("CNI_IFNAME", "eth0"),
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(e.args["K8S_POD_NAME"], "web-0");
    }

    #[test]
    fn config_errors() {
        assert_eq!(
            NetConf::parse(b"{not json").unwrap_err().code(),
            code::DECODE_FAILURE
        );
        let e = NetConf::parse(br#"{"cniVersion":"0.2.0","name":"n"}"#).unwrap_err();
        assert_eq!(e.code(), code::INCOMPATIBLE_VERSION);
        for v in ["0.3.0", "0.3.1"] {
            let c =
                NetConf::parse(format!(r#"{{"cniVersion":"{v}","name":"n"}}"#).as_bytes()).unwrap();
            assert_eq!(c.cni_version, v);
        }
        let e = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"","mtu":10,"vethPrefix":"toolong","vethQueues":0}"#,
        )
        .unwrap_err();
        assert_eq!(e.code(), code::INVALID_CONFIG);
        assert!(
            e.details().contains("name")
                && e.details().contains("mtu")
                && e.details().contains("vethPrefix")
                && e.details().contains("vethQueues"),
            "{e}"
        );
        let ok = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","vethQueues":8}"#).unwrap();
        assert_eq!(ok.veth_queues(), 8);
        let default = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n"}"#).unwrap();
        assert_eq!(default.veth_queues(), DEFAULT_VETH_QUEUES);
    }

    #[test]
    fn results_in_each_version() {
        let r = AddResult {
            host_ifname: "eni0123".into(),
            host_mac: "02:00:00:00:00:01".into(),
            pod_ifname: "eth0".into(),
            pod_mac: "02:00:00:00:00:02".into(),
            netns: "/var/run/netns/p".into(),
            ip: "10.0.0.5".parse().unwrap(),
            gateway: "169.254.1.1".parse().unwrap(),
        };
        let v1 = r.to_json("1.1.0");
        assert_eq!(v1["ips"][0]["address"], "10.0.0.5/32");
        assert!(v1["ips"][0].get("version").is_none());
        assert_eq!(v1["interfaces"][1]["sandbox"], "/var/run/netns/p");
        let v04 = r.to_json("0.4.0");
        assert_eq!(v04["ips"][0]["version"], "4");
        assert_eq!(v04["cniVersion"], "0.4.0");
        // 0.3.x: the same shape as 0.4.0, per-IP `version` included.
        for v in ["0.3.0", "0.3.1"] {
            let old = r.to_json(v);
            assert_eq!(old["cniVersion"], v);
            assert_eq!(old["ips"][0]["version"], "4");
            assert_eq!(old["ips"][0]["interface"], 1);
            assert_eq!(old["ips"][0]["address"], "10.0.0.5/32");
        }
        let conf = NetConf::parse(
            serde_json::to_vec(&json!({"cniVersion": "1.0.0", "name": "n", "prevResult": v1}))
                .unwrap()
                .as_slice(),
        )
        .unwrap();
        assert_eq!(conf.prev_ipv4(), Some("10.0.0.5".parse().unwrap()));
    }

    type Make = fn(Msg) -> CniError;

    /// Every variant and the code the spec (and earlier releases of this
    /// plugin, for the same situation) gives it.
    const CODES: &[(Make, u32)] = &[
        (CniError::IncompatibleVersion, 1),
        (CniError::InvalidEnv, 4),
        (CniError::IoFailure, 5),
        (CniError::DecodingFailure, 6),
        (CniError::InvalidConfig, 7),
        (CniError::IpamdUnreachable, 11),
        (CniError::TryAgainLater, 11),
        (CniError::NotAvailable, 50),
        (CniError::Ipamd, 999),
        (CniError::Datapath, 999),
        (CniError::Internal, 999),
    ];

    #[test]
    fn every_error_has_its_spec_code() {
        for (i, (make, want)) in CODES.iter().enumerate() {
            let e = make(Msg::new("m", "d"));
            assert_eq!(e.code(), *want, "{e:?}");
            assert_eq!(e.to_json("1.1.0")["code"], *want, "{e:?}");
            // The table names every variant once, in this order: the match
            // has no wildcard, so a new variant does not compile without a
            // row number, and its row must then be in CODES.
            let row = match e {
                CniError::IncompatibleVersion(_) => 0,
                CniError::InvalidEnv(_) => 1,
                CniError::IoFailure(_) => 2,
                CniError::DecodingFailure(_) => 3,
                CniError::InvalidConfig(_) => 4,
                CniError::IpamdUnreachable(_) => 5,
                CniError::TryAgainLater(_) => 6,
                CniError::NotAvailable(_) => 7,
                CniError::Ipamd(_) => 8,
                CniError::Datapath(_) => 9,
                CniError::Internal(_) => 10,
            };
            assert_eq!(row, i, "{e:?}");
        }
        assert_eq!(CODES.len(), 11, "a variant is missing from CODES");
    }

    #[test]
    fn error_json_and_text_are_unchanged() {
        // As the struct-based error printed them.
        let e = CniError::InvalidConfig(Msg::new("m \"x\"", "d"));
        assert_eq!(
            e.to_json("1.0.0").to_string(),
            r#"{"cniVersion":"1.0.0","code":7,"details":"d","msg":"m \"x\""}"#
        );
        assert_eq!(e.to_string(), "m \"x\": d");
        let e = CniError::Datapath(Msg::new("m", ""));
        assert_eq!(
            e.to_json("0.4.0").to_string(),
            r#"{"cniVersion":"0.4.0","code":999,"details":"","msg":"m"}"#
        );
        assert_eq!(e.to_string(), "m");
        assert_eq!((e.msg(), e.details()), ("m", ""));
    }
}
