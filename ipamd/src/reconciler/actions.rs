//! Carrying out the policy's actions with the provider: grow, shrink,
//! create and delete interfaces, with what a nearly full subnet or an
//! ambiguous answer calls for.

use providers::{AssignRequest, Assigned, CreateInterface, ProviderError};
use tracing::{info, warn};

use super::{
    Reconciler, StepError, TAG_CLUSTER, TAG_CREATED, TAG_INSTANCE, TAG_OWNER, TAG_SUBNET_ROLE,
};
use crate::policy::Action;
use crate::pool::now_ms;
use providers::tags::OWNER_VALUE;

impl Reconciler {
    /// Carries out `action`; the addresses it made free in the pool (of
    /// what the cloud gave, which a nearly full subnet may make fewer
    /// than asked, or single addresses in place of prefixes; see
    /// [`crate::pool::Pool::add_addresses`]), 0 for a release or a delete.
    pub(super) async fn execute(&self, action: Action) -> Result<u32, StepError> {
        let added = match action {
            Action::AssignIps {
                interface_id,
                count,
            } => self.grow(&interface_id, AssignRequest::Ips(count)).await?,
            Action::AssignPrefixes {
                interface_id,
                count,
            } => {
                // A subnet marked full has no /28 to give: single
                // addresses at once, without a refused prefix request first.
                let now = tokio::time::Instant::now();
                let marked = self
                    .pool
                    .interface(&interface_id)
                    .map(|i| i.subnet_id)
                    .filter(|subnet| self.lock().marked_full(subnet, now));
                let result = if let Some(subnet) = marked {
                    Err(ProviderError::SubnetExhausted { subnet })
                } else {
                    self.grow(&interface_id, AssignRequest::Prefixes(count))
                        .await
                };
                match result {
                    // No free /28 (fragmented), or fewer than 16 addresses
                    // left: the single addresses it still has.
                    Err(
                        ProviderError::InsufficientCidrBlocks { subnet }
                        | ProviderError::SubnetExhausted { subnet },
                    ) => {
                        warn!(%subnet, "no free /28 left in the subnet; adding single addresses instead");
                        self.grow(&interface_id, AssignRequest::Ips(count)).await?
                    }
                    other => other?,
                }
            }
            Action::CreateInterface { initial } => self.create_interface(initial).await?,
            Action::ReleaseIps { interface_id, ips } => {
                self.shrink(
                    &interface_id,
                    Assigned {
                        ips,
                        prefixes: vec![],
                    },
                )
                .await?;
                0
            }
            Action::ReleasePrefixes {
                interface_id,
                prefixes,
            } => {
                self.shrink(
                    &interface_id,
                    Assigned {
                        ips: vec![],
                        prefixes,
                    },
                )
                .await?;
                0
            }
            Action::DeleteInterface { interface_id } => {
                self.delete_interface(&interface_id).await?;
                0
            }
        };
        Ok(added)
    }

    /// Assigns `req` to `interface_id`, fewer when the subnet is nearly
    /// full; the addresses it made free in the pool.
    async fn grow(&self, interface_id: &str, req: AssignRequest) -> Result<u32, ProviderError> {
        let mut req = req;
        let got = loop {
            match self.provider.assign(interface_id, req).await {
                Ok(got) => break got,
                // A nearly full subnet: ask for what it may still give.
                Err(e @ ProviderError::SubnetExhausted { .. }) => match fewer(req) {
                    Some(less) => {
                        warn!(interface = interface_id, error = %e, asked = ?req, now = ?less, "subnet nearly full; asking for fewer addresses");
                        req = less;
                    }
                    None => return Err(e),
                },
                Err(e) => {
                    // An Assign that timed out may have taken effect, and
                    // an interface the cloud finds fuller than the pool
                    // thinks holds addresses the pool missed: learn them
                    // before planning on this interface again.
                    if matches!(
                        e,
                        ProviderError::LimitExceeded(_)
                            | ProviderError::Timeout { .. }
                            | ProviderError::Server(_)
                            | ProviderError::Transport(_)
                    ) {
                        self.resync_soon();
                    }
                    return Err(e);
                }
            }
        };
        info!(
            interface = interface_id,
            ips = got.ips.len(),
            prefixes = got.prefixes.len(),
            "pool grew"
        );
        Ok(self.pool.add_addresses(interface_id, &got))
    }

