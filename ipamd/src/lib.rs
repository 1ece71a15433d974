//! ipamd: the per-node IP address manager of vpc-cni.

pub mod awsnode;
pub mod cniconf;
pub mod config;
pub mod datastore;
pub mod exit;
pub mod explain;
pub mod factory;
pub mod hostnet;
pub mod install;
pub mod introspect;
pub mod ipam;
pub mod journal;
pub mod k8s;
pub mod latency;
pub mod metrics;
pub mod migrate;
pub mod netns;
pub mod node;
pub mod ownership;
pub mod policy;
pub mod pool;
pub mod reconciler;
pub mod rpc;
pub mod startup;
pub mod statelock;
