//! aws-node's ENIConfig custom resource (`crd.k8s.amazonaws.com/v1alpha1`,
//! cluster-scoped) and how a node selects one, for custom networking
//! (AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=true).
//!
//! Objects written for aws-node work unchanged: the same group, version,
//! kind and the two fields aws-node reads (`spec.subnet`,
//! `spec.securityGroups`). The chart's CRD is generated from this type
//! (`charts/vpc-cni/crds/eniconfigs.yaml`; a test fails when the two
//! differ).

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a node's new interfaces go under custom networking.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "crd.k8s.amazonaws.com",
    version = "v1alpha1",
    kind = "ENIConfig",
    plural = "eniconfigs",
    singular = "eniconfig",
    doc = "Where a node's new network interfaces go under custom networking: a subnet of the node's availability zone and security groups (aws-node's ENIConfig)."
)]
#[serde(rename_all = "camelCase")]
pub struct ENIConfigSpec {
    /// The subnet new interfaces are created in (an EC2 subnet id in the
    /// node's availability zone).
    pub subnet: String,
    /// Security groups for new interfaces (EC2 ids); empty: the node's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
}

/// The name of the ENIConfig a node selects, in aws-node's order: the
/// value of its `annotation_def` annotation, else of its `label_def` label,
/// else `default`.
pub fn selected_name(
    annotations: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
    annotation_def: &str,
    label_def: &str,
) -> (String, String) {
    let pick = |m: &BTreeMap<String, String>, k: &str| {
        m.get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    if let Some(v) = pick(annotations, annotation_def) {
        return (v, format!("annotation {annotation_def}"));
    }
    if let Some(v) = pick(labels, label_def) {
        return (v, format!("label {label_def}"));
    }
    (
        "default".into(),
        "no annotation or label: the default".into(),
    )
}

/// Where new interfaces go by the ENIConfig `name` (selected by `by`),
/// given its `spec` as stored (any JSON: aws-node's CRD accepts anything),
/// or why they cannot go anywhere: it does not exist, or names no subnet.
pub fn target_from(
    name: String,
    by: &str,
    spec: Option<&serde_json::Value>,
) -> Result<crate::reconciler::InterfaceTarget, String> {
    let Some(spec) = spec else {
        return Err(format!(
            "ENIConfig {name:?} (selected by {by}) does not exist"
        ));
    };
    let subnet = spec["subnet"]
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            format!("ENIConfig {name:?} (selected by {by}) names no subnet (spec.subnet)")
        })?;
    let security_groups = spec["securityGroups"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|g| g.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    Ok(crate::reconciler::InterfaceTarget {
        subnet_id: subnet.to_string(),
        eni_config: name,
        security_groups,
    })
}

/// The CRD as the chart installs it (YAML).
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = ENIConfig::crd();
    format!(
        "# Generated from ipamd's ENIConfig type (ipamd/src/k8s/eniconfig.rs):\n# UPDATE_CRDS=1 cargo test -p ipamd --lib eniconfig rewrites it.\n{}",
        serde_yaml_ng::to_string(&crd).expect("the CRD serializes")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selection_follows_aws_nodes_order() {
        let key = crate::config::ENI_CONFIG_KEY;
        let zone = "topology.kubernetes.io/zone";
        let ann = m(&[(key, "from-annotation")]);
        let labels = m(&[(zone, "us-west-2a"), (key, "from-label")]);
        assert_eq!(selected_name(&ann, &labels, key, zone).0, "from-annotation");
        assert_eq!(selected_name(&m(&[]), &labels, key, zone).0, "us-west-2a");
        assert_eq!(selected_name(&m(&[]), &labels, key, key).0, "from-label");
        assert_eq!(selected_name(&m(&[]), &m(&[]), key, zone).0, "default");
        // An empty value selects nothing.
        assert_eq!(
            selected_name(&m(&[(key, " ")]), &m(&[]), key, zone).0,
            "default"
        );
    }

    #[test]
    fn objects_written_for_aws_node_parse() {
        let o: ENIConfig = serde_json::from_value(serde_json::json!({
            "apiVersion": "crd.k8s.amazonaws.com/v1alpha1",
            "kind": "ENIConfig",
            "metadata": {"name": "us-west-2a"},
            "spec": {"subnet": "subnet-0123", "securityGroups": ["sg-1", "sg-2"]},
        }))
        .unwrap();
        assert_eq!(o.spec.subnet, "subnet-0123");
        assert_eq!(o.spec.security_groups, ["sg-1", "sg-2"]);
    }

    /// The chart's CRD is this type's; `UPDATE_CRDS=1` rewrites it.
    #[test]
    fn the_charts_crd_is_generated_from_the_type() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/vpc-cni/crds/eniconfigs.yaml");
        let want = crd_yaml();
        if std::env::var_os("UPDATE_CRDS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is not what ipamd's ENIConfig type generates; run UPDATE_CRDS=1 cargo test -p ipamd --lib eniconfig",
            path.display()
        );
        // Cluster-scoped, as aws-node's.
        assert!(want.contains("scope: Cluster"), "{want}");
    }
}
