//! The node's CNI configuration (conflist), written by ipamd once it is
//! ready: the container runtime picks the first conflist in its conf dir,
//! and the kubelet reports the node's network ready once one is there, so
//! writing it only when ipamd can serve ADDs keeps pods off a node that
//! cannot wire them.
//!
//! The file is written whole (a temporary file in the same directory, then
//! `rename(2)`, then the directory synced): a runtime reading the directory
//! sees the old content or the new one, never a part. With
//! `IPAMD_CNI_UNINSTALL_ON_EXIT=true` (a clean uninstall) ipamd removes it
//! when it stops; by default it stays, so a restart or a rolling update does
//! not take the node's network down.

use std::path::PathBuf;

use serde_json::{json, Value};

/// Where and what to write.
#[derive(Debug, Clone, PartialEq)]
pub struct CniConf {
    /// The runtime's CNI conf dir (on the host: `/etc/cni/net.d`).
    pub dir: PathBuf,
    /// The file's name, e.g. `10-vpc-cni.conflist` (runtimes take the
    /// first by name).
    pub file: String,
    /// The conflist's `name`: the network the runtime's ADD/DEL name.
    pub network: String,
    /// The conflist's `cniVersion` (the policy engines' chaining guides
    /// use 0.3.1).
    pub cni_version: String,
    /// ipamd's socket, as the plugin on the host reaches it.
    pub socket: PathBuf,
    /// The pods' host veth prefix (AWS_VPC_K8S_CNI_VETHPREFIX).
    pub veth_prefix: String,
    /// Plugins after vpc-cni (portmap, bandwidth, a policy engine in
    /// chaining mode), as conflist entries.
    pub chained: Vec<Value>,
    /// Remove the file when ipamd stops (and the plugin, when ipamd
    /// installs it).
    pub uninstall_on_exit: bool,
    /// Install the plugin too, before the conflist that names it: (the
    /// plugin in the image, the host's CNI bin dir). A container restarted
    /// by the kubelet reruns no init container, so ipamd puts back a
    /// plugin removed when it stopped.
    pub plugin: Option<(PathBuf, PathBuf)>,
}

/// A conflist's file name as runtimes read it: `NAME.conflist`, no `/`,
/// not hidden (a dot file is skipped by runtimes, and is where ipamd
/// writes its temporary copy).
pub fn check_file_name(f: &str) -> Result<(), String> {
    if f.contains('/') || f.starts_with('.') || !f.ends_with(".conflist") || f == ".conflist" {
        return Err(format!(
            "conflist file {f:?}: a file name ending in .conflist (no '/', not hidden)"
        ));
    }
    Ok(())
}

/// Versions the plugin speaks (its VERSION answer).
const VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Checks `IPAMD_CHAINED_PLUGINS`: a JSON array of objects each with a
/// `type`. Returns the entries, or every problem.
pub fn parse_chained(json: &str) -> Result<Vec<Value>, String> {
    let v: Value =
        serde_json::from_str(json).map_err(|e| format!("IPAMD_CHAINED_PLUGINS: not JSON: {e}"))?;
    let Value::Array(items) = v else {
        return Err("IPAMD_CHAINED_PLUGINS: expected a JSON array of plugin objects".into());
    };
    let bad: Vec<String> = items
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.get("type").is_some_and(Value::is_string))
        .map(|(i, _)| format!("IPAMD_CHAINED_PLUGINS[{i}]: an object with a \"type\" is needed"))
        .collect();
    if bad.is_empty() {
        Ok(items)
    } else {
        Err(bad.join("; "))
    }
}

/// Checks a `cniVersion` for the conflist.
pub fn check_version(v: &str) -> Result<(), String> {
    if VERSIONS.contains(&v) {
        Ok(())
    } else {
        Err(format!(
            "IPAMD_CNI_VERSION {v:?}: vpc-cni speaks {}",
            VERSIONS.join(", ")
        ))
    }
}

