//! Append-only journal of assignments, releases and in-flight cloud
//! operations. Nothing is acknowledged before its record is on disk.
//!
//! Format: JSON lines; the first is a header with the format version. A torn
//! last line (a crash mid-write) is cut off on open; damage anywhere else
//! stops the daemon rather than guessing.
//!
//! Callers queue records in the order they changed the in-memory state (they
//! queue under the same lock) and wait until the batch holding theirs is
//! synced: group commit, so 64 concurrent ADDs cost a few fsyncs, not 64,
//! and an uncontended ADD pays no thread hop.
//!
//! Where the bytes go is a [`Store`]: a file ([`FileStore`], the daemon's),
//! or memory ([`MemStore`], for simulations of many nodes in one process).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::datastore::{PodKey, PodName};
use crate::netns::NetnsRef;

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    Header {
        version: u32,
    },
    Assign {
        key: PodKey,
        ip: Ipv4Addr,
        /// The pod's network namespace path, when the runtime gave one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
        /// Its identity at ADD (see [`crate::netns`]); absent when unknown
        /// (and in journals written before it was recorded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns_id: Option<(u64, u64)>,
        /// The Kubernetes pod, from `CNI_ARGS`; absent when the runtime
        /// gave none (and in journals written before it was recorded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<PodName>,
    },
    /// `at_ms`: wall-clock time of the release, so a restart keeps cooling it.
    Release {
        key: PodKey,
        ip: Ipv4Addr,
        at_ms: u64,
    },
    PendingDelete {
        interface_id: String,
    },
    Deleted {
        interface_id: String,
    },
}

/// What the journal says, replayed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    pub assignments: BTreeMap<PodKey, Ipv4Addr>,
    pub netns: BTreeMap<PodKey, NetnsRef>,
    pub pods: BTreeMap<PodKey, PodName>,
    /// Address -> release time (ms since the epoch), latest release wins.
    pub released_at: BTreeMap<Ipv4Addr, u64>,
    pub pending_deletes: BTreeSet<String>,
    pub records: u64,
    /// Bytes cut from a torn last line.
    pub truncated: u64,
}

impl Replayed {
    fn apply(&mut self, r: Record) {
        self.records += 1;
        match r {
            Record::Header { .. } => {}
            Record::Assign {
                key,
                ip,
                netns,
                netns_id,
                pod,
            } => {
                self.released_at.remove(&ip);
                // An address has one holder: a later assignment of it means
                // the earlier holder's release was not written.
                self.assignments.retain(|_, held| *held != ip);
                self.netns.retain(|k, _| self.assignments.contains_key(k));
                self.pods.retain(|k, _| self.assignments.contains_key(k));
                if let Some(path) = netns {
                    let (dev, ino) = netns_id.unwrap_or_default();
                    self.netns.insert(key.clone(), NetnsRef { path, dev, ino });
                }
                if let Some(pod) = pod {
                    self.pods.insert(key.clone(), pod);
                }
                self.assignments.insert(key, ip);
            }
            Record::Release { key, ip, at_ms } => {
                if self.assignments.get(&key) == Some(&ip) {
                    self.assignments.remove(&key);
                    self.netns.remove(&key);
                    self.pods.remove(&key);
                }
                self.released_at.insert(ip, at_ms);
            }
            Record::PendingDelete { interface_id } => {
                self.pending_deletes.insert(interface_id);
            }
            Record::Deleted { interface_id } => {
                self.pending_deletes.remove(&interface_id);
            }
        }
    }

