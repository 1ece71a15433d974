//! Append-only journal of assignments, releases and in-flight cloud
//! operations. Nothing is acknowledged before its record is on disk.
//!
//! Format: JSON lines; the first is a header with the format version. A torn
//! last line (a crash mid-write) is cut off on open; damage anywhere else
//! stops the daemon rather than guessing.
//!
//! One writer thread owns the file. Callers queue records (in the order they
//! changed the in-memory state, since they queue under the same lock) and get
//! a receiver that fires once the batch holding their record is synced: group
//! commit, so 64 concurrent ADDs cost one fsync, not 64.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::datastore::PodKey;

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
            Record::Assign { key, ip } => {
                self.released_at.remove(&ip);
                // An address has one holder: a later assignment of it means
                // the earlier holder's release was not written.
                self.assignments.retain(|_, held| *held != ip);
                self.assignments.insert(key, ip);
            }
            Record::Release { key, ip, at_ms } => {
                if self.assignments.get(&key) == Some(&ip) {
                    self.assignments.remove(&key);
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
        v.extend(self.assignments.iter().map(|(k, ip)| Record::Assign {
            key: k.clone(),
            ip: *ip,
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
    #[error("the journal writer has stopped")]
    Closed,
}

/// Reads the journal, cutting off a torn last line.
pub fn replay(path: &Path) -> Result<Replayed, JournalError> {
    let io = |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut out = Replayed::default();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(e)),
    };
    let len = file.metadata().map_err(io)?.len();
    let mut reader = BufReader::new(file);
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
        let f = OpenOptions::new().write(true).open(path).map_err(io)?;
        f.set_len(good_end).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    Ok(out)
}

type Ack = oneshot::Sender<Result<(), String>>;

enum Msg {
    Append(Vec<Record>, Ack),
    /// Replace the file by these records (a snapshot), atomically.
    Rewrite(Vec<Record>, Ack),
}

/// Handle to the journal writer thread.
#[derive(Debug, Clone)]
pub struct Journal {
    tx: mpsc::Sender<Msg>,
    path: PathBuf,
}

/// Resolves once the record is durable.
pub type Durable = oneshot::Receiver<Result<(), String>>;

impl Journal {
    /// Starts the writer on `path`, first rewriting it to `initial`
    /// (usually the replayed state, which compacts it at every start).
    pub fn open(path: &Path, initial: Vec<Record>) -> Result<Self, JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = rewrite(path, &initial).map_err(io)?;
        let (tx, rx) = mpsc::channel::<Msg>();
        let thread_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || writer(thread_path, file, rx))
            .map_err(io)?;
        Ok(Self {
            tx,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues records; the receiver resolves when they are synced.
    pub fn append(&self, records: Vec<Record>) -> Durable {
        let (ack, done) = oneshot::channel();
        if let Err(mpsc::SendError(Msg::Append(_, ack) | Msg::Rewrite(_, ack))) =
            self.tx.send(Msg::Append(records, ack))
        {
            ack.send(Err(JournalError::Closed.to_string())).ok();
        }
        done
    }

    /// Replaces the journal by a snapshot, in order with appends.
    pub fn compact(&self, snapshot: Vec<Record>) -> Durable {
        let (ack, done) = oneshot::channel();
        if let Err(mpsc::SendError(Msg::Append(_, ack) | Msg::Rewrite(_, ack))) =
            self.tx.send(Msg::Rewrite(snapshot, ack))
        {
            ack.send(Err(JournalError::Closed.to_string())).ok();
        }
        done
    }
}

fn encode(records: &[Record], out: &mut Vec<u8>) {
    for r in records {
        serde_json::to_writer(&mut *out, r).expect("records serialize");
        out.push(b'\n');
    }
}

/// Writes `records` to a temporary file, syncs it, renames it over `path`
/// and syncs the directory; returns the new file open for appending.
fn rewrite(path: &Path, records: &[Record]) -> std::io::Result<File> {
    let tmp = path.with_extension("compact");
    let mut buf = Vec::new();
    encode(records, &mut buf);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    let mut f = OpenOptions::new().append(true).open(path)?;
    f.seek(SeekFrom::End(0))?;
    Ok(f)
}

fn writer(path: PathBuf, mut file: File, rx: mpsc::Receiver<Msg>) {
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Ok(first) = rx.recv() {
        let mut pending = vec![first];
        while let Ok(m) = rx.try_recv() {
            pending.push(m);
        }
        // Appends are batched under one sync; a rewrite flushes the batch
        // before it and starts a new file.
        let mut acks: Vec<Ack> = Vec::new();
        let mut result: Result<(), String> = Ok(());
        for m in pending {
            match m {
                Msg::Append(records, ack) => {
                    encode(&records, &mut buf);
                    acks.push(ack);
                }
                Msg::Rewrite(records, ack) => {
                    result = result.and_then(|_| flush(&mut file, &mut buf));
                    if result.is_ok() {
                        match rewrite(&path, &records) {
                            Ok(f) => file = f,
                            Err(e) => result = Err(e.to_string()),
                        }
                    }
                    acks.push(ack);
                }
            }
        }
        result = result.and_then(|_| flush(&mut file, &mut buf));
        buf.clear();
        for ack in acks {
            ack.send(result.clone()).ok();
        }
    }
}

fn flush(file: &mut File, buf: &mut Vec<u8>) -> Result<(), String> {
    if buf.is_empty() {
        return Ok(());
    }
    let r = file
        .write_all(buf)
        .and_then(|_| file.sync_data())
        .map_err(|e| e.to_string());
    buf.clear();
    r
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
    async fn appended_records_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipamd.journal");
        let j = Journal::open(&path, Replayed::default().to_records()).unwrap();
        j.append(vec![Record::Assign {
            key: key("a"),
            ip: ip("10.0.0.5"),
        }])
        .await
        .unwrap()
        .unwrap();
        j.append(vec![Record::Assign {
            key: key("b"),
            ip: ip("10.0.0.6"),
        }])
        .await
        .unwrap()
        .unwrap();
        j.append(vec![Record::Release {
            key: key("a"),
            ip: ip("10.0.0.5"),
            at_ms: 7,
        }])
        .await
        .unwrap()
        .unwrap();
        j.append(vec![Record::PendingDelete {
            interface_id: "eni-1".into(),
        }])
        .await
        .unwrap()
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
        }])
        .await
        .unwrap()
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
            j.append(vec![Record::Assign {
                key: k.clone(),
                ip: a,
            }]);
            if i % 2 == 0 {
                j.append(vec![Record::Release {
                    key: k,
                    ip: a,
                    at_ms: 1,
                }]);
            }
        }
        j.append(vec![]).await.unwrap().unwrap();
        let full = replay(&path).unwrap();
        let size_before = std::fs::metadata(&path).unwrap().len();
        j.compact(full.to_records()).await.unwrap().unwrap();
        j.append(vec![Record::Assign {
            key: key("after"),
            ip: ip("10.9.9.9"),
        }])
        .await
        .unwrap()
        .unwrap();
        let compacted = replay(&path).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() < size_before);
        assert_eq!(compacted.assignments.len(), full.assignments.len() + 1);
        assert_eq!(compacted.released_at, full.released_at);
    }
}
