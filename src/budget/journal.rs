//! The ledger's file: an append-only journal of settled spend.
//!
//! Each group commit appends one record holding the whole [`Spend`] of every account it touched,
//! then `fdatasync`s: one write and one flush per commit, where a B-tree store writes several
//! pages. Reading the file back replays the records in order; the last value of an account wins.
//! A record carries its length and a checksum, so a commit cut short by a crash is recognised at
//! the end of the file and dropped (it was never durable, so nothing acknowledged is lost). When
//! the journal has grown well past what it describes, it is rewritten as one record through a
//! temporary file and a rename.
//!
//! Layout: the 8-byte [`MAGIC`], then records of `length: u32 LE`, `checksum: [u8; 8]` (the first
//! 8 bytes of the SHA-256 of the payload) and the payload: entries of `id length: u16 LE`, the id
//! in UTF-8 and the encoded [`Spend`].

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::spend::Spend;

/// "SWYLDG", then the format version.
const MAGIC: [u8; 8] = *b"SWYLDG\x00\x01";
const RECORD_HEAD: usize = 4 + 8;
/// The journal is rewritten once it is this large and [`COMPACT_RATIO`] times what it describes.
const COMPACT_AT: u64 = 4 << 20;
const COMPACT_RATIO: u64 = 4;

const FILE_NAME: &str = "ledger.journal";

pub(super) struct Journal {
    /// Held for the journal's life: one process owns a directory.
    _lock: File,
    dir: PathBuf,
    file: File,
    /// Where the next record goes: the end of the last complete one.
    end: u64,
    /// Every account's spend as the file holds it, for rewriting the file.
    latest: HashMap<String, Spend>,
    /// [`COMPACT_AT`]; smaller in tests.
    compact_at: u64,
}

impl Journal {
    /// Opens (or creates) `dir/ledger.journal` and reads back the spend it holds. An incomplete
    /// last record (a crash during a commit) is cut off.
    pub(super) fn open(dir: &Path) -> Result<(Journal, HashMap<String, Spend>), String> {
        let lock = lock_dir(dir)?;
        let path = dir.join(FILE_NAME);
        let context = |e: io::Error| format!("cannot open {}: {e}", path.display());
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(context)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(context)?;
        let (latest, end) = if bytes.is_empty() {
            file.write_all_at(&MAGIC, 0).map_err(context)?;
            file.sync_all().map_err(context)?;
            sync_dir(dir).map_err(context)?;
            (HashMap::new(), MAGIC.len() as u64)
        } else {
            let (latest, end) = replay(&bytes).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if end < bytes.len() {
                tracing::warn!(
                    path = %path.display(),
                    dropped_bytes = bytes.len() - end,
                    "the ledger's last commit was incomplete (a crash while writing it); it is dropped"
                );
                file.set_len(end as u64).map_err(context)?;
                file.sync_all().map_err(context)?;
            }
            (latest, end as u64)
        };
        let snapshot = latest.clone();
        Ok((Journal { _lock: lock, dir: dir.to_path_buf(), file, end, latest, compact_at: COMPACT_AT }, snapshot))
    }

    /// Appends one record with `dirty`'s spend and flushes it to disk. After an error the file
    /// ends where it did before, as far as reading it back is concerned, and the call can be
    /// retried.
    pub(super) fn append(&mut self, dirty: &[(String, Spend)]) -> io::Result<()> {
        let record = encode_record(dirty.iter().map(|(id, spend)| (id.as_str(), spend)))?;
        self.file.write_all_at(&record, self.end)?;
        self.file.sync_data()?;
        self.end += record.len() as u64;
        for (id, spend) in dirty {
            match self.latest.get_mut(id) {
                Some(latest) => *latest = *spend,
                None => {
                    self.latest.insert(id.clone(), *spend);
                }
            }
        }
        if self.end >= self.compact_at {
            let described = self.latest.keys().map(|id| entry_len(id)).sum::<usize>() as u64;
            if self.end >= COMPACT_RATIO * described {
                // A failed rewrite leaves the journal as it was: it is retried at the next commit.
                if let Err(e) = self.rewrite() {
                    tracing::warn!(error = %e, "cannot compact the ledger journal; it keeps growing until this succeeds");
                }
            }
        }
        Ok(())
    }