    /// The records that say the same as this state, for compaction.
    pub fn to_records(&self) -> Vec<Record> {
        let mut v = vec![Record::Header { version: VERSION }];
        v.extend(self.assignments.iter().map(|(k, ip)| {
            Record::Assign {
                key: k.clone(),
                ip: *ip,
                netns: self.netns.get(k).map(|n| n.path.clone()),
                netns_id: self
                    .netns
                    .get(k)
                    .filter(|n| (n.dev, n.ino) != (0, 0))
                    .map(|n| (n.dev, n.ino)),
                pod: self.pods.get(k).cloned(),
            }
        }));
        v.extend(self.released_at.iter().map(|(ip, at)| Record::Release {
            key: PodKey {
                network: String::new(),
                container_id: String::new(),
                ifname: String::new(),
            },
            ip: *ip,
            at_ms: *at,
        }));
        v.extend(self.pending_deletes.iter().map(|id| Record::PendingDelete {
            interface_id: id.clone(),
        }));
        v
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {path} line {line} is damaged ({reason}); refusing to guess what was assigned. Move the file aside only if every pod on this node is being recreated")]
    Corrupt {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    #[error("journal {path} has format version {found}; this ipamd reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    /// A write or sync failed (ENOSPC, EIO): what was queued is not durable.
    #[error("journal {path}: write failed: {reason}")]
    Write { path: PathBuf, reason: String },
    /// An earlier write failed and no snapshot has replaced the file yet.
    #[error(
        "journal {path} is unusable after a failed write ({reason}) until a snapshot replaces it"
    )]
    Unusable { path: PathBuf, reason: String },
}

/// Where the journal's bytes are kept. Each call is durable when it
/// returns `Ok` (a file is synced).
pub trait Store: Send + std::fmt::Debug + 'static {
    /// Names the store in messages (a file's path).
    fn path(&self) -> &Path;
    /// Appends `bytes` and makes them durable.
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// Replaces everything with `bytes`, atomically: after a crash either
    /// the old content or the new one is there, never a mix.
    fn rewrite(&mut self, bytes: &[u8]) -> std::io::Result<()>;
}

/// The journal in a file: appends are `write` + `fdatasync`; a rewrite
/// goes to a temporary file that is synced and renamed over it.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    file: File,
}

impl FileStore {
    /// Opens `path` (creating its directory), its content replaced by `initial`.
    pub fn create(path: &Path, initial: &[u8]) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file: rewrite_file(path, initial)?,
        })
    }
}

impl Store for FileStore {
    fn path(&self) -> &Path {
        &self.path
    }

    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.file.sync_data()
    }

    fn rewrite(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file = rewrite_file(&self.path, bytes)?;
        Ok(())
    }
}

/// The journal in memory, shared with whoever holds a clone (a simulated
/// node that "restarts" replays it with [`MemStore::replay`]).
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl MemStore {
    /// What a new ipamd on this store would restore.
    pub fn replay(&self) -> Result<Replayed, JournalError> {
        let bytes = self.bytes.lock().expect("memory journal lock").clone();
        let len = bytes.len() as u64;
        let (out, good_end) = replay_from(Path::new(MEMORY), &bytes[..], len)?;
        self.bytes
            .lock()
            .expect("memory journal lock")
            .truncate(good_end as usize);
        Ok(out)
    }
}

/// How a [`MemStore`] is named in messages.
const MEMORY: &str = "<memory>";

impl Store for MemStore {
    fn path(&self) -> &Path {
        Path::new(MEMORY)
    }

    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.bytes
            .lock()
            .expect("memory journal lock")
            .extend_from_slice(bytes);
        Ok(())
    }

    fn rewrite(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        *self.bytes.lock().expect("memory journal lock") = bytes.to_vec();
        Ok(())
    }
}

/// Reads the journal, cutting off a torn last line.
pub fn replay(path: &Path) -> Result<Replayed, JournalError> {
    let io = |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Replayed::default()),
        Err(e) => return Err(io(e)),
    };
    let len = file.metadata().map_err(io)?.len();
    let (mut out, good_end) = replay_from(path, BufReader::new(file), len)?;
    if good_end < len {
        out.truncated = len - good_end;
        let f = OpenOptions::new().write(true).open(path).map_err(io)?;
        f.set_len(good_end).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    Ok(out)
}

