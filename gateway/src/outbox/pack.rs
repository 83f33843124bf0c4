//! Packed events: what keeps an SD card from wearing out under a stream of readings.
//!
//! A reading is small (a couple of hundred bytes of JSON) and looks much like the one
//! before it: the same keys, the same topic tree, the same source and type. Stored as it
//! comes, its row is twice its payload and SQLite writes every page twice (to the WAL,
//! then to the database), about five bytes on the card per byte of payload. Compressing
//! one reading alone gains little — the repetition is *between* readings — so an event
//! that is not a file is stored *packed*: its subject and data as one raw-deflate stream
//! against a preset dictionary made of recent events of the same kind (source, type and
//! content type), which the row names in `packed`. The kind's names live in the
//! dictionary's row, and the event id is derived from the producer id and the sequence
//! ([`derived_id`]), so a packed row is little more than its sequence, its times and a
//! few dozen bytes of deflate.
//!
//! Dictionaries are written once and never changed; a kind's dictionary is replaced by a
//! fresh one from its most recent events every [`RENEW_EVERY`] packed events, so that a
//! change of payloads (a firmware update) does not leave it behind. A replaced one is
//! deleted once no record refers to it. Dead letters are never packed: an event that is
//! dead-lettered is unpacked on its way (`pigeon-gateway dead-letter` reads them as
//! they are).

use std::collections::HashMap;
use std::sync::Arc;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::OutboxError;

/// How much of a kind's recent events a dictionary holds: the deflate window.
const DICTIONARY_BYTES: usize = 4096;
/// log2 of [`DICTIONARY_BYTES`]: the compressor's window, no larger than the dictionary.
const WINDOW_BITS: u8 = 12;
/// A kind's first dictionary is made once this much of its events has been seen.
const FIRST_AFTER: usize = 2048;
/// A kind's dictionary is considered for replacement after this many events.
pub(crate) const RENEW_EVERY: u64 = 50_000;
/// A kind whose events did not compress is tried again after this many events.
const RETRY_EVERY: u64 = 256;
/// Dictionaries an [`Unpacker`] keeps in memory.
const CACHED_DICTIONARIES: usize = 64;
/// Events larger than this (subject and data) are stored as they are: a 4 KiB dictionary
/// makes little difference to them.
pub(crate) const PACK_MAX: usize = 16 * 1024;

/// What an event is of: its dictionary is shared by these.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Kind {
    pub(crate) source: String,
    pub(crate) event_type: String,
    pub(crate) content_type: Option<String>,
}

/// A stored dictionary: the kind it packs and its bytes.
#[derive(Debug)]
pub(crate) struct Dictionary {
    pub(crate) kind: Kind,
    pub(crate) bytes: Vec<u8>,
}

const INSERT_DICTIONARY: &str =
    "INSERT INTO dictionaries (source, type, content_type, bytes) VALUES (?1, ?2, ?3, ?4)";
const DICTIONARY: &str = "SELECT source, type, content_type, bytes FROM dictionaries WHERE id = ?1";
const ALL_DICTIONARIES: &str =
    "SELECT id, source, type, content_type, bytes FROM dictionaries ORDER BY id";
/// Replaced dictionaries no record refers to any more.
const DELETE_UNUSED: &str = "DELETE FROM dictionaries WHERE id = ?1
    AND NOT EXISTS (SELECT 1 FROM records WHERE packed = ?1)";

/// The event id of a packed record: a UUIDv7 of its receive time, then the low 30 bits
/// of its sequence (ids of one millisecond sort as their sequences), then 44 bits of a
/// hash of the producer id and the sequence — the same at every read, and as unique as
/// the (producer id, sequence) pair the relay deduplicates by.
pub(crate) fn derived_id(producer: &str, seq: u64, time_us: i64) -> uuid::Uuid {
    let mut h = Sha256::new();
    h.update(producer.as_bytes());
    h.update(seq.to_be_bytes());
    let digest = h.finalize();
    let mut hash = [0u8; 8];
    hash.copy_from_slice(&digest[..8]);
    let millis = u128::from((time_us.max(0) / 1000) as u64) & ((1 << 48) - 1);
    let rand =
        (u128::from(seq) & ((1 << 30) - 1)) << 44 | (u128::from(u64::from_be_bytes(hash)) >> 20);
    let rand_a = rand >> 62;
    let rand_b = rand & ((1 << 62) - 1);
    uuid::Uuid::from_u128(millis << 80 | 7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b)
}

