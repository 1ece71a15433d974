//! Who the node is: its identity from IMDSv2, its instance type's limits,
//! and its security groups (those of the primary interface).

use super::*;

/// The instance's identity, read once from IMDS.
#[derive(Debug, Clone)]
pub(super) struct Identity {
    pub(super) instance_id: String,
    pub(super) instance_type: String,
    pub(super) zone: String,
    pub(super) primary_interface_id: String,
    pub(super) primary_ip: Ipv4Addr,
    pub(super) subnet_id: String,
    pub(super) vpc_id: String,
    pub(super) vpc_cidrs: Vec<Ipv4Net>,
}

/// The node's security groups: those of the primary interface.
#[derive(Debug, Default)]
pub(super) struct NodeGroups {
    /// The latest groups known (IMDS at start, then the primary interface's
    /// `groupSet` each time it is read); empty while unknown.
    pub(super) current: Vec<String>,
}

impl NodeGroups {
    pub(super) fn learn(&mut self, groups: &[String]) {
        if !groups.is_empty() {
            self.current = groups.to_vec();
        }
    }
}

pub(super) fn http_client() -> aws_sdk_ec2::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

pub(super) async fn imds_get(imds: &aws_config::imds::Client, path: &str) -> Result<String> {
    imds.get(format!("/latest/meta-data/{path}"))
        .await
        .map(|v| v.as_ref().trim().to_string())
        .map_err(|e| ProviderError::Transport(format!("instance metadata {path}: {e}")))
}

pub(super) fn lines(s: &str) -> impl Iterator<Item = &str> {
    s.lines().map(str::trim).filter(|l| !l.is_empty())
}

