//! Putting the vpc-cni plugin on the node and taking it off again: what the
//! chart's init container (`ipamctl install-cni`) and its uninstall step
//! (`ipamctl uninstall-cni`) do against the host's CNI directories.
//!
//! The binary is written whole (a temporary dot file in the same
//! directory, synced, mode 0755, then renamed over the old one), so a
//! runtime never executes half a plugin; it is written only when it
//! differs. Removal takes only what is vpc-cni's: the binary when it is
//! the one given as the source, the conflist when its first plugin is
//! vpc-cni.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The plugin's file name in the CNI bin directory (its `type`).
pub const PLUGIN: &str = "vpc-cni";

/// Copies `source` to `bin_dir/vpc-cni` unless it is there already;
/// whether it wrote.
pub fn install_plugin(source: &Path, bin_dir: &Path) -> std::io::Result<bool> {
    let bytes = std::fs::read(source)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", source.display())))?;
    let dest = bin_dir.join(PLUGIN);
    let tmp = bin_dir.join(format!(".{PLUGIN}.tmp"));
    std::fs::remove_file(&tmp).ok();
    if std::fs::read(&dest).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    std::fs::create_dir_all(bin_dir)?;
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(&bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o755))?;
        f.sync_all()
    });
    if let Err(e) = written {
        std::fs::remove_file(&tmp).ok();
        return Err(e);
    }
    std::fs::rename(&tmp, &dest)?;
    std::fs::File::open(bin_dir)?.sync_all()?;
    Ok(true)
}

/// What [`uninstall`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    pub plugin: Option<PathBuf>,
    pub conflist: Option<PathBuf>,
}

/// Removes `bin_dir/vpc-cni` if it is `source`'s copy, and
/// `conf_dir/conflist_file` if its first plugin is vpc-cni; anything else
/// of those names (another tool's) stays. Missing files are not errors.
pub fn uninstall(
    source: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    conflist_file: &str,
) -> std::io::Result<Removed> {
    let mut out = Removed::default();
    if remove_plugin(source, bin_dir)? {
        out.plugin = Some(bin_dir.join(PLUGIN));
    }
    let conf = conf_dir.join(conflist_file);
    let first_is_ours = std::fs::read_to_string(&conf)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["plugins"][0]["type"] == PLUGIN);
    if first_is_ours {
        remove(&conf)?;
        out.conflist = Some(conf);
    }
    Ok(out)
}

/// Removes `bin_dir/vpc-cni` if it is `source`'s copy; whether it did.
pub fn remove_plugin(source: &Path, bin_dir: &Path) -> std::io::Result<bool> {
    let plugin = bin_dir.join(PLUGIN);
    let Ok(have) = std::fs::read(&plugin) else {
        return Ok(false);
    };
    let ours = std::fs::read(source)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", source.display())))?;
    if have != ours {
        return Ok(false);
    }
    remove(&plugin)?;
    Ok(true)
}

fn remove(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_whole_and_once_and_removes_only_its_own() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("vpc-cni-src");
        std::fs::write(&src, b"\x7fELF plugin v1").unwrap();
        let bin = d.path().join("bin");
        assert!(install_plugin(&src, &bin).unwrap());
        let dest = bin.join(PLUGIN);
        assert_eq!(std::fs::read(&dest).unwrap(), b"\x7fELF plugin v1");
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(
            !install_plugin(&src, &bin).unwrap(),
            "the same binary is not written again"
        );
        // An upgrade replaces it; a temporary file left by a crash goes.
        std::fs::write(bin.join(".vpc-cni.tmp"), b"half").unwrap();
        std::fs::write(&src, b"\x7fELF plugin v2").unwrap();
        assert!(install_plugin(&src, &bin).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"\x7fELF plugin v2");
        assert!(!bin.join(".vpc-cni.tmp").exists());
        // A missing source is an error naming it.
        let e = install_plugin(&d.path().join("nope"), &bin).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");

        // Uninstall: another tool's conflist of that name stays, ours goes.
        let conf = d.path().join("net.d");
        std::fs::create_dir_all(&conf).unwrap();
        let file = "10-vpc-cni.conflist";
        std::fs::write(conf.join(file), r#"{"plugins":[{"type":"calico"}]}"#).unwrap();
        let r = uninstall(&src, &bin, &conf, file).unwrap();
        assert_eq!(r.plugin, Some(dest.clone()));
        assert_eq!(r.conflist, None);
        assert!(conf.join(file).exists() && !dest.exists());
        std::fs::write(
            conf.join(file),
            r#"{"plugins":[{"type":"vpc-cni"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        assert!(uninstall(&src, &bin, &conf, file)
            .unwrap()
            .conflist
            .is_some());
        assert!(!conf.join(file).exists());
        // Nothing left: nothing to do, no error.
        assert_eq!(
            uninstall(&src, &bin, &conf, file).unwrap(),
            Removed::default()
        );
        // Another build under the plugin's name is not ours to remove.
        std::fs::write(&dest, b"someone else's").unwrap();
        assert_eq!(uninstall(&src, &bin, &conf, file).unwrap().plugin, None);
        assert!(dest.exists());
    }
}
