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

/// The largest plugin accepted (the release build is ~6 MiB).
const MAX_PLUGIN_BYTES: u64 = 256 << 20;

fn with_path(p: &Path) -> impl FnOnce(std::io::Error) -> std::io::Error + '_ {
    move |e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display()))
}

/// `p`'s contents if it is a regular file (a symlink to one counts) of at
/// most [`MAX_PLUGIN_BYTES`]; never opens a FIFO or a device (that would
/// block or never end).
fn read_regular(p: &Path) -> std::io::Result<Vec<u8>> {
    let m = std::fs::metadata(p).map_err(with_path(p))?;
    if !m.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not a regular file", p.display()),
        ));
    }
    if m.len() > MAX_PLUGIN_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{}: {} bytes, more than a plugin can be",
                p.display(),
                m.len()
            ),
        ));
    }
    std::fs::read(p).map_err(with_path(p))
}

/// What identifies a file without reading it: (size, mtime, inode).
type Seen = (u64, std::time::SystemTime, u64);
/// The installed plugin and its source as they were when ipamd last wrote
/// or compared them, so the check every few seconds reads nothing while
/// neither changed.
type Verified = (PathBuf, Seen, PathBuf, Seen);
static VERIFIED: std::sync::Mutex<Option<Verified>> = std::sync::Mutex::new(None);

fn identity(source: &Path, dest: &Path) -> Option<Verified> {
    let src = std::fs::canonicalize(source).ok()?;
    Some((dest.to_path_buf(), seen(dest)?, src.clone(), seen(&src)?))
}

fn seen(p: &Path) -> Option<Seen> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).ok()?;
    if !m.is_file() {
        return None;
    }
    Some((m.len(), m.modified().ok()?, m.ino()))
}

/// Where [`write_whole`] writes `name` before renaming it: a dot file in
/// the same directory (runtimes skip dot files). One left by a crash is
/// removed by the next write, or by the caller before it compares.
pub(crate) fn tmp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.tmp"))
}

/// Writes `dir/name` whole: [`tmp_path`], synced, with `mode`, renamed
/// over the old file, then the directory synced. A failure leaves no
/// temporary file.
pub(crate) fn write_whole(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = tmp_path(dir, name);
    std::fs::remove_file(&tmp).ok();
    std::fs::create_dir_all(dir).map_err(with_path(dir))?;
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()
    });
    let dest = dir.join(name);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, &dest)) {
        std::fs::remove_file(&tmp).ok();
        return Err(with_path(&dest)(e));
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Copies `source` to `bin_dir/vpc-cni` unless it is there already;
/// whether it wrote. Anything at that path that is not a regular file (a
/// directory, a FIFO) is an error, not replaced.
pub fn install_plugin(source: &Path, bin_dir: &Path) -> std::io::Result<bool> {
    let dest = bin_dir.join(PLUGIN);
    let now = identity(source, &dest);
    if now.is_some() && *VERIFIED.lock().expect("lock") == now {
        return Ok(false);
    }
    let bytes = read_regular(source)?;
    std::fs::remove_file(tmp_path(bin_dir, PLUGIN)).ok();
    match std::fs::symlink_metadata(&dest) {
        Ok(m) if m.is_file() => {
            if read_regular(&dest)? == bytes {
                *VERIFIED.lock().expect("lock") = identity(source, &dest);
                return Ok(false);
            }
        }
        // A symlink is replaced, never written through.
        Ok(m) if m.file_type().is_symlink() => {}
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{}: not a regular file; not replaced", dest.display()),
            ))
        }
        Err(_) => {}
    }
    write_whole(bin_dir, PLUGIN, &bytes, 0o755)?;
    *VERIFIED.lock().expect("lock") = identity(source, &dest);
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
    // Bad input changes nothing.
    crate::cniconf::check_file_name(conflist_file)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut out = Removed::default();
    if remove_plugin(source, bin_dir)? {
        out.plugin = Some(bin_dir.join(PLUGIN));
    }
    let conf = conf_dir.join(conflist_file);
    let regular = std::fs::symlink_metadata(&conf).is_ok_and(|m| m.is_file());
    let first_is_ours = regular
        && std::fs::read_to_string(&conf)
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
    if !std::fs::symlink_metadata(&plugin).is_ok_and(|m| m.is_file()) {
        return Ok(false);
    }
    let Ok(have) = read_regular(&plugin) else {
        return Ok(false);
    };
    let ours = read_regular(source)?;
    if have != ours {
        return Ok(false);
    }
    remove(&plugin)?;
    Ok(true)
}

/// Removes `p`; a missing file is no error.
pub(crate) fn remove(p: &Path) -> std::io::Result<()> {
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

        // Not a regular file at the plugin's path: refused, not replaced; a
        // FIFO as the source is refused without opening it (no hang).
        std::fs::remove_file(&dest).ok();
        std::fs::create_dir(&dest).unwrap();
        let e = install_plugin(&src, &bin).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(!bin.join(".vpc-cni.tmp").exists());
        std::fs::remove_dir(&dest).unwrap();
        let fifo = d.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let e = install_plugin(&fifo, &bin).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        // Installed and verified once, it is not read again while unchanged;
        // replaced by someone, it is compared again.
        assert!(install_plugin(&src, &bin).unwrap());
        assert!(!install_plugin(&src, &bin).unwrap());
        std::fs::write(&dest, b"tampered").unwrap();
        assert!(
            install_plugin(&src, &bin).unwrap(),
            "a changed plugin is put back"
        );
        // A conflist name that leaves the directory is refused.
        let e = uninstall(&src, &bin, d.path(), "../x.conflist").unwrap_err();
        assert!(e.to_string().contains(".conflist"), "{e}");

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