/// Replays `len` bytes from `reader`; returns the state and where the last
/// whole record ends (a torn last record is left out, not an error).
fn replay_from(
    path: &Path,
    mut reader: impl BufRead,
    len: u64,
) -> Result<(Replayed, u64), JournalError> {
    let io = |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut out = Replayed::default();
    let mut good_end = 0u64;
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let complete = buf.last() == Some(&b'\n');
        let parsed = serde_json::from_slice::<Record>(&buf);
        match parsed {
            Ok(r) if complete => {
                if line_no == 1 {
                    match r {
                        Record::Header { version } if version == VERSION => {}
                        Record::Header { version } => {
                            return Err(JournalError::Version {
                                path: path.into(),
                                found: version,
                            })
                        }
                        _ => {
                            return Err(JournalError::Corrupt {
                                path: path.into(),
                                line: 1,
                                reason: "no header".into(),
                            })
                        }
                    }
                }
                out.apply(r);
                good_end += n as u64;
            }
            // The last line, unterminated or cut mid-record: a torn write.
            _ if good_end + n as u64 == len => break,
            Ok(_) => unreachable!("complete lines parse or fail above"),
            Err(e) => {
                return Err(JournalError::Corrupt {
                    path: path.into(),
                    line: line_no,
                    reason: e.to_string(),
                })
            }
        }
    }
    if good_end < len {
        out.truncated = len - good_end;
    }
    Ok((out, good_end))
}

/// Handle to the journal: appends queue bytes in order, commits make them
/// durable. Group commit without a thread of its own: whoever waits first
/// writes and syncs everything queued so far, and the others find their
/// record already synced.
#[derive(Debug, Clone)]
pub struct Journal {
    shared: Arc<Shared>,
}

/// Bounds of the journal's write-and-sync histogram, seconds: tens of
/// microseconds on tmpfs up to a disk's hundreds of milliseconds.
const SYNC_BUCKETS: [f64; 9] = [
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.25,
];

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    queue: Mutex<Queue>,
    file: tokio::sync::Mutex<FileState>,
    /// A write failed: the file may end in a torn record, so appending is
    /// over until a whole snapshot replaces it ([`Journal::compact`]).
    broken: AtomicBool,
    /// Test hook: this many coming writes fail with ENOSPC, half written.
    fail_writes: AtomicU32,
    /// The journal's length in bytes as last written.
    bytes: AtomicU64,
    /// How long each write and its sync took, seconds.
    sync_seconds: Histogram,
}

#[derive(Debug, Default)]
struct Queue {
    buf: Vec<u8>,
    /// Sequence number of the last record queued.
    last: u64,
    /// The queue holds a whole snapshot that replaces the file.
    rewrite: bool,
}

#[derive(Debug)]
struct FileState {
    store: Box<dyn Store>,
    /// Everything up to this sequence number is on disk.
    synced: u64,
    /// A failed write leaves the file in an unknown state: every later
    /// commit fails until a snapshot rewrites the file.
    broken: Option<String>,
}

/// A queued record; [`Durable::wait`] returns once it is on disk.
#[must_use = "an assignment must not be acknowledged before it is durable"]
#[derive(Debug)]
pub struct Durable {
    shared: Arc<Shared>,
    seq: u64,
}

impl Durable {
    /// Waiters queue on an async lock, so none blocks a worker while another
    /// syncs. The sync itself runs inline: microseconds on tmpfs, where the
    /// journal belongs; on a disk each sync holds one worker for its length.
    pub async fn wait(self) -> Result<(), JournalError> {
        let mut f = self.shared.file.lock().await;
        self.shared.flush_upto(&mut f, self.seq)
    }
}

