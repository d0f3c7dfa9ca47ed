//! The ledger's file: an append-only journal of settled spend.
//!
//! Each group commit appends one record holding the whole [`Spend`] of every account it touched,
//! then `fdatasync`s: one write and one flush per commit, where a B-tree store writes several
//! pages. Reading the file back replays the records in order; the last value of an account wins.
//! A record carries its length and a checksum, so a commit cut short by a crash is recognised at
//! the end of the file and dropped (it was never durable, so nothing acknowledged is lost).
//! Damage anywhere else is corruption, not a crash: the damaged bytes are skipped up to the next
//! record that checks out (records hold whole totals, so later records still count), a copy of
//! the damaged file is kept beside it, and the journal is rewritten without the damage. When the
//! journal has grown well past what it describes, it is rewritten as one record through a
//! temporary file and a rename.
//!
//! Layout: the 8-byte [`MAGIC`], then records of `length: u32 LE`, `checksum: [u8; 8]` (the first
//! 8 bytes of the SHA-256 of the payload) and the payload: entries of `id length: u16 LE`, the id
//! in UTF-8 and the encoded [`Spend`].

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::ops::Range;
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
const TEMP_NAME: &str = "ledger.journal.tmp";

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
    /// A rewrite renamed the new file into place but the directory is not known to be synced: no
    /// append counts as durable until it is.
    dir_unsynced: bool,
    /// Tests stop a rewrite after this step, as a crash there would.
    #[cfg(test)]
    crash_after: Option<RewriteStep>,
}

/// What [`Journal::open`] found damaged and skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Damage {
    /// Damaged stretches of the file, each skipped up to the next record that checks out.
    pub regions: u64,
    pub bytes: u64,
    /// Where the damaged file was copied to, before it was rewritten.
    pub copy: Option<PathBuf>,
}

/// The steps of [`Journal::rewrite`], for tests that crash after each.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RewriteStep {
    TempWritten,
    TempSynced,
    Renamed,
}

