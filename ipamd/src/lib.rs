//! ipamd: the per-node IP address manager of vpc-cni.

pub mod policy;