impl Shared {
    fn flush_upto(&self, f: &mut FileState, seq: u64) -> Result<(), JournalError> {
        if f.synced >= seq {
            return Ok(());
        }
        if let Some(e) = &f.broken {
            // Only a whole snapshot can follow a torn write.
            if !self.queue.lock().expect("journal queue lock").rewrite {
                return Err(JournalError::Unusable {
                    path: self.path.clone(),
                    reason: e.clone(),
                });
            }
        }
        let (bytes, last, rewrite) = {
            let mut q = self.queue.lock().expect("journal queue lock");
            (
                std::mem::take(&mut q.buf),
                q.last,
                std::mem::take(&mut q.rewrite),
            )
        };
        let injected = self
            .fail_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let started = std::time::Instant::now();
        let result = if injected {
            let half = &bytes[..bytes.len() / 2];
            let _ = f.store.append(half);
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        } else if rewrite {
            f.store.rewrite(&bytes)
        } else {
            f.store.append(&bytes)
        };
        self.sync_seconds.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                let len = bytes.len() as u64;
                if rewrite {
                    self.bytes.store(len, Ordering::Relaxed);
                } else {
                    self.bytes.fetch_add(len, Ordering::Relaxed);
                }
                if f.broken.take().is_some() {
                    tracing::info!(path = %self.path.display(), "journal rewritten after a failed write; recording again");
                }
                self.broken.store(false, Ordering::SeqCst);
                f.synced = last;
                Ok(())
            }
            Err(e) => {
                let e = e.to_string();
                f.broken = Some(e.clone());
                self.broken.store(true, Ordering::SeqCst);
                // What was taken from the queue is lost: whoever waits for
                // it fails, and the next snapshot says it all again.
                Err(JournalError::Write {
                    path: self.path.clone(),
                    reason: e,
                })
            }
        }
    }
}

impl Journal {
    /// Opens the journal at `path`, first rewriting it to `initial`
    /// (usually the replayed state, which compacts it at every start).
    pub fn open(path: &Path, initial: Vec<Record>) -> Result<Self, JournalError> {
        let mut buf = Vec::new();
        encode(&initial, &mut buf);
        let store = FileStore::create(path, &buf).map_err(|source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::with_store(Box::new(store), buf.len()))
    }

    /// A journal in memory, its content replaced by `initial`.
    pub fn in_memory(mut store: MemStore, initial: Vec<Record>) -> Self {
        let mut buf = Vec::new();
        encode(&initial, &mut buf);
        store.rewrite(&buf).expect("memory never fails");
        Self::with_store(Box::new(store), buf.len())
    }

    fn with_store(store: Box<dyn Store>, len: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                path: store.path().to_path_buf(),
                queue: Mutex::new(Queue::default()),
                file: tokio::sync::Mutex::new(FileState {
                    store,
                    synced: 0,
                    broken: None,
                }),
                broken: AtomicBool::new(false),
                fail_writes: AtomicU32::new(0),
                bytes: AtomicU64::new(len as u64),
                sync_seconds: Histogram::new(SYNC_BUCKETS),
            }),
        }
    }

    /// The journal's length in bytes as last written (it shrinks at each
    /// compaction).
    pub fn size_bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    /// Durations of the journal's writes with their sync, in seconds (a
    /// handle on the live histogram, for `/metrics`).
    pub fn sync_seconds(&self) -> Histogram {
        self.shared.sync_seconds.clone()
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// A write failed and no snapshot has replaced the file since: the
    /// next append must be a whole snapshot ([`Journal::compact`]).
    pub fn needs_rewrite(&self) -> bool {
        self.shared.broken.load(Ordering::SeqCst)
    }

    /// Test hook: the next `n` writes fail with ENOSPC after writing half
    /// their bytes, as a full disk does; 0 ends it.
    #[doc(hidden)]
    pub fn fail_next_writes(&self, n: u32) {
        self.shared.fail_writes.store(n, Ordering::SeqCst);
    }

    /// Queues records (call this under the lock that orders the state
    /// changes they describe); wait on the result before acknowledging.
    /// An empty list is a barrier: it is durable once all before it are.
    pub fn append(&self, records: Vec<Record>) -> Durable {
        let mut q = self.shared.queue.lock().expect("journal queue lock");
        encode(&records, &mut q.buf);
        q.last += 1;
        Durable {
            shared: self.shared.clone(),
            seq: q.last,
        }
    }

    /// Replaces the journal by a snapshot of the current state. Records
    /// queued before it are dropped: the snapshot already says what they say.
    pub fn compact(&self, snapshot: Vec<Record>) -> Durable {
        let mut q = self.shared.queue.lock().expect("journal queue lock");
        q.buf.clear();
        encode(&snapshot, &mut q.buf);
        q.rewrite = true;
        q.last += 1;
        Durable {
            shared: self.shared.clone(),
            seq: q.last,
        }
    }
}

