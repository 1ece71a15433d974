//! Moving a node from aws-node (the AWS VPC CNI) to vpc-cni without
//! restarting its pods.
//!
//! On ipamd's first start on a node (no journal in its state directory yet)
//! it reads aws-node's checkpoint (`/var/run/aws-node/ipam.json`, format
//! `vpc-cni-ipam/1`, written by aws-node's ipamd datastore) and writes its
//! allocations as ipamd's journal, before the journal is replayed: the pool
//! is then restored from it like after any restart, so every running pod
//! keeps its address (an address the cloud's answer lacks is held
//! unconfirmed, never handed to another pod).
//!
//! The pods' host routes and rules are aws-node's shape and ours (`to <pod>
//! lookup main` at 512, `from <pod> lookup <device index + 1>` at 1536, see
//! `ipamd_api::datapath`): ipamd leaves them as they are, and vpc-cni's DEL
//! removes them by address. aws-node's interfaces (tagged
//! `node.k8s.amazonaws.com/instance_id`) are managed as ipamd's own (see
//! [`crate::ownership`]).
//!
//! A checkpoint that cannot be read in full stops ipamd (exit 69): starting
//! without it would hand running pods' addresses to new pods.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tracing::info;

use crate::datastore::{PodKey, PodName};
use crate::journal::{Journal, JournalError, Replayed};

/// Where aws-node keeps its checkpoint (its `ipam.json` on the host).
pub const DEFAULT_CHECKPOINT: &str = "/var/run/aws-node/ipam.json";

/// The only checkpoint format read (aws-node's `CheckpointFormatVersion`).
pub const CHECKPOINT_VERSION: &str = "vpc-cni-ipam/1";

/// Largest checkpoint read: far above any node's (a few hundred pods, a
/// few hundred bytes each), far below what would stall the start.
pub const MAX_CHECKPOINT_BYTES: u64 = 4 << 20;

/// Most allocations imported: more than any instance type has addresses
/// for pods (aws-node's largest max-pods is 737; prefix delegation stays
/// within a few thousand). Replaying the journal costs the square of this.
pub const MAX_ALLOCATIONS: usize = 16_384;

#[derive(Debug, Deserialize)]
struct Checkpoint {
    #[serde(default)]
    version: String,
    #[serde(default)]
    allocations: Vec<Allocation>,
}

#[derive(Debug, Deserialize)]
struct Allocation {
    #[serde(rename = "containerID", default)]
    container_id: String,
    #[serde(rename = "ifName", default)]
    if_name: String,
    #[serde(default)]
    ipv4: String,
    #[serde(default)]
    ipv6: String,
    #[serde(default)]
    metadata: Metadata,
}

#[derive(Debug, Default, Deserialize)]
struct Metadata {
    #[serde(rename = "k8sPodNamespace", default)]
    namespace: String,
    #[serde(rename = "k8sPodName", default)]
    name: String,
}

/// Why aws-node's checkpoint could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read aws-node's checkpoint {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Every problem found, one per line.
    #[error("aws-node's checkpoint {path} cannot be imported (its pods' addresses would be handed out again):\n  {}\nfix it, or move it away if no pod on this node uses those addresses any more", .problems.join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("writing the imported state: {0}")]
    Journal(#[from] JournalError),
}

/// What an import brought in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub assignments: usize,
    pub with_pod_names: usize,
}

