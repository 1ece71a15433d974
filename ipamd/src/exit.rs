//! How ipamd ends: every fatal outcome and its exit code, in one place.
//!
//! Codes follow sysexits(3), which supervisors and the Helm chart's docs
//! read: 64 (EX_USAGE) for configuration a restart will not fix, 69
//! (EX_UNAVAILABLE) for a resource that is not there (the cloud refused us,
//! a socket cannot be bound, the journal cannot be read).

/// A reason ipamd stops with a non-zero status.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    /// Bad settings: every one of them, one per line.
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    /// The cloud, a file or a socket ipamd needs is not available.
    #[error("{0}")]
    Unavailable(String),
    /// A server stopped on its own; pods cannot be served until a restart.
    #[error("{0}")]
    ServerStopped(String),
}

/// EX_USAGE.
pub const EX_USAGE: i32 = 64;
/// EX_UNAVAILABLE.
pub const EX_UNAVAILABLE: i32 = 69;

impl Fatal {
    /// The process exit status for this outcome.
    pub fn code(&self) -> i32 {
        match self {
            Self::Config(_) => EX_USAGE,
            Self::Unavailable(_) | Self::ServerStopped(_) => EX_UNAVAILABLE,
        }
    }

    pub fn config(msg: impl Into<String>) -> Self {
        Self::Config(vec![msg.into()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_sysexits() {
        assert_eq!(Fatal::config("x").code(), 64);
        assert_eq!(Fatal::Unavailable("x".into()).code(), 69);
        assert_eq!(Fatal::ServerStopped("x".into()).code(), 69);
        let all = Fatal::Config(vec!["A: bad".into(), "B: bad".into()]).to_string();
        assert_eq!(all, "invalid configuration:\n  A: bad\n  B: bad");
    }
}