impl CniConf {
    /// The conflist's JSON: vpc-cni first, then the chained plugins.
    pub fn conflist(&self) -> Value {
        let mut plugins = vec![json!({
            "type": "vpc-cni",
            "ipamdSocket": self.socket,
            "vethPrefix": self.veth_prefix,
        })];
        plugins.extend(self.chained.iter().cloned());
        json!({
            "cniVersion": self.cni_version,
            "name": self.network,
            "plugins": plugins,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.file)
    }

    /// Writes the conflist whole, unless the file already says the same.
    /// Returns whether it wrote.
    ///
    /// # Errors
    /// The directory cannot be created or written.
    pub fn install(&self) -> std::io::Result<bool> {
        if let Some((source, bin_dir)) = &self.plugin {
            crate::install::install_plugin(source, bin_dir)?;
        }
        let text = self.text();
        // A temporary file left by a crash mid-write goes now.
        std::fs::remove_file(crate::install::tmp_path(&self.dir, &self.file)).ok();
        if std::fs::read_to_string(self.path()).is_ok_and(|old| old == text) {
            return Ok(false);
        }
        crate::install::write_whole(&self.dir, &self.file, text.as_bytes(), 0o644)?;
        Ok(true)
    }

    fn text(&self) -> String {
        serde_json::to_string_pretty(&self.conflist()).expect("JSON prints") + "\n"
    }

    /// Removes the conflist (a clean uninstall) if it is still the one
    /// ipamd wrote; another tool's file of that name is left. Returns
    /// whether it removed it; a missing file is fine.
    ///
    /// # Errors
    /// The file is ipamd's and cannot be removed.
    pub fn uninstall(&self) -> std::io::Result<bool> {
        if let Some((source, bin_dir)) = &self.plugin {
            crate::install::remove_plugin(source, bin_dir)?;
        }
        if std::fs::read_to_string(self.path()).ok() != Some(self.text()) {
            return Ok(false);
        }
        crate::install::remove(&self.path())?;
        Ok(true)
    }
}

/// How often the conflist is checked once written: a failed write is
/// retried, and a file removed or changed by someone else is put back.
pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits for ipamd to be ready, then installs `conf` and keeps it in
/// place until `stop`; logs what it did (an error once per failure run).
/// `installed` turns true once the file is in place (the startup taint
/// waits for it).
pub async fn install_when_ready(
    ipam: std::sync::Arc<crate::ipam::Ipam>,
    conf: CniConf,
    installed: tokio::sync::watch::Sender<bool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut changes = ipam.pool.subscribe();
    loop {
        if ipam.readiness().is_ok() {
            break;
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
    let mut failing = false;
    loop {
        match conf.install() {
            Ok(true) => {
                failing = false;
                installed.send_replace(true);
                tracing::info!(path = %conf.path().display(), "ready: CNI configuration installed");
            }
            Ok(false) => {
                failing = false;
                installed.send_replace(true);
            }
            Err(e) if !failing => {
                failing = true;
                tracing::error!(path = %conf.path().display(), error = %e, "cannot install the CNI configuration; pods cannot be scheduled here until it is (retrying)");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(RECHECK) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn conf(dir: &Path) -> CniConf {
        CniConf {
            dir: dir.to_path_buf(),
            file: "10-vpc-cni.conflist".into(),
            network: "vpc-cni".into(),
            cni_version: "0.3.1".into(),
            socket: "/run/vpc-cni/ipamd.sock".into(),
            veth_prefix: "eni".into(),
            chained: parse_chained(
                r#"[{"type": "portmap", "capabilities": {"portMappings": true}}]"#,
            )
            .unwrap(),
            uninstall_on_exit: false,
            plugin: None,
        }
    }

    #[test]
    fn the_conflist_puts_vpc_cni_first_then_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let c = conf(dir.path());
        assert!(c.install().unwrap(), "written");
        assert!(
            !c.install().unwrap(),
            "the same content is not written again"
        );
        let v: Value = serde_json::from_str(&std::fs::read_to_string(c.path()).unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["name"], "vpc-cni");
        assert_eq!(v["plugins"][0]["type"], "vpc-cni");
        assert_eq!(v["plugins"][0]["ipamdSocket"], "/run/vpc-cni/ipamd.sock");
        assert_eq!(v["plugins"][1]["type"], "portmap");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["10-vpc-cni.conflist"], "no temporary file left");
        // Another tool's file of that name is not ours to remove.
        std::fs::write(c.path(), "{}").unwrap();
        assert!(!c.uninstall().unwrap());
        assert!(c.path().exists());
        c.install().unwrap();
        assert!(c.uninstall().unwrap());
        assert!(!c.path().exists());
        assert!(!c.uninstall().unwrap());
        // A temporary file left by a crash mid-write goes at the next install.
        let tmp = dir.path().join(".10-vpc-cni.conflist.tmp");
        std::fs::write(&tmp, "{").unwrap();
        c.install().unwrap();
        assert!(!tmp.exists());
    }

    #[test]
    fn bad_chains_and_versions_are_named() {
        assert!(parse_chained("[]").unwrap().is_empty());
        assert!(parse_chained("{").unwrap_err().contains("not JSON"));
        assert!(parse_chained(r#"{"type":"portmap"}"#)
            .unwrap_err()
            .contains("array"));
        let e = parse_chained(r#"[{"type":"portmap"}, {"name":"x"}, 3]"#).unwrap_err();
        assert!(
            e.contains("[1]") && e.contains("[2]") && !e.contains("[0]"),
            "{e}"
        );
        assert!(check_version("0.3.1").is_ok());
        assert!(check_version("0.2.0").is_err());
    }
}
