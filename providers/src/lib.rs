//! The `CloudProvider` trait: the only door from ipamd to a cloud.
//!
//! Everything here speaks in the project's own types. An implementation turns
//! them into SDK calls (aws, azure; the simulated VPC lives in the `vpc-sim`
//! crate), and sends each call through the shared [`layer::CallLayer`]
//! (client-side buckets, retries, per-API figures).

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "azure")]
pub mod azure;
pub mod bucket;
pub mod error;
pub mod jitter;
pub mod layer;
pub mod limits;
pub mod types;

pub use error::{ProviderError, Result};
pub use types::*;

use async_trait::async_trait;

/// A cloud as seen from one node (one instance).
///
/// Object safe, so ipamd holds an `Arc<dyn CloudProvider>` chosen at start by
/// its provider factory (a cloud implementation, or the simulated VPC).
#[async_trait]
pub trait CloudProvider: Send + Sync + 'static {
    /// Short name for logs and metrics ("sim", "aws", "azure").
    fn name(&self) -> &'static str;

    /// What this cloud can do (hot-attach, prefixes).
    fn capabilities(&self) -> Capabilities;

    /// The instance this node runs on, with its limits and VPC CIDRs.
    async fn describe_instance(&self) -> Result<Instance>;

    /// Interfaces attached to this instance, with their addresses.
    async fn describe_interfaces(&self) -> Result<Vec<Interface>>;

    /// Adds `count` secondary IPs, or `count` /28 prefixes, to an attached interface.
    /// Returns what was actually assigned (a cloud may assign fewer).
    async fn assign(&self, interface_id: &str, request: AssignRequest) -> Result<Assigned>;

    /// Removes secondary IPs and prefixes from an interface.
    async fn release(&self, interface_id: &str, release: &Assigned) -> Result<()>;

    /// Creates an interface in `spec.subnet_id` and attaches it to this
    /// instance at a free device index.
    async fn create_interface(&self, spec: &CreateInterface) -> Result<Interface>;

    /// Detaches an interface from this instance. Already detached is success.
    async fn detach_interface(&self, interface_id: &str) -> Result<()>;

    /// Deletes a detached interface. Unknown interface is success.
    async fn delete_interface(&self, interface_id: &str) -> Result<()>;

    /// Subnets of this instance's VPC usable for new interfaces, in the
    /// instance's zone.
    async fn list_subnets(&self) -> Result<Vec<Subnet>>;

    /// Deletes interfaces of ours that are attached to nothing and older
    /// than `min_age` (a create whose attach never happened, an ipamd that
    /// died between detach and delete on a node that is gone). Returns the
    /// ones deleted.
    async fn collect_leaked(&self, _min_age: std::time::Duration) -> Result<Vec<String>> {
        Ok(vec![])
    }

    /// Makes an attached interface go with the instance (EC2's
    /// DeleteOnTermination), for one whose create was cut short after its
    /// attach. Clouds without the flag have nothing to do.
    async fn ensure_delete_on_termination(&self, _interface_id: &str) -> Result<()> {
        Ok(())
    }

    /// The instance's limits as the provider knows them now, when they can
    /// change while ipamd runs (e.g. lowered to a cap the cloud taught by
    /// refusing an attach); `None`: those [`CloudProvider::describe_instance`]
    /// gave at start stand. Cheap: no cloud call.
    fn current_limits(&self) -> Option<Limits> {
        None
    }

    /// What keeps this provider from growing the pool at all right now
    /// (e.g. the node's security groups are unknown, so no interface may
    /// be created), for readiness; `None` when nothing does.
    fn blocker(&self) -> Option<String> {
        None
    }

    /// `nodes` share the cloud account's (or subscription's) request
    /// budget with this one, the cluster's node count: the client-side
    /// buckets take their share of it (see [`bucket::Buckets`]). A
    /// provider without client-side buckets ignores it.
    fn set_account_peers(&self, _nodes: u32) {}

    /// `nodes` of the cluster's nodes grow their pools now (`None`: not
    /// known): the client-side buckets of the calls that grow a pool take
    /// their share of those instead of every node (see
    /// [`bucket::Buckets::set_growers`]). A provider without client-side
    /// buckets, or whose grow calls share a bucket with other writes
    /// (ARM's one write bucket), ignores it.
    fn set_account_growers(&self, _nodes: Option<u32>) {}

    /// How long to put off `change`, which no ADD waits for, or `None` to
    /// make it now: until its client-side bucket has a token (rather than
    /// waiting for one inside the call, holding up a change an ADD does
    /// wait for), and, when the node's share of the account is under one
    /// call and the bucket has sat full, to a random point of one refill
    /// period, so that the nodes of an account idle alike do not all make
    /// theirs at once (see [`bucket::Buckets::put_off`]). Cheap: no cloud
    /// call. A provider without client-side buckets: `None`.
    fn put_off(&self, _change: Change) -> Option<std::time::Duration> {
        None
    }

    /// Per-API call figures (calls, errors, throttles, latency), keyed by
    /// the cloud's API name (e.g. `AssignPrivateIpAddresses`); empty for a
    /// provider that keeps none.
    fn api_figures(&self) -> std::collections::BTreeMap<String, layer::ApiStats> {
        Default::default()
    }

    /// [`CloudProvider::api_figures`] as JSON, for introspection.
    fn api_stats(&self) -> serde_json::Value {
        serde_json::to_value(self.api_figures()).unwrap_or_default()
    }
}
