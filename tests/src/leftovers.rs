//! What a lab run killed before its cleanup (SIGKILL, a crash, a signal)
//! leaves behind, and its removal.
//!
//! Every lab names its namespaces, and its temporary directory, after the
//! run: `vcni<pid>s<start>`, `start` being the process's start time in
//! clock ticks after boot (field 22 of `/proc/<pid>/stat`, proc(5)). A run
//! is gone when no process has that pid *and* that start time, so a later
//! process given the same pid is not mistaken for it. A new lab removes
//! the leftovers of gone runs before it builds its own; the ipamd
//! processes a lab starts die with it (see [`dying_with_this_process`]).

use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Where a run may also keep a temporary directory: tmpfs (`cni-bench`
/// keeps ipamd's journal there, as a node does).
pub const SHM: &str = "/dev/shm";

/// The prefix of every name this run gives: `vcni<pid>s<start>`.
pub fn run_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let pid = std::process::id();
        let start = start_time(pid).expect("this process's own /proc/self/stat");
        format!("vcni{pid}s{start}")
    })
}

/// The start time of process `pid` (clock ticks after boot), `None` when
/// there is no such process or it has exited (a zombie not yet reaped).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses,
    // so fields are counted after its last ')'; state is field 3,
    // starttime field 22.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(22 - 4)?.parse().ok()
}

/// The run tag a lab name starts with (`vcni<pid>s<start>`, then `x` or
/// `.`), and whether that run still lives. `None` for any other name.
fn tag_of(name: &str) -> Option<(&str, bool)> {
    let rest = name.strip_prefix("vcni")?;
    let (pid, rest) = rest.split_once('s')?;
    let end = rest.find(['x', '.'])?;
    let tag = &name[..name.len() - rest.len() + end];
    let (pid, start): (u32, u64) = (pid.parse().ok()?, rest[..end].parse().ok()?);
    Some((tag, start_time(pid) == Some(start)))
}

/// Removes what runs that are gone left behind: their namespaces (after
/// killing any process still in them, as an orphaned ipamd would be) and
/// their temporary directories. Returns the names removed. Runs still
/// alive, this one included, are not touched.
pub fn remove_gone_runs() -> Vec<String> {
    stop_orphans_of_gone_runs();
    let mut removed = vec![];
    for name in namespaces() {
        if matches!(tag_of(&name), Some((_, false))) {
            remove_namespace(&name);
            removed.push(name);
        }
    }
    for entry in temp_entries() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if matches!(tag_of(&name), Some((_, false))) && entry.path().is_dir() {
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                eprintln!("cannot remove {}: {e}", entry.path().display());
            } else {
                removed.push(entry.path().display().to_string());
            }
        }
    }
    if !removed.is_empty() {
        eprintln!(
            "removed what killed lab runs left behind: {}",
            removed.join(", ")
        );
    }
    removed
}

/// Kills, and waits for, the processes a gone run left working on its
/// names: a run killed while it waited for `ip netns add <its name>` (a
/// child that outlives it) would otherwise get that namespace created
/// after the sweep. Such a process is one with an argument that is a gone
/// run's name.
fn stop_orphans_of_gone_runs() {
    let orphans: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                cmdline.split(|b| *b == 0).any(|arg| {
                    std::str::from_utf8(arg).is_ok_and(|a| matches!(tag_of(a), Some((_, false))))
                })
            })
        })
        .map(|pid| pid.to_string())
        .collect();
    if orphans.is_empty() {
        return;
    }
    kill(&orphans);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while orphans
        .iter()
        .any(|p| p.parse().ok().and_then(start_time).is_some())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Sends SIGKILL to `pids` (any already gone are no error).
fn kill(pids: &[impl AsRef<std::ffi::OsStr>]) {
    let _ = Command::new("kill")
        .arg("-KILL")
        .args(pids)
        .stderr(Stdio::null())
        .status();
}

/// Held while this run creates a namespace or its temporary directory, and
/// for good by [`remove_this_run`]: nothing is created behind its back.
static CREATING: Mutex<()> = Mutex::new(());

/// Waits while [`remove_this_run`] runs (forever: the process is ending),
/// then lets this run create a namespace or directory until the guard
/// drops.
pub fn creating() -> MutexGuard<'static, ()> {
    CREATING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes every namespace of this run, with the processes in them, and
