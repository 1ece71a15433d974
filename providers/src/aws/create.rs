//! Creating an interface: room for it, Attach, DeleteOnTermination, and the
//! rollback when a step fails (never a half-made interface left behind).

use super::*;

impl AwsProvider {
    /// Err unless one more interface fits on the default network card.
    /// Interfaces on other cards (EFA on p5, for example) have their own
    /// limits and do not count.
    pub(super) fn room_for_one(&self, attached: &[NetworkInterface]) -> Result<()> {
        let on_card0 = attached.iter().filter(|n| card_of(n) == 0).count() as u32;
        let max = self.effective_limits().max_interfaces;
        if on_card0 >= max {
            // Enforced here: an emulator may allow more than EC2 does.
            return Err(ProviderError::LimitExceeded(format!(
                "instance {} ({}) already has {on_card0} of {max} network interfaces on its default network card",
                self.id.instance_id, self.id.instance_type,
            )));
        }
        Ok(())
    }

    /// AttachNetworkInterface on the default network card at its lowest
    /// free device index among `attached` (the instance's interfaces as
    /// described just before the create, which checked there is room).
    /// Returns the index and the attachment id.
    pub(super) async fn attach(
        &self,
        eni: &str,
        attached: &[NetworkInterface],
    ) -> Result<(u32, Option<String>)> {
        // Device indexes are numbered per network card.
        let used: Vec<u32> = attached
            .iter()
            .filter(|n| card_of(n) == 0)
            .map(|n| {
                if n.network_interface_id() == Some(self.id.primary_interface_id.as_str()) {
                    return 0;
                }
                n.attachment()
                    .and_then(|a| a.device_index())
                    .map_or(u32::MAX, |i| i as u32)
            })
            .collect();
        let index = (1..).find(|i| !used.contains(i)).expect("a free index");
        let inst = self.id.instance_id.clone();
        let out = self
            .call("AttachNetworkInterface", || {
                self.ec2
                    .attach_network_interface()
                    .network_interface_id(eni)
                    .instance_id(inst.as_str())
                    .device_index(index as i32)
                    .send()
            })
            .await;
        match out {
            Ok(o) => Ok((index, o.attachment_id().map(String::from))),
            Err(e @ ProviderError::LimitExceeded(_)) => {
                // EC2 knows better than our figures: never try above this again.
                let now = attached.iter().filter(|n| card_of(n) == 0).count() as u32;
                self.learned_max_interfaces
                    .fetch_min(now.max(1), Ordering::Relaxed);
                *self.learned_at.lock().expect("lock") = Some(std::time::Instant::now());
                warn!(interfaces = now, error = %e, "EC2 refused one more interface; lowering the interface limit to what is attached");
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// ModifyNetworkInterfaceAttribute DeleteOnTermination=true, so the
    /// interface goes with the instance. Transient errors are retried by
    /// `call`; whatever remains is the caller's to act on.
    pub(super) async fn set_delete_on_termination(
        &self,
        eni: &str,
        attachment: Option<String>,
    ) -> Result<()> {
        let att = match attachment {
            Some(a) => a,
            // An answer without the attachment id: read it back.
            None => self
                .interface(eni)
                .await?
                .attachment()
                .and_then(|a| a.attachment_id())
                .map(String::from)
                .ok_or_else(|| {
                    ProviderError::Server(format!(
                        "{eni} shows no attachment after AttachNetworkInterface"
                    ))
                })?,
        };
        self.call("ModifyNetworkInterfaceAttribute", || {
            self.ec2
                .modify_network_interface_attribute()
                .network_interface_id(eni)
                .attachment(
                    NetworkInterfaceAttachmentChanges::builder()
                        .attachment_id(att.as_str())
                        .delete_on_termination(true)
                        .build(),
                )
                .send()
        })
        .await
        .map(drop)
    }

    /// Undoes a create whose `step` failed with `cause`: detaches (waiting
    /// as `detach_interface` does; nothing to do if it never attached) and
    /// deletes the interface. Returns the error to report, of `cause`'s
    /// kind, naming the step, the cause and how the rollback went. If the
    /// rollback fails, the interface carries our tags, so leaked-interface GC
    /// deletes it once it is detached.
    pub(super) async fn roll_back(
        &self,
        eni: &str,
        step: &str,
        cause: ProviderError,
    ) -> ProviderError {
        let undone = match self.detach_interface(eni).await {
            Ok(()) => self.delete_interface(eni).await,
            Err(e) => Err(e),
        };
        let outcome = match &undone {
            Ok(()) => "the interface was detached and deleted".to_string(),
            Err(d) => {
                warn!(interface = eni, error = %d, "could not roll back a half-created interface");
                format!("rolling the interface back failed too: {d}")
            }
        };
        warn!(interface = eni, step, error = %cause, "creating an interface failed; rolled back");
        with_context(cause, |m| {
            format!("creating interface {eni}: {step} failed: {m}; {outcome}")
        })
    }
}