/// Parses a checkpoint: its assignments keyed under `network` (the `name`
/// of vpc-cni's conflist, under which the runtime's DEL for these pods
/// will arrive), and their pods' names.
///
/// # Errors
/// [`ImportError::Invalid`] listing every problem: another format version,
/// an allocation without a usable container id, ifname or IPv4 address, an
/// IPv6 allocation (vpc-cni has no IPv6), an address or attachment twice.
pub fn parse(path: &Path, text: &str, network: &str) -> Result<Replayed, ImportError> {
    let invalid = |problems| ImportError::Invalid {
        path: path.to_path_buf(),
        problems,
    };
    let cp: Checkpoint =
        serde_json::from_str(text).map_err(|e| invalid(vec![format!("not JSON: {e}")]))?;
    let mut problems = vec![];
    if cp.allocations.len() > MAX_ALLOCATIONS {
        return Err(invalid(vec![format!(
            "{} allocations, more than any node holds ({MAX_ALLOCATIONS} at most)",
            cp.allocations.len()
        )]));
    }
    if cp.version != CHECKPOINT_VERSION {
        problems.push(format!(
            "version {:?}: only {CHECKPOINT_VERSION:?} is read",
            cp.version
        ));
    }
    let mut out = Replayed::default();
    let mut seen: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for (n, a) in cp.allocations.iter().enumerate() {
        let at = format!("allocation {n} ({})", a.container_id);
        for bad in ipamd_api::names::check_attachment(network, &a.container_id, &a.if_name) {
            problems.push(format!("{at}: {bad}"));
        }
        let ip = match (a.ipv4.as_str(), a.ipv6.as_str()) {
            ("", "") => {
                problems.push(format!("{at}: no address"));
                continue;
            }
            ("", _) => {
                problems.push(format!(
                    "{at}: IPv6 address {}: vpc-cni has no IPv6",
                    a.ipv6
                ));
                continue;
            }
            (v4, _) => match v4.parse::<Ipv4Addr>() {
                Ok(ip)
                    if ip.is_unspecified()
                        || ip.is_broadcast()
                        || ip.is_loopback()
                        || ip.is_multicast()
                        || ip.is_link_local() =>
                {
                    problems.push(format!("{at}: {ip} is no pod's address"));
                    continue;
                }
                Ok(ip) => ip,
                Err(e) => {
                    problems.push(format!("{at}: ipv4 {v4:?}: {e}"));
                    continue;
                }
            },
        };
        if !seen.insert(ip) {
            problems.push(format!("{at}: {ip} is allocated twice"));
            continue;
        }
        let key = PodKey {
            network: network.to_string(),
            container_id: a.container_id.clone(),
            ifname: a.if_name.clone(),
        };
        if out.assignments.insert(key.clone(), ip).is_some() {
            problems.push(format!("{at}: the attachment is allocated twice"));
            continue;
        }
        let m = &a.metadata;
        let named = ipamd_api::names::check_k8s_name("namespace", &m.namespace).is_ok()
            && ipamd_api::names::check_k8s_name("name", &m.name).is_ok();
        if named {
            out.pods.insert(
                key,
                PodName {
                    namespace: m.namespace.clone(),
                    name: m.name.clone(),
                },
            );
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(invalid(problems))
    }
}

/// On a first start (no file at `journal`) with a checkpoint at
/// `checkpoint`, writes the checkpoint's allocations as the journal and
/// says what it imported; otherwise does nothing (`None`). The checkpoint
/// is left as it is (aws-node's, for a roll-back).
///
/// # Errors
/// See [`ImportError`]; nothing is written then.
pub fn import_on_first_start(
    checkpoint: &Path,
    journal: &Path,
    network: &str,
) -> Result<Option<Imported>, ImportError> {
    if journal.exists() {
        return Ok(None);
    }
    let read_err = |source| ImportError::Read {
        path: checkpoint.to_path_buf(),
        source,
    };
    // A FIFO or a device would block the start (and SIGTERM with it).
    match std::fs::metadata(checkpoint) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
        Ok(m) if !m.is_file() => {
            return Err(read_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            )))
        }
        Ok(m) if m.len() > MAX_CHECKPOINT_BYTES => {
            return Err(read_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} bytes, more than any node's checkpoint ({MAX_CHECKPOINT_BYTES} at most)",
                    m.len()
                ),
            )))
        }
        Ok(_) => {}
    }
    let text = std::fs::read_to_string(checkpoint).map_err(read_err)?;
    let state = parse(checkpoint, &text, network)?;
    let imported = Imported {
        assignments: state.assignments.len(),
        with_pod_names: state.pods.len(),
    };
    // Written whole (temporary file, rename) before anything replays it.
    drop(Journal::open(journal, state.to_records())?);
    info!(
        checkpoint = %checkpoint.display(),
        assignments = imported.assignments,
        "imported aws-node's allocations: their pods keep their addresses"
    );
    Ok(Some(imported))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
      "version": "vpc-cni-ipam/1",
      "allocations": [
        {"networkName": "aws-cni", "containerID": "c1", "ifName": "eth0", "sandbox": "/var/run/netns/cni-1",
         "ipv4": "10.0.1.5", "allocationTimestamp": 1732800000,
         "metadata": {"k8sPodNamespace": "shop", "k8sPodName": "web-0", "interfaceName": "eth0"}},
        {"networkName": "aws-cni", "containerID": "c2", "ifName": "eth0", "ipv4": "10.0.1.6",
         "metadata": {}}
      ],
      "somethingNew": true
    }"#;

    #[test]
    fn a_checkpoint_becomes_assignments_under_our_network_name() {
        let r = parse(Path::new("ipam.json"), GOOD, "vpc-cni").unwrap();
        let key = |c: &str| PodKey {
            network: "vpc-cni".into(),
            container_id: c.into(),
            ifname: "eth0".into(),
        };
        assert_eq!(r.assignments.len(), 2);
        assert_eq!(
            r.assignments[&key("c1")],
            "10.0.1.5".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(r.pods[&key("c1")].to_string(), "shop/web-0");
        assert!(!r.pods.contains_key(&key("c2")), "no metadata, no name");
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let bad = r#"{"version": "vpc-cni-ipam/2", "allocations": [
          {"containerID": "c1", "ifName": "eth0", "ipv4": "10.0.1.5"},
          {"containerID": "c2", "ifName": "eth0", "ipv4": "10.0.1.5"},
          {"containerID": "c3", "ifName": "eth0", "ipv6": "2001:db8::5"},
          {"containerID": "c4", "ifName": "eth0", "ipv4": "10.0.1.300"},
          {"containerID": "", "ifName": "eth0", "ipv4": "10.0.1.9"},
          {"containerID": "c1", "ifName": "eth0", "ipv4": "10.0.1.10"},
          {"containerID": "c7", "ifName": "eth0", "ipv4": "0.0.0.0"}
        ]}"#;
        let e = parse(Path::new("/var/run/aws-node/ipam.json"), bad, "vpc-cni").unwrap_err();
        let ImportError::Invalid { problems, .. } = &e else {
            panic!("{e}")
        };
        let all = problems.join("\n");
        for want in [
            "version \"vpc-cni-ipam/2\"",
            "10.0.1.5 is allocated twice",
            "vpc-cni has no IPv6",
            "ipv4 \"10.0.1.300\"",
            "container id \"\" is empty",
            "allocation 5 (c1): the attachment is allocated twice",
            "0.0.0.0 is no pod's address",
        ] {
            assert!(all.contains(want), "{want} missing from:\n{all}");
        }
        assert_eq!(problems.len(), 7, "{all}");
        assert!(e.to_string().contains("move it away if no pod"));
        let e = parse(Path::new("x"), "{", "vpc-cni").unwrap_err();
        assert!(e.to_string().contains("not JSON"), "{e}");
    }

    #[test]
    fn only_a_first_start_imports() {
        let dir = tempfile::tempdir().unwrap();
        let cp = dir.path().join("ipam.json");
        let journal = dir.path().join("state/ipamd.journal");
        // No checkpoint: nothing to do.
        assert_eq!(
            import_on_first_start(&cp, &journal, "vpc-cni").unwrap(),
            None
        );
        assert!(!journal.exists());
        std::fs::write(&cp, GOOD).unwrap();
        let got = import_on_first_start(&cp, &journal, "vpc-cni")
            .unwrap()
            .unwrap();
        assert_eq!(
            got,
            Imported {
                assignments: 2,
                with_pod_names: 1
            }
        );
        let r = crate::journal::replay(&journal).unwrap();
        assert_eq!(r.assignments.len(), 2);
        assert_eq!(r.pods.len(), 1);
        assert!(cp.exists(), "aws-node's checkpoint is left for a roll-back");
        // A journal exists now: a restart does not import again.
        std::fs::write(&cp, "not even JSON").unwrap();
        assert_eq!(
            import_on_first_start(&cp, &journal, "vpc-cni").unwrap(),
            None
        );
        // A bad checkpoint on a first start writes nothing.
        std::fs::remove_file(&journal).unwrap();
        assert!(import_on_first_start(&cp, &journal, "vpc-cni").is_err());
        assert!(!journal.exists());
        // Neither does a directory, nor a file too big to be one.
        let not_a_file = dir.path().join("a-dir");
        std::fs::create_dir(&not_a_file).unwrap();
        let e = import_on_first_start(&not_a_file, &journal, "vpc-cni").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let big = dir.path().join("big.json");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_CHECKPOINT_BYTES + 1)
            .unwrap();
        let e = import_on_first_start(&big, &journal, "vpc-cni").unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        assert!(!journal.exists());
        let many: Vec<String> = (0..=MAX_ALLOCATIONS)
            .map(|n| {
                format!(
                    r#"{{"containerID":"c{n}","ifName":"eth0","ipv4":"10.{}.{}.{}"}}"#,
                    n >> 16,
                    (n >> 8) & 255,
                    n & 255
                )
            })
            .collect();
        let text = format!(
            r#"{{"version":"vpc-cni-ipam/1","allocations":[{}]}}"#,
            many.join(",")
        );
        let e = parse(&cp, &text, "vpc-cni").unwrap_err();
        assert!(
            e.to_string()
                .contains("allocations, more than any node holds"),
            "{e}"
        );
    }
}