impl Journal {
    /// Opens (or creates) `dir/ledger.journal` and reads back the spend it holds. An incomplete
    /// last record (a crash during a commit) is cut off; damaged records elsewhere are skipped,
    /// reported in the returned [`Damage`], and the file is rewritten without them after a copy
    /// of it is kept.
    pub(super) fn open(dir: &Path) -> Result<(Journal, HashMap<String, Spend>, Damage), String> {
        let lock = lock_dir(dir)?;
        let path = dir.join(FILE_NAME);
        let context = |e: io::Error| format!("cannot open {}: {e}", path.display());
        // A rewrite that crashed before its rename left this; the journal itself is whole.
        let _ = std::fs::remove_file(dir.join(TEMP_NAME));
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(context)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(context)?;
        let mut journal = Journal {
            _lock: lock,
            dir: dir.to_path_buf(),
            file,
            end: MAGIC.len() as u64,
            latest: HashMap::new(),
            compact_at: COMPACT_AT,
            dir_unsynced: false,
            #[cfg(test)]
            crash_after: None,
        };
        // A crash while the file was being created can leave part of the magic, or nothing.
        if MAGIC.starts_with(&bytes) {
            journal.file.set_len(0).map_err(context)?;
            journal.file.write_all_at(&MAGIC, 0).map_err(context)?;
            journal.file.sync_all().map_err(context)?;
            sync_dir(dir).map_err(context)?;
            return Ok((journal, HashMap::new(), Damage::default()));
        }
        let replayed = replay(&bytes).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        journal.latest = replayed.latest;
        journal.end = replayed.end as u64;
        let mut damage = Damage { regions: replayed.damaged.len() as u64, ..Damage::default() };
        for range in &replayed.damaged {
            damage.bytes += (range.end - range.start) as u64;
            tracing::error!(
                path = %path.display(),
                from_byte = range.start,
                to_byte = range.end,
                "the ledger journal is damaged here (not a crash while writing: good records follow); skipping to the next good record"
            );
        }
        if replayed.end < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = bytes.len() - replayed.end,
                "the ledger's last commit was incomplete (a crash while writing it); it is dropped"
            );
        }
        if !replayed.damaged.is_empty() {
            let copy = dir.join(format!("{FILE_NAME}.damaged-{}", unix_seconds()));
            std::fs::write(&copy, &bytes)
                .map_err(|e| format!("cannot keep a copy of the damaged journal at {}: {e}", copy.display()))?;
            tracing::error!(copy = %copy.display(), damaged_regions = damage.regions, damaged_bytes = damage.bytes, "kept a copy of the damaged ledger journal; rewriting it from the records that check out");
            journal.rewrite().map_err(context)?;
            damage.copy = Some(copy);
        } else if replayed.end < bytes.len() {
            journal.file.set_len(journal.end).map_err(context)?;
            journal.file.sync_all().map_err(context)?;
        }
        let snapshot = journal.latest.clone();
        Ok((journal, snapshot, damage))
    }

    /// Appends one record with `dirty`'s spend and flushes it to disk. After an error the file
    /// ends where it did before, as far as reading it back is concerned, and the call can be
    /// retried.
    pub(super) fn append(&mut self, dirty: &[(String, Spend)]) -> io::Result<()> {
        if self.dir_unsynced {
            sync_dir(&self.dir)?;
            self.dir_unsynced = false;
        }
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
    /// over the old one. A crash at any step leaves a whole journal under the name: the old one
    /// until the rename, the new one (synced before the rename) after it. The file appended to
    /// is the one under the name once the rename is done, whatever follows; until the directory
    /// is synced, no append is acknowledged.
    fn rewrite(&mut self) -> io::Result<()> {
        let record = encode_record(self.latest.iter().map(|(id, spend)| (id.as_str(), spend)))?;
        let tmp: PathBuf = self.dir.join(TEMP_NAME);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
        file.write_all_at(&MAGIC, 0)?;
        file.write_all_at(&record, MAGIC.len() as u64)?;
        #[cfg(test)]
        self.crash_point(RewriteStep::TempWritten)?;
        file.sync_all()?;
        #[cfg(test)]
        self.crash_point(RewriteStep::TempSynced)?;
        std::fs::rename(&tmp, self.dir.join(FILE_NAME))?;
        self.file = file;
        self.end = (MAGIC.len() + record.len()) as u64;
        self.dir_unsynced = true;
        #[cfg(test)]
        self.crash_point(RewriteStep::Renamed)?;
        sync_dir(&self.dir)?;
        self.dir_unsynced = false;
        Ok(())
    }

    #[cfg(test)]
    fn crash_point(&self, step: RewriteStep) -> io::Result<()> {
        if self.crash_after == Some(step) {
            return Err(io::Error::other(format!("crashed after {step:?}")));
        }
        Ok(())
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
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

/// What replaying a journal found.
#[derive(Debug, PartialEq, Eq)]
struct Replayed {
    latest: HashMap<String, Spend>,
    /// Where the last record that checks out ends; what follows is an incomplete last commit.
    end: usize,
    /// Damaged stretches before `end`, each followed by a record that checks out.
    damaged: Vec<Range<usize>>,
}

/// The spend a journal holds. Records are read in order; one that is cut short or fails its
/// checksum is damage, and reading resumes at the next place a record checks out (its checksum
/// passes and it decodes). Damage with nothing good after it is the end of the journal: an
/// incomplete last commit. A record that checks out but cannot be decoded is an error, never
/// skipped: it is spend this version cannot read.
fn replay(bytes: &[u8]) -> Result<Replayed, String> {
    if bytes.len() < MAGIC.len() || bytes[..6] != MAGIC[..6] {
        return Err("not a Sideyard ledger journal".into());
    }
    if bytes[..MAGIC.len()] != MAGIC {
        return Err(format!("ledger journal format {} is not supported by this version", bytes[7]));
    }
    let mut latest = HashMap::new();
    let mut damaged = Vec::new();
    let mut at = MAGIC.len();
    while at < bytes.len() {
        if let Some(payload) = record_at(bytes, at) {
            decode_entries(payload, &mut latest).ok_or_else(|| format!("the record at byte {at} is malformed"))?;
            at += RECORD_HEAD + payload.len();
            continue;
        }
        let Some(next) = (at + 1..bytes.len()).find(|&i| record_at(bytes, i).is_some_and(decodes)) else { break };
        damaged.push(at..next);
        at = next;
    }
    Ok(Replayed { latest, end: at, damaged })
}

/// The payload of the record at `at`, if one is there whole and its checksum passes.
fn record_at(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let head = bytes.get(at..at.checked_add(RECORD_HEAD)?)?;
    let length = usize::try_from(u32::from_le_bytes([head[0], head[1], head[2], head[3]])).ok()?;
    let start = at + RECORD_HEAD;
    let payload = bytes.get(start..start.checked_add(length)?)?;
    (head[4..] == checksum(payload)).then_some(payload)
}

fn decodes(payload: &[u8]) -> bool {
    decode_entries(payload, &mut HashMap::new()).is_some()
}

fn decode_entries(mut payload: &[u8], into: &mut HashMap<String, Spend>) -> Option<()> {
    while !payload.is_empty() {
        let (len, rest) = payload.split_first_chunk::<2>()?;
        let len = u16::from_le_bytes(*len) as usize;
        let (id, rest) = rest.split_at_checked(len)?;
        let (spend, rest) = rest.split_at_checked(Spend::encoded_len_at(rest)?)?;
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
        let dir = std::env::temp_dir().join(format!("sideyard-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn open(dir: &Path) -> (Journal, HashMap<String, Spend>) {
        let (journal, stored, damage) = Journal::open(dir).unwrap();
        assert_eq!(damage, Damage::default());
        (journal, stored)
    }

    #[test]
    fn the_last_value_of_each_account_wins() {
        let dir = temp_dir("replay");
        let (mut journal, empty) = open(&dir);
        assert!(empty.is_empty());
        journal.append(&[("a".into(), spend(1)), ("b".into(), spend(2))]).unwrap();
        journal.append(&[("a".into(), spend(3))]).unwrap();
        drop(journal);
        let (_, stored) = open(&dir);
        assert_eq!(stored, HashMap::from([("a".into(), spend(3)), ("b".into(), spend(2))]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_of_the_previous_version_still_read_and_top_ups_are_kept() {
        // An entry as version 1 wrote it: the version byte and nine fields, no `topped_up`.
        let old = spend(5);
        let mut entry = vec![1u8, 0];
        entry.extend_from_slice(b"a");
        entry.push(1);
        for field in [old.period_start, old.spent, old.total, 0, 0, 0, 0, 0, 0] {
            entry.extend_from_slice(&u64::to_le_bytes(field));
        }
        let mut read = HashMap::new();
        assert_eq!(decode_entries(&entry, &mut read), Some(()));
        assert_eq!(read["a"], old);

        let dir = temp_dir("topped");
        let (mut journal, _) = open(&dir);
        let topped = Spend { topped_up: 7, ..spend(4) };
        journal.append(&[("b".into(), topped)]).unwrap();
        drop(journal);
        assert_eq!(open(&dir).1["b"], topped);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_commit_cut_short_is_dropped_and_writing_goes_on_after_the_last_complete_one() {
        let dir = temp_dir("torn");
        let (mut journal, _) = open(&dir);
        journal.append(&[("a".into(), spend(1))]).unwrap();
        let complete = std::fs::metadata(dir.join(FILE_NAME)).unwrap().len();
        journal.append(&[("a".into(), spend(5))]).unwrap();
        drop(journal);
        // A crash in the middle of the second commit: part of its record reached the disk.
        let file = OpenOptions::new().write(true).open(dir.join(FILE_NAME)).unwrap();
        file.set_len(complete + 30).unwrap();
        drop(file);

        let (mut journal, stored) = open(&dir);
        assert_eq!(stored["a"], spend(1));
        assert_eq!(std::fs::metadata(dir.join(FILE_NAME)).unwrap().len(), complete, "the torn record is cut off");
        journal.append(&[("a".into(), spend(7))]).unwrap();
        drop(journal);
        assert_eq!(open(&dir).1["a"], spend(7));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A journal of three commits, each to two of the accounts a, b and c, and where each ends.
    fn three_commits(dir: &Path) -> Vec<u64> {
        let (mut journal, _) = open(dir);
        let mut ends = vec![journal.end];
        for (i, pair) in [["a", "b"], ["b", "c"], ["c", "a"]].iter().enumerate() {
            let n = i as u64 + 1;
            journal.append(&[(pair[0].into(), spend(10 * n)), (pair[1].into(), spend(10 * n + 1))]).unwrap();
            ends.push(journal.end);
        }
        ends
    }

    /// Flips one byte of the journal at `at`, opens it, and returns what it holds and what was
    /// skipped; checks that the copy of the damaged file is kept and the journal rewritten whole.
    fn damage_at(name: &str, at: impl Fn(&[u64]) -> u64) -> (HashMap<String, Spend>, Damage) {
        let dir = temp_dir(name);
        let ends = three_commits(&dir);
        let path = dir.join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = at(&ends) as usize;
        bytes[at] ^= 0x5a;
        std::fs::write(&path, &bytes).unwrap();
        let (journal, stored, damage) = Journal::open(&dir).unwrap();
        drop(journal);
        if damage.regions > 0 {
            let copy = damage.copy.clone().expect("a damaged journal is copied");
            assert_eq!(std::fs::read(copy).unwrap(), bytes, "the copy is the damaged file as found");
            let (_, again, clean) = Journal::open(&dir).unwrap();
            assert_eq!((again, clean), (stored.clone(), Damage::default()), "rewritten without the damage");
        }
        let _ = std::fs::remove_dir_all(&dir);
        (stored, damage)
    }

    #[test]
    fn damage_at_the_start_skips_the_first_commit_only() {
        let (stored, damage) = damage_at("damage-start", |ends| ends[0] + 2);
        // The first commit (a=10, b=11) is lost; b and a have later values anyway.
        assert_eq!(stored, HashMap::from([("b".into(), spend(20)), ("c".into(), spend(30)), ("a".into(), spend(31))]));
        assert_eq!(damage.regions, 1);
    }

    #[test]
    fn damage_in_the_middle_keeps_every_later_record() {
        let (stored, damage) = damage_at("damage-middle", |ends| ends[1] + RECORD_HEAD as u64 + 3);
        assert_eq!(stored, HashMap::from([("a".into(), spend(31)), ("b".into(), spend(11)), ("c".into(), spend(30))]));
        assert_eq!((damage.regions, damage.bytes), (1, (RECORD_HEAD + 2 * entry_len("b")) as u64));
    }

    #[test]
    fn damage_in_the_last_record_ends_the_journal_there() {
        // Nothing good follows the last record: it is read as a commit cut short.
        let (stored, damage) = damage_at("damage-end", |ends| ends[3] - 1);
        assert_eq!(stored, HashMap::from([("a".into(), spend(10)), ("b".into(), spend(20)), ("c".into(), spend(21))]));
        assert_eq!(damage, Damage::default());
    }

    #[test]
    fn a_crash_at_any_step_of_a_rewrite_leaves_a_whole_journal() {
        for step in [RewriteStep::TempWritten, RewriteStep::TempSynced, RewriteStep::Renamed] {
            let dir = temp_dir(&format!("rewrite-{step:?}"));
            three_commits(&dir);
            let (mut journal, before) = open(&dir);
            journal.crash_after = Some(step);
            assert!(journal.rewrite().is_err());
            drop(journal);
            let (mut journal, after) = open(&dir);
            assert_eq!(after, before, "crash after {step:?}");
            assert!(!dir.join(TEMP_NAME).exists(), "the leftover of a crashed rewrite is removed");
            journal.append(&[("a".into(), spend(99))]).unwrap();
            drop(journal);
            assert_eq!(open(&dir).1["a"], spend(99));
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn after_a_rename_appends_go_to_the_new_file_even_if_the_directory_sync_failed() {
        let dir = temp_dir("rename-then-fail");
        three_commits(&dir);
        let (mut journal, _) = open(&dir);
        journal.crash_after = Some(RewriteStep::Renamed);
        assert!(journal.rewrite().is_err());
        assert!(journal.dir_unsynced);
        journal.crash_after = None;
        journal.append(&[("c".into(), spend(5))]).unwrap();
        assert!(!journal.dir_unsynced, "the append synced the directory first");
        drop(journal);
        assert_eq!(open(&dir).1["c"], spend(5), "the append reached the file under the journal's name");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_journal_cut_inside_its_magic_starts_empty() {
        let dir = temp_dir("magic");
        std::fs::write(dir.join(FILE_NAME), &MAGIC[..3]).unwrap();
        let (_, stored) = open(&dir);
        assert!(stored.is_empty());
        assert_eq!(std::fs::read(dir.join(FILE_NAME)).unwrap(), MAGIC);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_process_at_a_time_owns_a_directory() {
        let dir = temp_dir("lock");
        let (journal, _) = open(&dir);
        let error = Journal::open(&dir).err().unwrap();
        assert!(error.contains("is in use by another process"), "{error}");
        drop(journal);
        assert!(Journal::open(&dir).is_ok(), "free again once the owner is gone");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn files_that_are_not_a_journal_are_refused_not_overwritten() {
        assert_eq!(replay(b"\x00\x00\x00\x00redb...").unwrap_err(), "not a Sideyard ledger journal");
        assert!(replay(b"SWYLDG\x00\x09").unwrap_err().contains("format 9 is not supported"));
        let dir = temp_dir("foreign");
        std::fs::write(dir.join(FILE_NAME), b"something else entirely").unwrap();
        let error = Journal::open(&dir).err().unwrap();
        assert!(error.contains("not a Sideyard ledger journal"), "{error}");
        assert_eq!(std::fs::read(dir.join(FILE_NAME)).unwrap(), b"something else entirely");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_record_that_checks_out_but_does_not_decode_is_an_error_not_skipped() {
        let mut bytes = MAGIC.to_vec();
        let payload = b"\x01\x00a\x09rest";
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&checksum(payload));
        bytes.extend_from_slice(payload);
        assert!(replay(&bytes).unwrap_err().contains("malformed"));
    }

    #[test]
    fn a_grown_journal_is_rewritten_as_one_record_without_losing_spend() {
        let dir = temp_dir("compact");
        let (mut journal, _) = open(&dir);
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
        assert!(!dir.join(TEMP_NAME).exists());
        journal.append(&[(ids[0].clone(), spend(1))]).unwrap();
        drop(journal);
        let (_, stored) = open(&dir);
        assert_eq!(stored.len(), 10);
        assert_eq!(stored[&ids[0]], spend(1));
        assert_eq!(stored[&ids[(commits % 10) as usize]], spend(commits));
        let _ = std::fs::remove_dir_all(&dir);
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// A journal's bytes from commits of (account, spent) pairs, and where each record starts.
        fn journal_of(commits: &[Vec<(u8, u64)>]) -> (Vec<u8>, Vec<usize>) {
            let mut bytes = MAGIC.to_vec();
            let mut starts = Vec::new();
            for commit in commits {
                starts.push(bytes.len());
                let entries: Vec<(String, Spend)> =
                    commit.iter().map(|(id, s)| (format!("ns/k{id}"), spend(*s))).collect();
                bytes.extend(encode_record(entries.iter().map(|(id, s)| (id.as_str(), s))).unwrap());
            }
            (bytes, starts)
        }

        fn commits() -> impl Strategy<Value = Vec<Vec<(u8, u64)>>> {
            prop::collection::vec(prop::collection::vec((0u8..4, 0u64..1 << 40), 1..3), 1..8)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_bytes_replay_or_fail_without_a_panic(tail in prop::collection::vec(any::<u8>(), 0..400)) {
                let mut bytes = MAGIC.to_vec();
                bytes.extend_from_slice(&tail);
                if let Ok(replayed) = replay(&bytes) {
                    prop_assert!(replayed.end <= bytes.len());
                }
                let _ = replay(&tail);
            }

            #[test]
            fn a_damaged_record_loses_that_record_only(commits in commits(), pick in any::<prop::sample::Index>(), offset in any::<prop::sample::Index>(), flip in 1u8..=255) {
                let (mut bytes, starts) = journal_of(&commits);
                let k = pick.index(commits.len());
                let end = starts.get(k + 1).copied().unwrap_or(bytes.len());
                bytes[starts[k] + offset.index(end - starts[k])] ^= flip;
                let replayed = replay(&bytes).expect("a damaged journal still reads");
                let mut without: Vec<Vec<(u8, u64)>> = commits.clone();
                without.remove(k);
                let expected = replay(&journal_of(&without).0).unwrap().latest;
                prop_assert_eq!(replayed.latest, expected);
                if k + 1 < commits.len() {
                    prop_assert_eq!(replayed.damaged, vec![starts[k]..starts[k + 1]]);
                    prop_assert_eq!(replayed.end, bytes.len());
                } else {
                    prop_assert!(replayed.damaged.is_empty(), "damage at the end is a cut-short commit");
                    prop_assert_eq!(replayed.end, starts[k]);
                }
            }

            #[test]
            fn a_journal_cut_anywhere_keeps_every_whole_record(commits in commits(), cut in any::<prop::sample::Index>()) {
                let (bytes, starts) = journal_of(&commits);
                let at = MAGIC.len() + cut.index(bytes.len() - MAGIC.len() + 1);
                let whole = starts.iter().skip(1).chain(std::iter::once(&bytes.len())).filter(|&&end| end <= at).count();
                let replayed = replay(&bytes[..at]).unwrap();
                prop_assert_eq!(replayed.latest, replay(&journal_of(&commits[..whole]).0).unwrap().latest);
                prop_assert!(replayed.damaged.is_empty());
            }
        }
    }
}
