//! The names a runtime passes for an attachment, checked the same way by
//! the plugin (before it does anything) and by ipamd (at its socket), so
//! that a name the kernel would refuse never costs an address.
//!
//! Sources: the CNI spec (SPEC.md, "Parameters" and "Network configuration":
//! container ids and network names match `[A-Za-z0-9][A-Za-z0-9_.-]*`, as
//! libcni's `ValidateContainerID` / `ValidateNetworkName` check), and the
//! kernel's `dev_valid_name()` (net/core/dev.c) for interface names: 1 to 15
//! bytes (`IFNAMSIZ` - 1), not `.` or `..`, no `/`, `:` or whitespace.

/// Why a name is refused; `Display` names the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadName {
    /// What the name is, e.g. `CNI_IFNAME`.
    pub what: &'static str,
    pub value: String,
    pub rule: &'static str,
}

impl std::fmt::Display for BadName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?} {}", self.what, self.value, self.rule)
    }
}

impl std::error::Error for BadName {}

/// Longest interface name the kernel takes (`IFNAMSIZ` - 1).
pub const IFNAME_MAX: usize = 15;

/// An interface name as the kernel's `dev_valid_name()` accepts it.
pub fn check_ifname(what: &'static str, name: &str) -> Result<(), BadName> {
    let bad = |rule| {
        Err(BadName {
            what,
            value: name.to_string(),
            rule,
        })
    };
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > IFNAME_MAX {
        return bad("is longer than 15 bytes (the kernel's IFNAMSIZ)");
    }
    if name == "." || name == ".." {
        return bad("is not an interface name the kernel accepts");
    }
    // The kernel refuses '/', ':' and whatever its isspace() holds: 9 to
    // 13, 32 and, in its Latin-1 table (lib/ctype.c), 160 (the byte 0xA0,
    // as in U+00A0 encoded as UTF-8). Control characters are refused here
    // too, since no tool prints them usefully.
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == b' ' || b == 0xa0 || b < 0x20 || b == 0x7f)
    {
        return bad("contains '/', ':', whitespace or a control character");
    }
    Ok(())
}

/// Longest container id or network name taken. The spec sets no limit;
/// runtimes use 64 hex digits, and Kubernetes names stop at 253 bytes. A
/// cap keeps every request far below ipamd's 64 KiB frame and the journal
/// small.
pub const ID_MAX: usize = 256;

/// A container id or network name: `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most
/// [`ID_MAX`] bytes.
pub fn check_id(what: &'static str, id: &str) -> Result<(), BadName> {
    let bad = |rule| {
        Err(BadName {
            what,
            value: id.to_string(),
            rule,
        })
    };
    if id.len() > ID_MAX {
        return bad("is longer than 256 bytes");
    }
    let mut bytes = id.bytes();
    match bytes.next() {
        None => return bad("is empty"),
        Some(b) if !b.is_ascii_alphanumeric() => {
            return bad("must start with a letter or digit ([A-Za-z0-9][A-Za-z0-9_.-]*)")
        }
        Some(_) => {}
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return bad("may hold only letters, digits, '_', '.' and '-' ([A-Za-z0-9][A-Za-z0-9_.-]*)");
    }
    Ok(())
}

/// Longest Kubernetes object name (a DNS subdomain, RFC 1123).
pub const K8S_NAME_MAX: usize = 253;

/// A pod's namespace or name as `CNI_ARGS` carries it: at most
/// [`K8S_NAME_MAX`] bytes of lowercase letters, digits, '-' and '.'
/// (Kubernetes' DNS-subdomain rule), so it is safe to journal and show.
pub fn check_k8s_name(what: &'static str, value: &str) -> Result<(), BadName> {
    let bad = |rule| {
        Err(BadName {
            what,
            value: value.to_string(),
            rule,
        })
    };
    if value.len() > K8S_NAME_MAX {
        return bad("is longer than 253 bytes");
    }
    if value.is_empty() {
        return bad("is empty");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return bad("may hold only lowercase letters, digits, '-' and '.' (a Kubernetes name)");
    }
    Ok(())
}

/// A label, annotation or taint key: an optional DNS-subdomain prefix and
/// '/', then a name of at most 63 characters of letters, digits, '-', '_'
/// and '.', beginning and ending with a letter or digit (Kubernetes'
/// qualified-name rule).
pub fn check_k8s_qualified_name(value: &str) -> Result<(), String> {
    let (prefix, name) = match value.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, value),
    };
    if let Some(p) = prefix {
        check_k8s_name("prefix", p).map_err(|e| e.to_string())?;
    }
    let ok_end = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty()
        || name.len() > 63
        || !ok_end(name.chars().next())
        || !ok_end(name.chars().last())
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(
            "not a qualified name (an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.', beginning and ending with a letter or digit)"
                .into(),
        );
    }
    Ok(())
}

/// Every problem with an attachment's key (network, container id, ifname).
pub fn check_attachment(network: &str, container_id: &str, ifname: &str) -> Vec<BadName> {
    [
        check_id("network name", network),
        check_id("container id", container_id),
        check_ifname("ifname", ifname),
    ]
    .into_iter()
    .filter_map(Result::err)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taint_keys_follow_the_qualified_name_rule() {
        for ok in [
            "vpc-cni.io/agent-not-ready",
            "node.cilium.io/agent-not-ready",
            "simple",
            "a_b.C-1",
        ] {
            assert!(check_k8s_qualified_name(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "/x",
            "x/",
            "-x",
            "x-",
            "Bad_Prefix/x",
            "a/b/c",
            "sp ace",
            long.as_str(),
        ] {
            assert!(check_k8s_qualified_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn interface_names_the_kernel_refuses() {
        for bad in [
            "",
            ".",
            "..",
            "eth:0",
            "eth/0",
            "eth 0",
            "eth\t0",
            "eth\n0",
            "eth\x0b0",
            "eth\x0c0",
            "eth\r0",
            "eth\x010",
            "eth\u{a0}",
            "sixteen-bytes-xx",
        ] {
            assert!(check_ifname("ifname", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["eth0", "net1", "...", "a.b", "fifteen-bytes-x", "e-_@"] {
            assert!(check_ifname("ifname", good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn ids_follow_the_spec() {
        for bad in [
            "",
            "-abc",
            ".abc",
            "_x",
            "a b",
            "a/b",
            "a:b",
            "abc\u{e9}",
            "a\tb",
        ] {
            assert!(check_id("container id", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "0", "abc-DEF_1.2", "9f86d081884c7d659a2feaa0c55ad015"] {
            assert!(check_id("container id", good).is_ok(), "{good:?} refused");
        }
        assert!(check_id("container id", &"a".repeat(ID_MAX)).is_ok());
        assert!(check_id("container id", &"a".repeat(ID_MAX + 1)).is_err());
        let e = check_attachment("", "-x", "eth:0");
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[2].to_string().contains("eth:0"), "{}", e[2]);
    }
}