/// Subject and data as one byte string: a varint of the subject's length plus one (0: no
/// subject), the subject, the data.
fn plain(subject: Option<&str>, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + subject.map_or(1, |s| s.len() + 3));
    let mut n = subject.map_or(0, |s| s.len() as u64 + 1);
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    if let Some(s) = subject {
        out.extend_from_slice(s.as_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// The inverse of [`plain`].
fn split(plain: &[u8]) -> Result<(Option<String>, Vec<u8>), String> {
    let mut n = 0u64;
    let mut at = 0;
    loop {
        let byte = *plain.get(at).ok_or("the subject's length is cut short")?;
        n |= u64::from(byte & 0x7f) << (7 * at);
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if at >= 4 {
            return Err("the subject's length is too long".into());
        }
    }
    if n == 0 {
        return Ok((None, plain[at..].to_vec()));
    }
    let end = at + (n - 1) as usize;
    let subject = plain
        .get(at..end)
        .ok_or("the subject is cut short")?
        .to_vec();
    let subject = String::from_utf8(subject).map_err(|_| "the subject is not UTF-8")?;
    Ok((Some(subject), plain[end..].to_vec()))
}

fn deflate(c: &mut Compress, dictionary: &[u8], input: &[u8]) -> Option<Vec<u8>> {
    c.reset();
    c.set_dictionary(dictionary).ok()?;
    let mut out = Vec::with_capacity(input.len() / 2 + 64);
    loop {
        let consumed = c.total_in() as usize;
        match c.compress_vec(&input[consumed..], &mut out, FlushCompress::Finish) {
            Ok(Status::StreamEnd) => return Some(out),
            Ok(_) => out.reserve(out.capacity().max(64)),
            Err(_) => return None,
        }
    }
}

fn inflate(d: &mut Decompress, dictionary: &[u8], input: &[u8]) -> Result<Vec<u8>, String> {
    d.reset(false);
    d.set_dictionary(dictionary).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(input.len() * 8);
    loop {
        let consumed = d.total_in() as usize;
        match d.decompress_vec(&input[consumed..], &mut out, FlushDecompress::Finish) {
            Ok(Status::StreamEnd) => return Ok(out),
            Ok(_) if out.len() > PACK_MAX + 8 => return Err("it unpacks to too many bytes".into()),
            Ok(_) if consumed == input.len() && out.len() < out.capacity() => {
                return Err("the packed data is cut short".into());
            }
            Ok(_) => out.reserve(out.capacity().max(256)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The subject and data packed in `packed` with `dictionary`.
fn unpack_plain(
    d: &mut Decompress,
    dictionary: &[u8],
    packed: &[u8],
) -> Result<(Option<String>, Vec<u8>), String> {
    split(&inflate(d, dictionary, packed)?)
}

/// [`unpack_plain`] with a decompressor of its own (the fuzz target `packed_event`).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn unpack_bytes(
    dictionary: &[u8],
    packed: &[u8],
) -> Result<(Option<String>, Vec<u8>), String> {
    let mut d = Decompress::new_with_window_bits(false, WINDOW_BITS);
    unpack_plain(&mut d, dictionary, packed)
}

/// `subject` and `data` packed with `dictionary` as the writer packs them (the fuzz
/// target `packed_event`).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn pack_bytes(dictionary: &[u8], subject: Option<&str>, data: &[u8]) -> Option<Vec<u8>> {
    let mut c = compressor();
    deflate(&mut c, dictionary, &plain(subject, data))
}

/// The writer's compressor.
fn compressor() -> Compress {
    Compress::new_with_window_bits(Compression::new(6), false, WINDOW_BITS)
}

/// Dictionaries by id, loaded from the database on first use (they never change, and an
/// id is never reused: `AUTOINCREMENT`).
pub(crate) struct Unpacker {
    dictionaries: HashMap<i64, Arc<Dictionary>>,
    inflate: Decompress,
}

/// An unpacked event: its kind, subject and data.
pub(crate) struct Unpacked {
    pub(crate) kind: Kind,
    pub(crate) subject: Option<String>,
    pub(crate) data: Vec<u8>,
}

impl Default for Unpacker {
    fn default() -> Self {
        Self {
            dictionaries: HashMap::new(),
            inflate: Decompress::new_with_window_bits(false, WINDOW_BITS),
        }
    }
}

impl Unpacker {
    /// The dictionary `id`, from the cache or from `conn`.
    pub(crate) fn dictionary(
        &mut self,
        conn: &Connection,
        id: i64,
    ) -> Result<Arc<Dictionary>, OutboxError> {
        if let Some(d) = self.dictionaries.get(&id) {
            return Ok(d.clone());
        }
        let d = conn
            .prepare_cached(DICTIONARY)?
            .query_row([id], |r| {
                Ok(Dictionary {
                    kind: Kind {
                        source: r.get(0)?,
                        event_type: r.get(1)?,
                        content_type: r.get(2)?,
                    },
                    bytes: r.get(3)?,
                })
            })
            .optional()?
            .ok_or_else(|| {
                OutboxError::Corrupt(format!(
                    "a packed event names dictionary {id}, which is missing"
                ))
            })?;
        let d = Arc::new(d);
        self.learn(id, d.clone());
        Ok(d)
    }

    /// Remembers a dictionary (one the writer just stored, or one read).
    fn learn(&mut self, id: i64, d: Arc<Dictionary>) {
        // Replaced dictionaries would pile up over the years: keep the newest few (an
        // older one is read again if a record still needs it).
        while self.dictionaries.len() >= CACHED_DICTIONARIES {
            let Some(oldest) = self.dictionaries.keys().min().copied() else {
                break;
            };
            self.dictionaries.remove(&oldest);
        }
        self.dictionaries.insert(id, d);
    }

    /// Unpacks the event of sequence `seq` packed with dictionary `id`.
    pub(crate) fn unpack(
        &mut self,
        conn: &Connection,
        seq: u64,
        id: i64,
        packed: &[u8],
    ) -> Result<Unpacked, OutboxError> {
        let d = self.dictionary(conn, id)?;
        let bad = |e: String| OutboxError::Corrupt(format!("packed event {seq}: {e}"));
        let (subject, data) = unpack_plain(&mut self.inflate, &d.bytes, packed).map_err(bad)?;
        Ok(Unpacked {
            kind: d.kind.clone(),
            subject,
            data,
        })
    }
}

/// A kind's packing state in the writer.
struct KindState {
    /// The dictionary in use, as committed.
    current: Option<(i64, Arc<Dictionary>)>,
    /// A dictionary stored by the open transaction: in use once it commits.
    staged: Option<(i64, Arc<Dictionary>)>,
    /// Events since the kind's dictionary was made or last considered.
    since: u64,
    /// The kind's most recent events (subject and data), up to [`DICTIONARY_BYTES`].
    recent: Vec<u8>,
}

impl Default for KindState {
    fn default() -> Self {
        Self {
            current: None,
            staged: None,
            // The first dictionary as soon as there is enough to make it of.
            since: u64::MAX,
            recent: Vec::new(),
        }
    }
}

impl KindState {
    fn dictionary(&self) -> Option<&(i64, Arc<Dictionary>)> {
        self.staged.as_ref().or(self.current.as_ref())
    }

    fn remember(&mut self, plain: &[u8]) {
        self.recent.extend_from_slice(plain);
        if self.recent.len() > DICTIONARY_BYTES {
            let cut = self.recent.len() - DICTIONARY_BYTES;
            self.recent.drain(..cut);
        }
    }
}

/// The writer's side: packs events, stores new dictionaries in the writer's transaction.
pub(crate) struct Packer {
    kinds: HashMap<Kind, KindState>,
    deflate: Compress,
    /// Also the writer's cache for unpacking (dead letters, drops by type).
    pub(crate) unpacker: Unpacker,
    /// Whether dictionaries were replaced since unused ones were last deleted.
    replaced: bool,
    /// [`RENEW_EVERY`] (smaller in tests).
    renew_every: u64,
}

impl Packer {
    /// Loads the dictionaries in use: each kind's newest.
    pub(crate) fn load(conn: &Connection) -> Result<Self, OutboxError> {
        let mut packer = Packer {
            kinds: HashMap::new(),
            deflate: compressor(),
            unpacker: Unpacker::default(),
            replaced: false,
            renew_every: RENEW_EVERY,
        };
        let mut stmt = conn.prepare(ALL_DICTIONARIES)?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                Dictionary {
                    kind: Kind {
                        source: r.get(1)?,
                        event_type: r.get(2)?,
                        content_type: r.get(3)?,
                    },
                    bytes: r.get(4)?,
                },
            ))
        })?;
        for row in rows {
            let (id, d) = row?;
            let d = Arc::new(d);
            packer.unpacker.learn(id, d.clone());
            let state = packer.kinds.entry(d.kind.clone()).or_default();
            packer.replaced |= state.current.is_some();
            state.current = Some((id, d));
        }
        Ok(packer)
    }

    /// Packs an event (not a file): `Some((dictionary id, packed bytes))`, or `None` to
    /// store it as it is (its kind has no dictionary yet, it is large, or packing would
    /// not make it smaller). May store a new dictionary in `tx`.
    pub(crate) fn pack(
        &mut self,
        tx: &Connection,
        kind: Kind,
        subject: Option<&str>,
        data: &[u8],
    ) -> Result<Option<(i64, Vec<u8>)>, OutboxError> {
        let plain = plain(subject, data);
        if plain.len() > PACK_MAX {
            return Ok(None);
        }
        let state = self.kinds.entry(kind.clone()).or_default();
        let mut packed = state
            .dictionary()
            .and_then(|(id, d)| Some((*id, deflate(&mut self.deflate, &d.bytes, &plain)?)));
        let due = state.staged.is_none()
            && state.recent.len() >= FIRST_AFTER
            && match state.dictionary() {
                None => state.since >= RETRY_EVERY,
                Some(_) => state.since >= self.renew_every,
            };
        if due {
            // A dictionary of the kind's recent events, kept only if it packs this one
            // better than the dictionary in use (or, for the first, by a quarter at least:
            // data that does not compress gets none).
            state.since = 0;
            let trial = deflate(&mut self.deflate, &state.recent, &plain);
            let better = match (&trial, &packed) {
                (Some(t), Some((_, p))) => t.len() < p.len(),
                (Some(t), None) => t.len() * 4 <= plain.len() * 3,
                (None, _) => false,
            };
            if let (true, Some(trial)) = (better, trial) {
                tx.prepare_cached(INSERT_DICTIONARY)?.execute(params![
                    kind.source,
                    kind.event_type,
                    kind.content_type,
                    &state.recent[..],
                ])?;
                let id = tx.last_insert_rowid();
                let d = Arc::new(Dictionary {
                    kind,
                    bytes: state.recent.clone(),
                });
                state.staged = Some((id, d));
                packed = Some((id, trial));
            }
        }
        state.since = state.since.saturating_add(1);
        state.remember(&plain);
        Ok(packed.filter(|(_, p)| p.len() < plain.len()))
    }

    /// The open transaction committed: its new dictionaries are in use.
    pub(crate) fn committed(&mut self) {
        for state in self.kinds.values_mut() {
            if let Some((id, d)) = state.staged.take() {
                self.unpacker.learn(id, d.clone());
                self.replaced |= state.current.is_some();
                state.current = Some((id, d));
            }
        }
    }

    /// The open transaction rolled back: its new dictionaries never were.
    pub(crate) fn rolled_back(&mut self) {
        for state in self.kinds.values_mut() {
            if state.staged.take().is_some() {
                // Still due: the next event tries again.
                state.since = u64::MAX;
            }
        }
    }

    /// Deletes replaced dictionaries that no record refers to any more. Each is a scan
    /// of the records, so the writer calls this when there are few.
    pub(crate) fn delete_unused(&mut self, tx: &Connection) -> Result<usize, OutboxError> {
        if !self.replaced {
            return Ok(0);
        }
        let current: std::collections::HashSet<i64> = self
            .kinds
            .values()
            .filter_map(|s| s.current.as_ref().map(|c| c.0))
            .collect();
        let ids: Vec<i64> = tx
            .prepare_cached("SELECT id FROM dictionaries")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut deleted = 0;
        let mut left = false;
        for id in ids.into_iter().filter(|id| !current.contains(id)) {
            if tx.prepare_cached(DELETE_UNUSED)?.execute([id])? > 0 {
                deleted += 1;
            } else {
                left = true;
            }
        }
        self.replaced = left;
        Ok(deleted)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Bytes that do not compress (the packer leaves them as they are), so that `len`
    /// is what a record costs.
    pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::db::migrate(&mut conn).unwrap();
        conn
    }

    fn kind(ty: &str) -> Kind {
        Kind {
            source: "/gateways/pi-1/mqtt".into(),
            event_type: ty.into(),
            content_type: Some("application/json".into()),
        }
    }

    fn reading(n: u64) -> (String, Vec<u8>) {
        (
            format!("site/floor/{}/room/{}/climate", n % 4, n % 25),
            format!(
                r#"{{"n":{n},"temperature_c":{:.1},"humidity_pct":{},"sensor":"S{:06}"}}"#,
                18.0 + (n % 100) as f64 / 10.0,
                30 + n % 40,
                n % 997
            )
            .into_bytes(),
        )
    }

    fn dictionaries(conn: &Connection) -> Vec<i64> {
        conn.prepare("SELECT id FROM dictionaries ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn subject_and_data_survive_the_plain_form() {
        let long = "a/".repeat(100);
        for (subject, data) in [
            (None, &b""[..]),
            (None, &b"\x00\x01 data"[..]),
            (Some(""), &b"x"[..]),
            (Some("room/1 – Zürich"), &b"{}"[..]),
            (Some(long.as_str()), &b"after a two-byte length"[..]),
        ] {
            let p = plain(subject, data);
            let (s, d) = split(&p).unwrap();
            assert_eq!((s.as_deref(), &d[..]), (subject, data));
        }
        assert!(split(&[]).is_err());
        assert!(split(&[0x85]).is_err(), "a length cut short");
        assert!(split(&[10, b'a']).is_err(), "a subject cut short");
        assert!(split(&[3, 0xff, 0xfe]).is_err(), "not UTF-8");
    }

    #[test]
    fn derived_ids_are_stable_unique_and_sort_by_time_then_sequence() {
        let t = 1_764_600_000_123_456;
        let a = derived_id("p1", 7, t);
        assert_eq!(a, derived_id("p1", 7, t));
        assert_eq!(a.get_version_num(), 7);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert_ne!(a, derived_id("p2", 7, t), "another producer");
        assert!(a < derived_id("p1", 8, t), "same millisecond: by sequence");
        assert!(
            derived_id("p1", 9, t) < derived_id("p1", 8, t + 1000),
            "by time first"
        );
        let (ms, _) = a.get_timestamp().unwrap().to_unix();
        assert_eq!(ms, 1_764_600_000);
    }

    #[test]
    fn events_of_a_kind_are_packed_once_there_is_a_dictionary_and_unpack_as_they_were() {
        let conn = db();
        let mut packer = Packer::load(&conn).unwrap();
        let mut stored = Vec::new();
        for n in 0..200 {
            let (subject, data) = reading(n);
            let p = packer
                .pack(&conn, kind("climate"), Some(&subject), &data)
                .unwrap();
            packer.committed();
            stored.push((n, subject, data, p));
        }
        let first = stored.iter().position(|s| s.3.is_some()).unwrap();
        assert!(first > 5 && first < 50, "packed from event {first} on");
        assert!(stored[first..].iter().all(|s| s.3.is_some()));
        let (raw, packed) = stored[first..].iter().fold((0, 0), |(r, p), s| {
            (r + s.1.len() + s.2.len(), p + s.3.as_ref().unwrap().1.len())
        });
        assert!(packed * 3 < raw, "{packed} B packed of {raw} B");
        // Another connection's reader: dictionaries come from the database.
        let mut unpacker = Unpacker::default();
        for (n, subject, data, p) in &stored[first..] {
            let (id, bytes) = p.as_ref().unwrap();
            let ev = unpacker.unpack(&conn, *n, *id, bytes).unwrap();
            assert_eq!(ev.kind, kind("climate"));
            assert_eq!(ev.subject.as_deref(), Some(subject.as_str()));
            assert_eq!(&ev.data, data);
        }
        assert_eq!(dictionaries(&conn).len(), 1);
        // A damaged packed event is an error naming it, not a panic or garbage.
        let (id, bytes) = stored[100].3.as_ref().unwrap();
        let e = unpacker.unpack(&conn, 100, *id, &bytes[..bytes.len() / 2]);
        assert!(
            matches!(&e, Err(OutboxError::Corrupt(m)) if m.contains("100")),
            "{:?}",
            e.err()
        );
        let e = unpacker.unpack(&conn, 5, 999, bytes).err().unwrap();
        assert!(e.to_string().contains("dictionary 999"), "{e}");
    }

    #[test]
    fn the_unpacker_keeps_a_bounded_cache_and_reads_evicted_dictionaries_again() {
        let conn = db();
        let mut packer = Packer::load(&conn).unwrap();
        let mut last = Vec::new();
        for k in 0..CACHED_DICTIONARIES as u64 + 6 {
            let ty = format!("climate.{k}");
            let mut packed = None;
            for n in 0..100 {
                let (subject, data) = reading(n);
                packed = packer
                    .pack(&conn, kind(&ty), Some(&subject), &data)
                    .unwrap();
                packer.committed();
            }
            last.push((ty, packed.unwrap()));
        }
        let mut unpacker = Unpacker::default();
        for _ in 0..2 {
            for (ty, (id, bytes)) in &last {
                let ev = unpacker.unpack(&conn, 99, *id, bytes).unwrap();
                assert_eq!(ev.kind, kind(ty));
                assert_eq!(ev.data, reading(99).1);
                assert!(unpacker.dictionaries.len() <= CACHED_DICTIONARIES);
            }
        }
    }

    #[test]
    fn data_that_does_not_compress_gets_no_dictionary() {
        let conn = db();
        let mut packer = Packer::load(&conn).unwrap();
        for n in 0..600u64 {
            let data = noise(n, 300);
            assert!(
                packer
                    .pack(&conn, kind("noise"), None, &data)
                    .unwrap()
                    .is_none()
            );
            packer.committed();
        }
        assert!(dictionaries(&conn).is_empty());
    }

    #[test]
    fn a_dictionary_of_a_rolled_back_round_is_never_used() {
        let mut conn = db();
        let mut packer = Packer::load(&conn).unwrap();
        let mut n = 0;
        loop {
            let tx = conn.transaction().unwrap();
            let (subject, data) = reading(n);
            n += 1;
            let p = packer
                .pack(&tx, kind("climate"), Some(&subject), &data)
                .unwrap();
            if p.is_some() {
                drop(tx);
                packer.rolled_back();
                break;
            }
            tx.commit().unwrap();
            packer.committed();
        }
        assert!(dictionaries(&conn).is_empty());
        // The next event makes it again, in its own round.
        let (subject, data) = reading(n);
        let (id, bytes) = packer
            .pack(&conn, kind("climate"), Some(&subject), &data)
            .unwrap()
            .unwrap();
        packer.committed();
        assert_eq!(dictionaries(&conn), vec![id]);
        let ev = Unpacker::default().unpack(&conn, n, id, &bytes).unwrap();
        assert_eq!(ev.data, data);
    }

    #[test]
    fn dictionaries_are_renewed_and_replaced_ones_deleted_once_unused() {
        let conn = db();
        let mut packer = Packer::load(&conn).unwrap();
        packer.renew_every = 50;
        let insert = |seq: u64, p: &(i64, Vec<u8>)| {
            conn.execute(
                "INSERT INTO records (seq, id, source, type, time_us, data, packed)
                 VALUES (?1, X'', '', '', 0, ?2, ?3)",
                params![seq as i64, p.1, p.0],
            )
            .unwrap();
        };
        let mut used = std::collections::BTreeSet::new();
        for n in 0..400 {
            // Payloads change half-way (new firmware): a new dictionary packs them better.
            let (subject, mut data) = reading(n);
            if n >= 200 {
                data = format!(r#"{{"v2":true,"seq":{n},"rh":{}}}"#, n % 61).into_bytes();
            }
            if let Some(p) = packer
                .pack(&conn, kind("climate"), Some(&subject), &data)
                .unwrap()
            {
                insert(n, &p);
                used.insert(p.0);
            }
            packer.committed();
        }
        let all = dictionaries(&conn);
        assert!(all.len() >= 2, "{all:?}");
        assert_eq!(
            packer.delete_unused(&conn).unwrap(),
            0,
            "all still referred to"
        );
        // The records go (delivered); the current dictionary stays.
        conn.execute("DELETE FROM records", []).unwrap();
        assert_eq!(packer.delete_unused(&conn).unwrap(), all.len() - 1);
        let left = dictionaries(&conn);
        assert_eq!(left, vec![*all.last().unwrap()]);
        // A restart finds the current one and keeps using it.
        let mut again = Packer::load(&conn).unwrap();
        let (subject, data) = reading(1);
        let (id, _) = again
            .pack(&conn, kind("climate"), Some(&subject), &data)
            .unwrap()
            .unwrap();
        assert_eq!(id, left[0]);
        assert!(used.len() >= 2);
    }
}
