use thiserror::Error;

pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

/// What a cloud operation can fail with, in terms ipamd acts on.
#[derive(Debug, Error, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum ProviderError {
    /// The API's rate limit was hit (EC2 RequestLimitExceeded, ARM 429).
    #[error("throttled by the cloud API ({api})")]
    Throttled {
        api: String,
        /// How long the cloud asked the caller to wait, milliseconds (ARM's
        /// `Retry-After`); `None` when it did not say (EC2).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// An instance or interface limit would be exceeded.
    #[error("limit reached: {0}")]
    LimitExceeded(String),
    /// The subnet has no free addresses left.
    #[error("subnet {subnet} has no free addresses")]
    SubnetExhausted { subnet: String },
    /// The subnet has free addresses but no free aligned /28 (prefix delegation).
    #[error("subnet {subnet} has no free /28 block")]
    InsufficientCidrBlocks { subnet: String },
    /// The cloud cannot do this at all (e.g. hot-attach on Azure).
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The cloud refused for lack of permission (EC2
    /// `UnauthorizedOperation`, `AuthFailure`; ARM 403): an operator must
    /// grant it, so it is not retried sooner than any other failure.
    #[error("permission denied: {0}")]
    Denied(String),
    /// A 5xx from the cloud.
    #[error("cloud server error: {0}")]
    Server(String),
    #[error("cloud call timed out ({api})")]
    Timeout { api: String },
    /// The cloud endpoint could not be reached at all.
    #[error("cannot reach the cloud API: {0}")]
    Transport(String),
}

impl ProviderError {
    /// A throttled answer from `api` that named no time to wait (EC2's
    /// RequestLimitExceeded).
    pub fn throttled(api: impl Into<String>) -> Self {
        Self::Throttled {
            api: api.into(),
            retry_after_ms: None,
        }
    }

    /// Worth retrying after a backoff.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Throttled { .. } | Self::Server(_) | Self::Timeout { .. } | Self::Transport(_)
        )
    }

    /// A low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Throttled { .. } => "throttled",
            Self::LimitExceeded(_) => "limit",
            Self::SubnetExhausted { .. } => "subnet_exhausted",
            Self::InsufficientCidrBlocks { .. } => "insufficient_cidr",
            Self::Unsupported(_) => "unsupported",
            Self::NotFound(_) => "not_found",
            Self::Invalid(_) => "invalid",
            Self::Denied(_) => "permission_denied",
            Self::Server(_) => "server",
            Self::Timeout { .. } => "timeout",
            Self::Transport(_) => "transport",
        }
    }
}
