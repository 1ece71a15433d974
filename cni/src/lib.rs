//! vpc-cni: the CNI plugin. Asks ipamd for an address, wires the pod with
//! rtnetlink, and answers in the CNI spec's terms.

#![forbid(unsafe_code)]

pub mod datapath;
pub mod netns;
pub mod nlsync;
pub mod plugin;
pub mod spec;