    async fn shrink(&self, interface_id: &str, want: Assigned) -> Result<(), ProviderError> {
        let claimed = self.pool.claim_for_release(interface_id, &want);
        if claimed.ips.is_empty() && claimed.prefixes.is_empty() {
            return Ok(());
        }
        match self.provider.release(interface_id, &claimed).await {
            Ok(()) => {
                info!(
                    interface = interface_id,
                    ips = claimed.ips.len(),
                    prefixes = claimed.prefixes.len(),
                    "pool shrank"
                );
                self.pool.forget(interface_id, &claimed);
                Ok(())
            }
            // A 5xx, timeout or broken connection: the cloud may have taken
            // them back. Forget them: none is handed out while it may be
            // gone, and the next resync brings back those the cloud kept.
            Err(
                e @ (ProviderError::Server(_)
                | ProviderError::Timeout { .. }
                | ProviderError::Transport(_)),
            ) => {
                warn!(interface = interface_id, error = %e, ips = claimed.ips.len(), "release may or may not have happened; dropping the addresses until the next resync");
                self.pool.forget(interface_id, &claimed);
                self.resync_soon();
                Err(e)
            }
            Err(e) => {
                self.pool.unclaim(interface_id, &claimed);
                Err(e)
            }
        }
    }

    /// Subnets a new interface may go in: the node's own and same-zone ones
    /// tagged for the CNI, most free addresses first; a tag of "0" excludes.
    /// Also whether they come from a listing of the cloud's subnets.
    async fn candidate_subnets(
        &self,
        custom: Option<&super::InterfaceTarget>,
    ) -> (Vec<String>, bool) {
        if let Some(t) = custom {
            return (vec![t.subnet_id.clone()], false);
        }
        if !self.settings.subnet_discovery {
            return (vec![self.instance.subnet_id.clone()], false);
        }
        match self.provider.list_subnets().await {
            Ok(subnets) => {
                let mut c: Vec<_> = subnets
                    .into_iter()
                    .filter(|s| match s.tags.get(TAG_SUBNET_ROLE) {
                        Some(v) => v != "0",
                        None => s.id == self.instance.subnet_id,
                    })
                    .collect();
                c.sort_by(|a, b| {
                    b.free_addresses
                        .cmp(&a.free_addresses)
                        .then(a.id.cmp(&b.id))
                });
                (c.into_iter().map(|s| s.id).collect(), true)
            }
            Err(e) => {
                warn!(error = %e, "cannot list subnets; using the node's subnet");
                (vec![self.instance.subnet_id.clone()], false)
            }
        }
    }