    /// Writes the latest spend of every account as a new journal of one record, then renames it
    /// over the old one.
    fn rewrite(&mut self) -> io::Result<()> {
        let record = encode_record(self.latest.iter().map(|(id, spend)| (id.as_str(), spend)))?;
        let tmp: PathBuf = self.dir.join(format!("{FILE_NAME}.tmp"));
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
        file.write_all_at(&MAGIC, 0)?;
        file.write_all_at(&record, MAGIC.len() as u64)?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(FILE_NAME))?;
        sync_dir(&self.dir)?;
        self.file = file;
        self.end = (MAGIC.len() + record.len()) as u64;
        Ok(())
    }
}

/// Takes `dir/ledger.lock`: two processes appending to one journal would overwrite each other's
/// commits. The lock is the kernel's (`flock`), so a crashed process leaves none behind.
fn lock_dir(dir: &Path) -> Result<File, String> {
    let path = dir.join("ledger.lock");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "the ledger in {} is in use by another process (each sidecar needs its own --state-dir)",
            dir.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn entry_len(id: &str) -> usize {
    2 + id.len() + Spend::ENCODED_LEN
}

fn checksum(payload: &[u8]) -> [u8; 8] {
    let digest = Sha256::digest(payload);
    let mut out = [0; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

fn encode_record<'a>(entries: impl Iterator<Item = (&'a str, &'a Spend)> + Clone) -> io::Result<Vec<u8>> {
    let payload_len: usize = entries.clone().map(|(id, _)| entry_len(id)).sum();
    let length = u32::try_from(payload_len).map_err(|_| io::Error::other("a ledger record over 4 GiB"))?;
    let mut record = Vec::with_capacity(RECORD_HEAD + payload_len);
    record.extend_from_slice(&length.to_le_bytes());
    record.extend_from_slice(&[0; 8]);
    for (id, spend) in entries {
        let id_len = u16::try_from(id.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a budget id over 64 KiB"))?;
        record.extend_from_slice(&id_len.to_le_bytes());
        record.extend_from_slice(id.as_bytes());
        spend.encode_into(&mut record);
    }
    let sum = checksum(&record[RECORD_HEAD..]);
    record[4..RECORD_HEAD].copy_from_slice(&sum);
    Ok(record)
}

/// The spend a journal holds, and where its last complete record ends. A record that is cut
/// short or fails its checksum ends the journal: only the last commit can be incomplete. A
/// complete record that cannot be decoded is an error, never skipped: it may be spend.
fn replay(bytes: &[u8]) -> Result<(HashMap<String, Spend>, usize), String> {
    if bytes.len() < MAGIC.len() || bytes[..6] != MAGIC[..6] {
        return Err("not a Switchyard ledger journal".into());
    }
    if bytes[..MAGIC.len()] != MAGIC {
        return Err(format!("ledger journal format {} is not supported by this version", bytes[7]));
    }
    let mut latest = HashMap::new();
    let mut at = MAGIC.len();
    while let Some(head) = bytes.get(at..at + RECORD_HEAD) {
        let length = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let Some(payload) = bytes.get(at + RECORD_HEAD..at + RECORD_HEAD + length) else { break };
        if head[4..] != checksum(payload) {
            break;
        }
        decode_entries(payload, &mut latest).ok_or_else(|| format!("the record at byte {at} is malformed"))?;
        at += RECORD_HEAD + length;
    }
    Ok((latest, at))
}

fn decode_entries(mut payload: &[u8], into: &mut HashMap<String, Spend>) -> Option<()> {
    while !payload.is_empty() {
        let (len, rest) = payload.split_first_chunk::<2>()?;
        let len = u16::from_le_bytes(*len) as usize;
        let (id, rest) = rest.split_at_checked(len)?;
        let (spend, rest) = rest.split_at_checked(Spend::ENCODED_LEN)?;
        into.insert(std::str::from_utf8(id).ok()?.to_string(), Spend::decode(spend)?);
        payload = rest;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spend(spent: u64) -> Spend {
        Spend { period_start: 1_700_000_000, spent, total: spent * 2, ..Spend::default() }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("switchyard-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_last_value_of_each_account_wins() {
        let dir = temp_dir("replay");
        let (mut journal, empty) = Journal::open(&dir).unwrap();
        assert!(empty.is_empty());
        journal.append(&[("a".into(), spend(1)), ("b".into(), spend(2))]).unwrap();
        journal.append(&[("a".into(), spend(3))]).unwrap();
        drop(journal);
        let (_, stored) = Journal::open(&dir).unwrap();
        assert_eq!(stored, HashMap::from([("a".into(), spend(3)), ("b".into(), spend(2))]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_commit_cut_short_is_dropped_and_writing_goes_on_after_the_last_complete_one() {
        let dir = temp_dir("torn");
        let (mut journal, _) = Journal::open(&dir).unwrap();
        journal.append(&[("a".into(), spend(1))]).unwrap();
        let complete = std::fs::metadata(dir.join(FILE_NAME)).unwrap().len();
        journal.append(&[("a".into(), spend(5))]).unwrap();
        drop(journal);
        // A crash in the middle of the second commit: part of its record reached the disk.
        let file = OpenOptions::new().write(true).open(dir.join(FILE_NAME)).unwrap();
        file.set_len(complete + 30).unwrap();
        drop(file);

        let (mut journal, stored) = Journal::open(&dir).unwrap();
        assert_eq!(stored["a"], spend(1));
        assert_eq!(std::fs::metadata(dir.join(FILE_NAME)).unwrap().len(), complete, "the torn record is cut off");
        journal.append(&[("a".into(), spend(7))]).unwrap();
        drop(journal);
        assert_eq!(Journal::open(&dir).unwrap().1["a"], spend(7));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_record_that_fails_its_checksum_ends_the_journal() {
        let dir = temp_dir("checksum");
        let (mut journal, _) = Journal::open(&dir).unwrap();
        journal.append(&[("a".into(), spend(1))]).unwrap();
        let first_end = journal.end;
        journal.append(&[("a".into(), spend(2))]).unwrap();
        drop(journal);
        let mut bytes = std::fs::read(dir.join(FILE_NAME)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert_eq!(replay(&bytes).unwrap(), (HashMap::from([("a".into(), spend(1))]), first_end as usize));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_process_at_a_time_owns_a_directory() {
        let dir = temp_dir("lock");
        let (journal, _) = Journal::open(&dir).unwrap();
        let error = Journal::open(&dir).err().unwrap();
        assert!(error.contains("is in use by another process"), "{error}");
        drop(journal);
        assert!(Journal::open(&dir).is_ok(), "free again once the owner is gone");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn files_that_are_not_a_journal_are_refused_not_overwritten() {
        assert_eq!(replay(b"\x00\x00\x00\x00redb...").unwrap_err(), "not a Switchyard ledger journal");
        assert!(replay(b"SWYLDG\x00\x09").unwrap_err().contains("format 9 is not supported"));
        let dir = temp_dir("foreign");
        std::fs::write(dir.join(FILE_NAME), b"something else entirely").unwrap();
        let error = Journal::open(&dir).err().unwrap();
        assert!(error.contains("not a Switchyard ledger journal"), "{error}");
        assert_eq!(std::fs::read(dir.join(FILE_NAME)).unwrap(), b"something else entirely");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_grown_journal_is_rewritten_as_one_record_without_losing_spend() {
        let dir = temp_dir("compact");
        let (mut journal, _) = Journal::open(&dir).unwrap();
        journal.compact_at = 16 << 10;
        let ids: Vec<String> = (0..10).map(|i| format!("ns/key-{i}")).collect();
        let mut commits = 0u64;
        while commits < 10_000 {
            commits += 1;
            let id = &ids[(commits % 10) as usize];
            journal.append(&[(id.clone(), spend(commits))]).unwrap();
            if journal.end < 1024 && commits > 10 {
                break;
            }
        }
        assert!(commits < 10_000, "the journal was never rewritten");
        let size = std::fs::metadata(dir.join(FILE_NAME)).unwrap().len();
        assert!(size < 2048, "rewritten to one record: {size} bytes");
        assert!(!dir.join(format!("{FILE_NAME}.tmp")).exists());
        journal.append(&[(ids[0].clone(), spend(1))]).unwrap();
        drop(journal);
        let (_, stored) = Journal::open(&dir).unwrap();
        assert_eq!(stored.len(), 10);
        assert_eq!(stored[&ids[0]], spend(1));
        assert_eq!(stored[&ids[(commits % 10) as usize]], spend(commits));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