/// its temporary directories: for a signal that ends the run before the
/// labs' `Drop` can (see `vpc-lab`). Only as the process ends: from here
/// on, nothing of this run can create a namespace or directory.
pub fn remove_this_run() {
    std::mem::forget(creating());
    let tag = run_tag();
    for name in namespaces() {
        if tag_of(&name).is_some_and(|(t, _)| t == tag) {
            remove_namespace(&name);
        }
    }
    for entry in temp_entries() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if tag_of(&name).is_some_and(|(t, _)| t == tag) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// What the temporary directories (the process's and [`SHM`]) hold.
fn temp_entries() -> impl Iterator<Item = std::fs::DirEntry> {
    [std::env::temp_dir(), SHM.into()]
        .into_iter()
        .flat_map(std::fs::read_dir)
        .flatten()
        .flatten()
}

/// A new temporary directory in `dir` named after this run, so that a
/// later run removes it if this one is killed.
pub fn tempdir_in(dir: &std::path::Path) -> tempfile::TempDir {
    let _creating = creating();
    tempfile::Builder::new()
        .prefix(&format!("{}.", run_tag()))
        .tempdir_in(dir)
        .expect("temporary directory")
}

/// Every named network namespace (`ip netns list`).
pub fn namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// Kills the processes in namespace `name`, then deletes it. A process
/// left in it would keep the namespace (its links and nft tables) alive
/// after `ip netns del`.
fn remove_namespace(name: &str) {
    let pids = Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let me = std::process::id().to_string();
    let pids: Vec<&str> = pids.split_whitespace().filter(|p| *p != me).collect();
    if !pids.is_empty() {
        kill(&pids);
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// The command that runs `program` so that it dies (SIGKILL) when this
/// process does, however it ends: util-linux's `setpriv --pdeathsig`
/// (prctl(2) PR_SET_PDEATHSIG, kept across the exec of `program`). The
/// signal follows the *thread* that spawned the child, so children are
/// spawned from threads that live as long as the lab (the runtime's).
pub fn dying_with_this_process(program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--", program]);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_left_working_on_a_gone_runs_name_is_stopped_before_the_sweep() {
        use std::os::unix::process::ExitStatusExt;
        // As an `ip netns add <name>` a killed run was waiting for: an
        // argument that is a gone run's name (this pid, another start
        // time). `; true` keeps the shell from exec-ing sleep, which
        // would drop the argument.
        let gone = format!("vcni{}s1x0-node-a", std::process::id());
        let mut orphan = Command::new("sh")
            .args(["-c", "sleep 30; true", &gone])
            .spawn()
            .unwrap();
        // Until the child has exec'd the shell, its command line is this
        // test's: a sweep then would rightly not see it.
        let cmdline = format!("/proc/{}/cmdline", orphan.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read(&cmdline)
            .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == gone.as_bytes()))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the shell never showed its argument"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        stop_orphans_of_gone_runs();
        let status = orphan.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }

    #[test]
    fn a_name_gives_its_run_and_whether_it_lives() {
        let me = run_tag();
        let ns = format!("{me}x3-node-a");
        assert_eq!(tag_of(&ns), Some((me, true)));
        let dir = format!("{me}.AbC12");
        assert_eq!(tag_of(&dir), Some((me, true)));
        // This pid, but another start time: another (gone) run.
        let pid = std::process::id();
        let other = format!("vcni{pid}s1x0-vpc");
        assert_eq!(
            tag_of(&other),
            Some((&other[..other.find('x').unwrap()], false))
        );
        // A pid written with a leading zero still names its own run.
        assert_eq!(tag_of("vcni0123s45x0-vpc"), Some(("vcni0123s45", false)));
        for not_ours in ["vcni123x0-vpc", "vcni-x", "cni-1234", "vcni12s34", "vcnisx"] {
            assert_eq!(tag_of(not_ours), None, "{not_ours}");
        }
    }

    #[test]
    fn a_process_that_exited_unreaped_is_gone() {
        let mut child = Command::new("sleep").arg("60").spawn().unwrap();
        let pid = child.id();
        assert!(start_time(pid).is_some(), "running");
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        // Dead but not reaped: a zombie until the wait below.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while start_time(pid).is_some() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(start_time(pid), None, "a zombie counts as gone");
        child.wait().unwrap();
    }
}
