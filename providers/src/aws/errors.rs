//! EC2's errors in the project's terms: which are throttling, limits, a
//! full subnet (named by its id), or transient.

use super::*;

/// Maps an SDK error to what ipamd acts on.
pub(super) fn map_err<E>(api: &str, e: SdkError<E>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &e {
        SdkError::TimeoutError(_) => ProviderError::Timeout { api: api.into() },
        SdkError::DispatchFailure(d) if d.is_timeout() => {
            ProviderError::Timeout { api: api.into() }
        }
        SdkError::DispatchFailure(_) => ProviderError::Transport(format!(
            "{api}: {}",
            aws_sdk_ec2::error::DisplayErrorContext(&e)
        )),
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or_default().to_string();
            let msg = s.err().message().unwrap_or_default().to_string();
            let status = s.raw().status().as_u16();
            classify(api, &code, &msg, status)
        }
        _ => ProviderError::Transport(format!(
            "{api}: {}",
            aws_sdk_ec2::error::DisplayErrorContext(&e)
        )),
    }
}

/// EC2 error codes to the project's errors.
///
/// EC2's answers to a full subnet (`InsufficientFreeAddressesInSubnet`,
/// `InsufficientCidrBlocks`) do not name the subnet, so those come back with
/// an empty `subnet`, which the caller fills with the subnet's id (see
/// `in_subnet`); EC2's message text never goes there.
pub fn classify(api: &str, code: &str, msg: &str, status: u16) -> ProviderError {
    match code {
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => {
            ProviderError::throttled(api)
        }
        "InsufficientFreeAddressesInSubnet" => ProviderError::SubnetExhausted {
            subnet: String::new(),
        },
        "InsufficientCidrBlocks" => ProviderError::InsufficientCidrBlocks {
            subnet: String::new(),
        },
        "AttachmentLimitExceeded"
        | "PrivateIpAddressLimitExceeded"
        | "NetworkInterfaceLimitExceeded" => ProviderError::LimitExceeded(format!("{code}: {msg}")),
        c if c.ends_with(".NotFound") => ProviderError::NotFound(format!("{code}: {msg}")),
        "UnauthorizedOperation" | "AuthFailure" | "AccessDenied" | "Blocked" | "OptInRequired" => {
            ProviderError::Denied(format!("{api}: {code}: {msg}"))
        }
        _ if status >= 500 => ProviderError::Server(format!("{api}: {code} {msg}")),
        _ => ProviderError::Invalid(format!("{api}: {code}: {msg}")),
    }
}

/// Names `subnet` (a subnet id) in a full-subnet error; other errors pass.
pub(super) fn in_subnet(e: ProviderError, subnet: &str) -> ProviderError {
    match e {
        ProviderError::SubnetExhausted { .. } => ProviderError::SubnetExhausted {
            subnet: subnet.to_string(),
        },
        ProviderError::InsufficientCidrBlocks { .. } => ProviderError::InsufficientCidrBlocks {
            subnet: subnet.to_string(),
        },
        e => e,
    }
}

/// The same kind of error (so retry and backoff decisions stay), its text
/// put in context by `ctx`.
pub(super) fn with_context(e: ProviderError, ctx: impl Fn(&str) -> String) -> ProviderError {
    use ProviderError as E;
    match e {
        E::Throttled {
            api,
            retry_after_ms,
        } => E::Throttled {
            api: ctx(&api),
            retry_after_ms,
        },
        E::Timeout { api } => E::Timeout { api: ctx(&api) },
        E::LimitExceeded(m) => E::LimitExceeded(ctx(&m)),
        E::Unsupported(m) => E::Unsupported(ctx(&m)),
        E::NotFound(m) => E::NotFound(ctx(&m)),
        E::Invalid(m) => E::Invalid(ctx(&m)),
        E::Denied(m) => E::Denied(ctx(&m)),
        E::Server(m) => E::Server(ctx(&m)),
        E::Transport(m) => E::Transport(ctx(&m)),
        e @ (E::SubnetExhausted { .. } | E::InsufficientCidrBlocks { .. }) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec2_codes_map_to_the_kinds_ipamd_acts_on() {
        let k = |code, status| classify("CreateNetworkInterface", code, "m", status).metric_label();
        assert_eq!(k("RequestLimitExceeded", 503), "throttled");
        assert_eq!(k("UnauthorizedOperation", 403), "permission_denied");
        assert_eq!(k("AuthFailure", 401), "permission_denied");
        assert_eq!(
            k("InsufficientFreeAddressesInSubnet", 400),
            "subnet_exhausted"
        );
        assert_eq!(k("AttachmentLimitExceeded", 400), "limit");
        assert_eq!(k("InvalidNetworkInterfaceID.NotFound", 400), "not_found");
        assert_eq!(k("InternalError", 500), "server");
        assert_eq!(k("InvalidParameterValue", 400), "invalid");
        assert!(!classify("X", "UnauthorizedOperation", "m", 403).is_transient());
    }
}