fn encode(records: &[Record], out: &mut Vec<u8>) {
    for r in records {
        serde_json::to_writer(&mut *out, r).expect("records serialize");
        out.push(b'\n');
    }
}

/// Writes `bytes` to a temporary file, syncs it, renames it over `path` and
/// syncs the directory; returns the new file open for appending.
fn rewrite_file(path: &Path, bytes: &[u8]) -> std::io::Result<File> {
    let tmp = path.with_extension("compact");
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        // A partial snapshot must not take the space the next try needs.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    let mut f = OpenOptions::new().append(true).open(path)?;
    f.seek(SeekFrom::End(0))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: &str) -> PodKey {
        PodKey {
            network: "vpc".into(),
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn a_pods_namespace_identity_survives_replay_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipamd.journal");
        let j = Journal::open(&path, Replayed::default().to_records()).unwrap();
        let records = vec![
            Record::Assign {
                key: key("a"),
                ip: ip("10.0.0.5"),
                netns: Some("/proc/42/ns/net".into()),
                netns_id: Some((4, 4026532000)),
                pod: None,
            },
            // Written before identities were recorded.
            Record::Assign {
                key: key("b"),
                ip: ip("10.0.0.6"),
                netns: Some("/var/run/netns/b".into()),
                netns_id: None,
                pod: None,
            },
        ];
        j.append(records).wait().await.unwrap();
        let r = replay(&path).unwrap();
        let want = |p: &str, dev, ino| NetnsRef {
            path: p.into(),
            dev,
            ino,
        };
        assert_eq!(r.netns[&key("a")], want("/proc/42/ns/net", 4, 4026532000));
        assert_eq!(r.netns[&key("b")], want("/var/run/netns/b", 0, 0));
        // Compaction writes the same facts back.
        let mut again = Replayed::default();
        for rec in r.to_records() {
            again.apply(rec);
        }
        assert_eq!(again.netns, r.netns);
    }

    #[tokio::test]
    async fn pod_names_replay_and_survive_compaction_and_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipamd.journal");
        let j = Journal::open(&path, Replayed::default().to_records()).unwrap();
        let web = PodName {
            namespace: "shop".into(),
            name: "web-0".into(),
        };
        j.append(vec![
            Record::Assign {
                key: key("a"),
                ip: ip("10.0.0.5"),
                netns: None,
                netns_id: None,
                pod: Some(web.clone()),
            },
            Record::Assign {
                key: key("b"),
                ip: ip("10.0.0.6"),
                netns: None,
                netns_id: None,
                pod: Some(PodName {
                    namespace: "shop".into(),
                    name: "db-0".into(),
                }),
            },
            Record::Release {
                key: key("b"),
                ip: ip("10.0.0.6"),
                at_ms: 1,
            },
        ])
        .wait()
        .await
        .unwrap();
        // A line from a journal written before pod names were recorded.
        let old = r#"{"op":"assign","key":{"network":"n","container_id":"c","ifname":"eth0"},"ip":"10.0.0.7"}"#;
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        writeln!(f, "{old}").unwrap();
        let r = replay(&path).unwrap();
        assert_eq!(r.pods.len(), 1, "{:?}", r.pods);
        assert_eq!(r.pods[&key("a")], web);
        assert_eq!(r.assignments.len(), 2);
        let mut again = Replayed::default();
        for rec in r.to_records() {
            again.apply(rec);
        }
        assert_eq!(again.pods, r.pods);
        assert_eq!(web.to_string(), "shop/web-0");
        assert_eq!(PodName::parse("shop/web-0"), Some(web));
        assert_eq!(PodName::parse("web-0"), None);
        assert_eq!(PodName::parse("a/b/c"), None);
    }

    #[tokio::test]
    async fn appended_records_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipamd.journal");
        let j = Journal::open(&path, Replayed::default().to_records()).unwrap();
        j.append(vec![Record::Assign {
            key: key("a"),
            ip: ip("10.0.0.5"),
            netns: None,
            netns_id: None,
            pod: None,
        }])
        .wait()
        .await
        .unwrap();
        j.append(vec![Record::Assign {
            key: key("b"),
            ip: ip("10.0.0.6"),
            netns: None,
            netns_id: None,
            pod: None,
        }])
        .wait()
        .await
        .unwrap();
        j.append(vec![Record::Release {
            key: key("a"),
            ip: ip("10.0.0.5"),
            at_ms: 7,
        }])
        .wait()
        .await
        .unwrap();
        j.append(vec![Record::PendingDelete {
            interface_id: "eni-1".into(),
        }])
        .wait()
        .await
        .unwrap();
        let r = replay(&path).unwrap();
        assert_eq!(r.assignments.len(), 1);
        assert_eq!(r.assignments[&key("b")], ip("10.0.0.6"));
        assert_eq!(r.released_at[&ip("10.0.0.5")], 7);
        assert!(r.pending_deletes.contains("eni-1"));
    }

    #[tokio::test]
    async fn torn_last_line_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let j = Journal::open(&path, Replayed::default().to_records()).unwrap();
        j.append(vec![Record::Assign {
            key: key("a"),
            ip: ip("10.0.0.5"),
            netns: None,
            netns_id: None,
            pod: None,
        }])
        .wait()
        .await
        .unwrap();
        drop(j);
        let before = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"op":"assign","key":{"netw"#).unwrap();
        drop(f);
        let r = replay(&path).unwrap();
        assert_eq!(r.assignments.len(), 1);
        assert!(r.truncated > 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
    }

    #[test]
    fn damage_in_the_middle_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        std::fs::write(
            &path,
            "{\"op\":\"header\",\"version\":1}\nGARBAGE\n{\"op\":\"deleted\",\"interface_id\":\"x\"}\n",
        )
        .unwrap();
        let e = replay(&path).unwrap_err();
        assert!(matches!(e, JournalError::Corrupt { line: 2, .. }), "{e}");
    }

    #[test]
    fn unknown_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        std::fs::write(&path, "{\"op\":\"header\",\"version\":99}\n").unwrap();
        assert!(matches!(
            replay(&path).unwrap_err(),
            JournalError::Version { found: 99, .. }
        ));
    }

    #[tokio::test]
    async fn compaction_keeps_the_state_and_shrinks_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let j = Journal::open(&path, Replayed::default().to_records()).unwrap();
        for i in 0..200u32 {
            let k = key(&format!("c{i}"));
            let a = Ipv4Addr::from(0x0a00_0000 + i);
            // Queued only; the barrier below makes them durable.
            let _ = j.append(vec![Record::Assign {
                key: k.clone(),
                ip: a,
                netns: None,
                netns_id: None,
                pod: None,
            }]);
            if i % 2 == 0 {
                let _ = j.append(vec![Record::Release {
                    key: k,
                    ip: a,
                    at_ms: 1,
                }]);
            }
        }
        j.append(vec![]).wait().await.unwrap();
        let full = replay(&path).unwrap();
        let size_before = std::fs::metadata(&path).unwrap().len();
        j.compact(full.to_records()).wait().await.unwrap();
        j.append(vec![Record::Assign {
            key: key("after"),
            ip: ip("10.9.9.9"),
            netns: None,
            netns_id: None,
            pod: None,
        }])
        .wait()
        .await
        .unwrap();
        let compacted = replay(&path).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() < size_before);
        assert_eq!(compacted.assignments.len(), full.assignments.len() + 1);
        assert_eq!(compacted.released_at, full.released_at);
    }
}