    /// Creates and attaches an interface in the first subnet that has
    /// room; the addresses it made free in the pool.
    async fn create_interface(&self, initial: AssignRequest) -> Result<u32, ProviderError> {
        let mut tags = self.settings.additional_tags.clone();
        tags.insert(TAG_OWNER.to_string(), OWNER_VALUE.to_string());
        tags.insert(TAG_INSTANCE.to_string(), self.instance.id.clone());
        tags.insert(TAG_CLUSTER.to_string(), self.settings.cluster_name.clone());
        tags.insert(TAG_CREATED.to_string(), (now_ms() / 1000).to_string());
        let mut last = ProviderError::SubnetExhausted {
            subnet: self.instance.subnet_id.clone(),
        };
        // Custom networking: the ENIConfig's subnet and groups (no groups:
        // the node's, as aws-node does), read once for this create.
        let custom = match self.settings.custom_networking {
            true => Some(self.interface_target().ok_or_else(|| {
                ProviderError::Invalid(
                    "custom networking: no ENIConfig is known for this node".into(),
                )
            })?),
            false => None,
        };
        let security_groups = custom
            .as_ref()
            .map(|t| t.security_groups.clone())
            .unwrap_or_default();
        // A subnet that said it is full is not asked for a new interface
        // again until its mark lapses ([`super::SUBNET_LOW_FOR`]): asked
        // at every retry, it cost each waiting node four failed creates
        // (the halving below) per backoff, ~340 an hour, all billed to the
        // account's CreateNetworkInterface bucket.
        let now = tokio::time::Instant::now();
        let listed = custom.is_none() && self.settings.subnet_discovery;
        if listed {
            // The subnets listed last time all still marked full: not even
            // listed again (a DescribeSubnets per retry).
            let st = self.lock();
            if st.listed_subnets.iter().all(|s| st.marked_full(s, now)) {
                if let Some(subnet) = st.listed_subnets.first() {
                    return Err(ProviderError::SubnetExhausted {
                        subnet: subnet.clone(),
                    });
                }
            }
        }
        let (candidates, from_listing) = self.candidate_subnets(custom.as_ref()).await;
        if from_listing {
            self.lock().listed_subnets = candidates.clone();
        }
        let (open, marked): (Vec<String>, Vec<String>) = {
            let st = self.lock();
            candidates
                .into_iter()
                .partition(|s| !st.marked_full(s, now))
        };
        if let Some(subnet) = marked.into_iter().next() {
            last = ProviderError::SubnetExhausted { subnet };
        }
        for subnet_id in open {
            let mut spec = CreateInterface {
                subnet_id: subnet_id.clone(),
                // Empty: the node's groups, read by the provider as they
                // are now.
                security_groups: security_groups.clone(),
                tags: tags.clone(),
                initial,
            };
            let mut result = self.provider.create_interface(&spec).await;
            if let (
                Err(
                    ProviderError::InsufficientCidrBlocks { .. }
                    | ProviderError::SubnetExhausted { .. },
                ),
                AssignRequest::Prefixes(n),
            ) = (&result, initial)
            {
                warn!(subnet = %subnet_id, "no free /28 for a new interface; creating it with single addresses");
                spec.initial = AssignRequest::Ips(n);
                result = self.provider.create_interface(&spec).await;
            }
            // A nearly full subnet: ask for what it may still give.
            while let Err(ProviderError::SubnetExhausted { .. }) = &result {
                let Some(less) = fewer(spec.initial) else {
                    break;
                };
                warn!(subnet = %subnet_id, asked = ?spec.initial, now = ?less, "subnet nearly full; creating the interface with fewer addresses");
                spec.initial = less;
                result = self.provider.create_interface(&spec).await;
            }
            match result {
                Ok(iface) => {
                    info!(interface = %iface.id, device_index = iface.device_index, subnet = %subnet_id, "interface attached");
                    let id = iface.id.clone();
                    let held = self.node.hold(&id);
                    let added = self.pool.add_interface(iface, !held);
                    self.node_step().await;
                    return Ok(added);
                }
                Err(e @ ProviderError::SubnetExhausted { .. })
                | Err(e @ ProviderError::InsufficientCidrBlocks { .. }) => {
                    warn!(subnet = %subnet_id, error = %e, "subnet full, trying the next one");
                    // Each subnet that refused is marked, not only the
                    // last one tried (which the step's error marks).
                    if matches!(e, ProviderError::SubnetExhausted { .. }) {
                        self.lock()
                            .full_subnets
                            .insert(subnet_id.clone(), now + super::SUBNET_LOW_FOR);
                    }
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    async fn delete_interface(&self, interface_id: &str) -> Result<(), StepError> {
        let Some(durable) = self.pool.begin_delete(interface_id) else {
            return Ok(()); // taken into use since the plan
        };
        if let Err(e) = durable.wait().await {
            // Without the intent on disk a crash could leak the interface:
            // do not start.
            self.pool.abort_delete(interface_id);
            return Err(e.into());
        }
        Ok(self.finish_delete(interface_id).await?)
    }

    pub(super) async fn finish_delete(&self, interface_id: &str) -> Result<(), ProviderError> {
        if let Some(info) = self.pool.interface(interface_id) {
            if let Err(e) = self.node.side().teardown_interface(&info).await {
                warn!(interface = interface_id, error = %e, "could not remove the interface's rule");
            }
        }
        self.provider.detach_interface(interface_id).await?;
        self.provider.delete_interface(interface_id).await?;
        self.node.done(interface_id);
        if let Err(e) = self.pool.deleted(interface_id).wait().await {
            // The interface is gone; replaying the intent later finds it
            // gone and records the end then.
            warn!(interface = interface_id, error = %e, "could not journal the finished delete");
        }
        info!(interface = interface_id, "interface detached and deleted");
        Ok(())
    }
}

/// Half of a request for several single addresses (down to one), for a
/// subnet that cannot give them all; `None` when there is nothing smaller.
pub(super) fn fewer(req: AssignRequest) -> Option<AssignRequest> {
    match req {
        AssignRequest::Ips(n) if n > 1 => Some(AssignRequest::Ips(n / 2)),
        _ => None,
    }
}