impl AwsProvider {
    /// Reads the instance's identity from IMDSv2, its limits from
    /// DescribeInstanceTypes and the built-in table (conservative limits
    /// for a type neither knows, with a warning: never an error), and the
    /// node's security groups from IMDS or else the primary interface's
    /// `groupSet`. Groups that cannot be read are not an error here; creating
    /// an interface then fails until they can be.
    ///
    /// Every EC2 call, these included, goes through `layer` (normally
    /// [`CallLayer::ec2`]).
    pub async fn connect(s: &AwsSettings, layer: CallLayer) -> Result<Self> {
        let http = http_client();
        let mut imds = aws_config::imds::Client::builder().configure(
            &aws_config::provider_config::ProviderConfig::without_region()
                .with_http_client(http.clone()),
        );
        if let Some(e) = &s.imds_endpoint {
            imds = imds
                .endpoint(e)
                .map_err(|e| ProviderError::Invalid(format!("IMDS endpoint: {e}")))?;
        }
        let imds = imds.build();
        let get = |p: &'static str| imds_get(&imds, p);
        let instance_id = get("instance-id").await?;
        let instance_type = get("instance-type").await?;
        let zone = get("placement/availability-zone").await?;
        let primary_mac = get("mac").await?;
        let base = format!("network/interfaces/macs/{primary_mac}");
        let iface = |p: &str| {
            let path = format!("{base}/{p}");
            let imds = &imds;
            async move { imds_get(imds, &path).await }
        };
        let primary_interface_id = iface("interface-id").await?;
        let subnet_id = iface("subnet-id").await?;
        let vpc_id = iface("vpc-id").await?;
        let cidrs = iface("vpc-ipv4-cidr-blocks").await?;
        let vpc_cidrs = lines(&cidrs).filter_map(|c| c.parse().ok()).collect();
        let imds_groups: Vec<String> = match iface("security-group-ids").await {
            Ok(g) => lines(&g).map(String::from).collect(),
            Err(e) => {
                warn!(error = %e, "IMDS does not give the primary interface's security groups; reading them from EC2");
                vec![]
            }
        };
        let primary_ip = get("local-ipv4")
            .await?
            .parse()
            .map_err(|e| ProviderError::Invalid(format!("local-ipv4: {e}")))?;
        let region = s.region.clone().unwrap_or_else(|| {
            zone.trim_end_matches(|c: char| c.is_ascii_alphabetic())
                .to_string()
        });
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region))
            .http_client(http)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_secs(10))
                    .build(),
            );
        if let Some(u) = &s.endpoint_url {
            loader = loader.endpoint_url(u);
        }
        if let Some((key, secret)) = &s.static_credentials {
            loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
                key.clone(),
                secret.clone(),
                None,
                None,
                "static",
            ));
        }
        let ec2 = aws_sdk_ec2::Client::new(&loader.load().await);
        let mut p = Self {
            ec2,
            id: Identity {
                instance_id,
                instance_type: instance_type.clone(),
                zone,
                primary_interface_id,
                primary_ip,
                subnet_id,
                vpc_id,
                vpc_cidrs,
            },
            limits: Limits {
                max_interfaces: 0,
                ipv4_per_interface: 0,
                prefix_delegation: false,
            },
            layer,
            subnet_cidrs: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
            groups: Mutex::new(NodeGroups::default()),
            learned_max_interfaces: AtomicU32::new(u32::MAX),
            learned_at: Mutex::new(None),
            limits_source: "",
        };
        p.groups.lock().expect("lock").learn(&imds_groups);
        if imds_groups.is_empty() {
            match p.primary_groups().await {
                Ok(g) => info!(groups = ?g, "security groups from the primary interface"),
                Err(e) => {
                    warn!(error = %e, "no interface can be created until the node's security groups are known")
                }
            }
        }
        (p.limits, p.limits_source) = p.instance_limits(&instance_type).await;
        info!(instance = %p.id.instance_id, instance_type, limits = ?p.limits, source = p.limits_source, "AWS instance identified");
        Ok(p)
    }

    /// The instance type's limits and where they came from: the smaller of
    /// DescribeInstanceTypes (default card) and the built-in table where
    /// both know the type, else whichever does, else [`fallback_limits`].
    pub(super) async fn instance_limits(&self, instance_type: &str) -> (Limits, &'static str) {
        let t = instance_type.to_string();
        let described = match self
            .call("DescribeInstanceTypes", || {
                self.ec2
                    .describe_instance_types()
                    .instance_types(t.as_str().into())
                    .send()
            })
            .await
        {
            Ok(out) => {
                let l = out.instance_types().first().and_then(described_limits);
                if l.is_none() {
                    warn!(
                        instance_type,
                        "DescribeInstanceTypes gave no network limits"
                    );
                }
                l
            }
            Err(e) => {
                warn!(instance_type, error = %e, "DescribeInstanceTypes failed");
                None
            }
        };
        let table = crate::limits::lookup(instance_type).map(|t| t.limits);
        match (described, table) {
            (Some(d), Some(t)) => {
                if (d.max_interfaces, d.ipv4_per_interface)
                    != (t.max_interfaces, t.ipv4_per_interface)
                {
                    warn!(instance_type, described = ?d, table = ?t, "DescribeInstanceTypes and the built-in table differ; using the smaller limits");
                }
                let l = Limits {
                    max_interfaces: d.max_interfaces.min(t.max_interfaces),
                    ipv4_per_interface: d.ipv4_per_interface.min(t.ipv4_per_interface),
                    prefix_delegation: d.prefix_delegation,
                };
                (l, "DescribeInstanceTypes")
            }
            (Some(d), None) => (d, "DescribeInstanceTypes"),
            (None, Some(t)) => {
                info!(instance_type, "limits from the built-in table");
                (t, "table")
            }
            (None, None) => {
                let attached = match self.attached().await {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "cannot list the attached interfaces either");
                        vec![]
                    }
                };
                let l = fallback_limits(&attached);
                warn!(
                    instance_type,
                    limits = ?l,
                    "neither DescribeInstanceTypes nor the built-in table knows this instance type; \
                     using conservative limits (the interfaces attached now on card 0, the most \
                     addresses one of them holds, no prefix delegation)"
                );
                (l, "fallback")
            }
        }
    }

    /// Where the limits in [`CloudProvider::describe_instance`] came from:
    /// "DescribeInstanceTypes", "table", or "fallback".
    pub fn limits_source(&self) -> &'static str {
        self.limits_source
    }

    /// The limits, lowered to a cap EC2 has taught by AttachmentLimitExceeded.
    pub(super) fn effective_limits(&self) -> Limits {
        let mut at = self.learned_at.lock().expect("lock");
        if at.is_some_and(|t| t.elapsed() >= LEARNED_CAP_TTL) {
            *at = None;
            self.learned_max_interfaces
                .store(u32::MAX, Ordering::Relaxed);
            info!("the interface cap learned from AttachmentLimitExceeded has lapsed; trying the instance type's limit again");
        }
        drop(at);
        let mut l = self.limits;
        l.max_interfaces = l
            .max_interfaces
            .min(self.learned_max_interfaces.load(Ordering::Relaxed));
        l
    }

    /// The primary interface's security groups, read now from its
    /// `groupSet` (DescribeNetworkInterfaces by id). An empty set is an error.
    pub(super) async fn primary_groups(&self) -> Result<Vec<String>> {
        let n = self.interface(&self.id.primary_interface_id).await?;
        let g = groups_of(&n);
        if g.is_empty() {
            return Err(ProviderError::Invalid(format!(
                "DescribeNetworkInterfaces lists no groups for {}",
                self.id.primary_interface_id
            )));
        }
        self.groups.lock().expect("lock").learn(&g);
        Ok(g)
    }

    /// The groups for a new interface. A spec naming no groups (the node's,
    /// see [`CreateInterface::security_groups`]) gets the primary
    /// interface's groups as they are now (from `attached`, a fresh answer,
    /// or else read by id), so a replaced group is followed; named groups
    /// are used as given. Never empty.
    pub(super) async fn groups_for_create(
        &self,
        requested: &[String],
        attached: &[NetworkInterface],
    ) -> Result<Vec<String>> {
        if !requested.is_empty() {
            return Ok(requested.to_vec());
        }
        let fresh = attached
            .iter()
            .find(|n| n.network_interface_id() == Some(self.id.primary_interface_id.as_str()))
            .map(groups_of)
            .filter(|g| !g.is_empty());
        if let Some(g) = fresh {
            return Ok(g);
        }
        match self.primary_groups().await {
            Ok(g) => Ok(g),
            Err(e) => {
                let last = self.groups.lock().expect("lock").current.clone();
                if e.is_transient() && !last.is_empty() {
                    warn!(error = %e, groups = ?last, "cannot re-read the node's security groups; using the last known");
                    return Ok(last);
                }
                Err(with_context(e, |m| {
                    format!("security groups of the node's primary interface are unknown: {m}")
                }))
            }
        }
    }
}
