//! The on-disk spool: a write-ahead log of every record, so that a slow or
//! dead sink, a crash or `kill -9` loses nothing that reached it.
//!
//! - Append-only segment files `<first seq, 20 digits>.seg` in the spool
//!   directory. Each record is one frame: `len: u32 LE`, `crc32(body): u32
//!   LE`, then the body: `seq: u64 LE`, `id_len: u8`, the decision id, the
//!   JSON line. Sequence numbers are contiguous and never reused.
//! - One writer (the pipeline thread) appends a whole batch with one
//!   `write`, then publishes `written` (all seq below it are complete on
//!   disk). Segments rotate at `segment_bytes`.
//! - Each sink has a [`SpoolReader`] and a persisted cursor file
//!   `cursor-<sink>` (the next seq to deliver as 20 decimal digits and a
//!   newline, overwritten in place after every acknowledged batch: one
//!   `pwrite`, no rename, as it happens hundreds of times a second under
//!   load; a cursor file that does not parse falls back to the oldest
//!   record, so a torn write can repeat records but never lose one). A segment is deleted once every sink's cursor is
//!   past it.
//! - At start, segments are scanned: a torn or corrupt tail (a crash in the
//!   middle of a write) is cut at the last valid frame.
//! - `lock` is held (`flock`) while the spool is open: two servers never
//!   share one spool.
//! - The most recent written frames are also kept in memory
//!   ([`SpoolShared::recent`], at most [`RECENT_MAX_FRAMES`] and
//!   [`RECENT_MAX_BYTES`]): a reader that is caught up takes its next batch
//!   from there instead of reading back and checking what was just written
//!   (~1,500 instructions per record, callgrind), and notes where in which
//!   segment that batch ends, so that falling back to the file later
//!   resumes there. The file stays the record: a frame joins the memory
//!   only after it is written, and a restart reads the segments.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of a frame besides the decision id and the payload.
pub const FRAME_OVERHEAD: u64 = 4 + 4 + 8 + 1;

/// One spooled record. `id` and `payload` are slices of the buffer the
/// frame was written or read in: no copy or allocation per record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub seq: u64,
    /// The decision id as the frame stores it (at most 255 bytes).
    pub id: Bytes,
    /// The JSON line, without newline.
    pub payload: Bytes,
}

impl Frame {
    /// The decision id as text (cut before any invalid UTF-8, which only
    /// a corrupt or hand-made spool could hold).
    pub fn id(&self) -> &str {
        match std::str::from_utf8(&self.id) {
            Ok(id) => id,
            Err(error) => {
                std::str::from_utf8(self.id.get(..error.valid_up_to()).unwrap_or_default())
                    .unwrap_or_default()
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory `{path}`: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("spool directory `{0}` is in use by another process")]
    Locked(PathBuf),
}

/// Frames kept in memory after they are written, for readers that are
/// caught up.
pub const RECENT_MAX_FRAMES: usize = 16_384;
/// Payload bytes kept in memory, at most.
pub const RECENT_MAX_BYTES: usize = 8 << 20;

/// A written frame and where it ends on disk.
#[derive(Debug, Clone)]
struct RecentFrame {
    frame: Frame,
    /// First seq of its segment.
    segment: u64,
    /// Offset just past it in that segment.
    end: u64,
}

/// The most recent written frames, contiguous in seq.
#[derive(Debug, Default)]
pub struct Recent {
    frames: VecDeque<RecentFrame>,
    bytes: usize,
}

impl Recent {
    fn extend(&mut self, frames: impl IntoIterator<Item = RecentFrame>) {
        for frame in frames {
            if self
                .frames
                .back()
                .is_some_and(|last| last.frame.seq + 1 != frame.frame.seq)
            {
                // Never a gap: a reader takes a contiguous run.
                self.clear();
            }
            self.bytes += frame.frame.payload.len();
            self.frames.push_back(frame);
        }
        while self.frames.len() > RECENT_MAX_FRAMES || self.bytes > RECENT_MAX_BYTES {
            match self.frames.pop_front() {
                Some(old) => self.bytes -= old.frame.payload.len(),
                None => break,
            }
        }
    }

    fn clear(&mut self) {
        self.frames.clear();
        self.bytes = 0;
    }
}

/// State shared by the writer and the readers.
#[derive(Debug)]
pub struct SpoolShared {
    /// Every seq below this is complete on disk.
    pub written: AtomicU64,
    /// The oldest seq still on disk.
    pub floor: AtomicU64,
    /// Per sink: the next seq it has not had acknowledged.
    pub cursors: Vec<AtomicU64>,
    /// Bytes of all segment files.
    pub bytes: AtomicU64,
    /// The most recent written frames (see the module header).
    pub recent: Mutex<Recent>,
}

impl SpoolShared {
    /// The lowest cursor: every seq below it is delivered everywhere.
    pub fn min_cursor(&self) -> u64 {
        self.cursors
            .iter()
            .map(|c| c.load(Ordering::Acquire))
            .min()
            .unwrap_or_else(|| self.written.load(Ordering::Acquire))
    }
}

#[derive(Debug)]
struct Segment {
    first: u64,
    /// One past the last seq in it.
    end: u64,
    bytes: u64,
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

fn cursor_path(dir: &Path, sink: &str) -> PathBuf {
    dir.join(format!("cursor-{sink}"))
}

/// Segment first seqs present in `dir`, sorted.
fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut firsts = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".seg")
            && let Ok(first) = stem.parse::<u64>()
        {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// Encodes one frame onto `out` (a `Vec<u8>` or the writer's `BytesMut`).
pub fn encode_frame<B>(out: &mut B, seq: u64, id: &str, payload: &[u8])
where
    B: BufMut + std::ops::DerefMut<Target = [u8]>,
{
    let id = &id.as_bytes()[..id.len().min(255)];
    let body_len = 8 + 1 + id.len() + payload.len();
    let start = out.len();
    out.put_slice(&(body_len as u32).to_le_bytes());
    out.put_slice(&[0; 4]);
    out.put_slice(&seq.to_le_bytes());
    out.put_u8(id.len() as u8);
    out.put_slice(id);
    out.put_slice(payload);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

enum Next {
    Frame(Frame),
    /// Clean end of file, or an incomplete frame at the end.
    End,
    /// A frame whose checksum or shape is wrong.
    Corrupt,
}

fn read_frame(reader: &mut impl Read) -> io::Result<(Next, u64)> {
    let mut header = [0u8; 8];
    match read_full(reader, &mut header)? {
        0 => return Ok((Next::End, 0)),
        8 => {}
        _ => return Ok((Next::End, 0)),
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if !(9..=64 * 1024 * 1024).contains(&len) {
        return Ok((Next::Corrupt, 0));
    }
    let mut body = vec![0u8; len];
    if read_full(reader, &mut body)? < len {
        return Ok((Next::End, 0));
    }
    if crc32fast::hash(&body) != crc {
        return Ok((Next::Corrupt, 0));
    }
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&body[..8]);
    let seq = u64::from_le_bytes(seq_bytes);
    let id_len = body[8] as usize;
    if 9 + id_len > len {
        return Ok((Next::Corrupt, 0));
    }
    let body = Bytes::from(body);
    let id = body.slice(9..9 + id_len);
    let payload = body.slice(9 + id_len..);
    Ok((Next::Frame(Frame { seq, id, payload }), 8 + len as u64))
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The writing side, owned by the pipeline thread.
#[derive(Debug)]
pub struct SpoolWriter {
    dir: PathBuf,
    segment_bytes: u64,
    cap_bytes: u64,
    segments: VecDeque<Segment>,
    active: File,
    next_seq: u64,
    /// Frames for the next write. Once written, the bytes are frozen and
    /// the frames in [`SpoolShared::recent`] are slices of them.
    buf: BytesMut,
    buf_records: u64,
    /// The buffered frames, to join [`SpoolShared::recent`] once written.
    buf_frames: Vec<BufferedFrame>,
    shared: Arc<SpoolShared>,
    _lock: File,
}

/// A frame in [`SpoolWriter`]'s buffer: where its id and payload are.
#[derive(Debug)]
struct BufferedFrame {
    seq: u64,
    id: std::ops::Range<usize>,
    payload: std::ops::Range<usize>,
    segment: u64,
    end: u64,
}

/// The write buffer grows by at least this much at a time: frames of many
/// writes share one allocation.
const BUF_CHUNK: usize = 256 * 1024;

/// What [`SpoolWriter::open`] found on disk.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recovered {
    /// Records on disk not yet delivered to at least one sink.
    pub pending: u64,
    /// Bytes cut from torn or corrupt segment tails.
    pub truncated_bytes: u64,
}

impl SpoolWriter {
    /// Opens (or creates) the spool in `dir` for the sinks named `sinks`.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        cap_bytes: u64,
        sinks: &[String],
    ) -> Result<(SpoolWriter, Recovered), SpoolError> {
        let io_err = |source| SpoolError::Io {
            path: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io_err)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(io_err)?;
        if lock.try_lock().is_err() {
            return Err(SpoolError::Locked(dir.to_path_buf()));
        }
        let mut recovered = Recovered::default();
        let mut segments = VecDeque::new();
        for first in list_segments(dir).map_err(io_err)? {
            let path = segment_path(dir, first);
            let (segment, cut) = scan_segment(&path, first).map_err(io_err)?;
            recovered.truncated_bytes += cut;
            if segment.end == segment.first {
                let _ = fs::remove_file(&path);
            } else {
                segments.push_back(segment);
            }
        }
        let mut cursors = Vec::with_capacity(sinks.len());
        for sink in sinks {
            let cursor = fs::read_to_string(cursor_path(dir, sink))
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok());
            cursors.push(cursor);
        }
        let floor = segments.front().map(|s| s.first);
        let end = segments.back().map_or(0, |s| s.end);
        let next_seq = cursors.iter().flatten().copied().fold(end, u64::max);
        let floor = floor.unwrap_or(next_seq);
        let cursors: Vec<AtomicU64> = cursors
            .into_iter()
            .map(|c| AtomicU64::new(c.unwrap_or(floor).max(floor)))
            .collect();
        let min = cursors
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(next_seq);
        recovered.pending = next_seq.saturating_sub(min);
        let active_path = segment_path(dir, next_seq);
        let active = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&active_path)
            .map_err(io_err)?;
        segments.push_back(Segment {
            first: next_seq,
            end: next_seq,
            bytes: 0,
        });
        let bytes = segments.iter().map(|s| s.bytes).sum();
        let shared = Arc::new(SpoolShared {
            written: AtomicU64::new(next_seq),
            floor: AtomicU64::new(floor),
            cursors,
            bytes: AtomicU64::new(bytes),
            recent: Mutex::new(Recent::default()),
        });
        let mut writer = SpoolWriter {
            dir: dir.to_path_buf(),
            segment_bytes,
            cap_bytes,
            segments,
            active,
            next_seq,
            buf: BytesMut::with_capacity(BUF_CHUNK),
            buf_records: 0,
            buf_frames: Vec::new(),
            shared,
            _lock: lock,
        };
        writer.gc();
        Ok((writer, recovered))
    }

    pub fn shared(&self) -> Arc<SpoolShared> {
        self.shared.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes on disk plus bytes buffered for the next write.
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed) + self.buf.len() as u64
    }

    /// Whether a record with this id and payload fits under the cap.
    pub fn has_room(&self, id: &str, payload: &[u8]) -> bool {
        self.bytes() + FRAME_OVERHEAD + id.len() as u64 + payload.len() as u64 <= self.cap_bytes
    }

    /// Buffers one record; [`flush`](Self::flush) writes it.
    pub fn push(&mut self, id: &str, payload: &[u8]) -> u64 {
        let seq = self.next_seq;
        let id_len = id.len().min(255);
        let frame_len = FRAME_OVERHEAD as usize + id_len + payload.len();
        if self.buf.capacity() - self.buf.len() < frame_len {
            self.buf.reserve(frame_len.max(BUF_CHUNK));
        }
        let start = self.buf.len();
        encode_frame(&mut self.buf, seq, id, payload);
        self.next_seq += 1;
        self.buf_records += 1;
        let (segment, written) = self
            .segments
            .back()
            .map_or((seq, 0), |active| (active.first, active.bytes));
        let id_start = start + FRAME_OVERHEAD as usize;
        self.buf_frames.push(BufferedFrame {
            seq,
            id: id_start..id_start + id_len,
            payload: id_start + id_len..self.buf.len(),
            segment,
            end: written + self.buf.len() as u64,
        });
        seq
    }

    /// Writes buffered records to the active segment (one `write`), makes
    /// them visible to readers, and rotates the segment when it is full.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.active.write_all(&self.buf)?;
        let written = self.buf.len() as u64;
        if let Some(active) = self.segments.back_mut() {
            active.bytes += written;
            active.end = self.next_seq;
        }
        self.shared.bytes.fetch_add(written, Ordering::Relaxed);
        // The rest of the allocation stays the buffer's.
        let chunk = self.buf.split().freeze();
        self.buf_records = 0;
        // Written, so readers may have them from memory.
        self.shared
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(self.buf_frames.drain(..).map(|frame| RecentFrame {
                frame: Frame {
                    seq: frame.seq,
                    id: chunk.slice(frame.id),
                    payload: chunk.slice(frame.payload),
                },
                segment: frame.segment,
                end: frame.end,
            }));
        self.shared.written.store(self.next_seq, Ordering::Release);
        if self
            .segments
            .back()
            .is_some_and(|s| s.bytes >= self.segment_bytes)
        {
            self.rotate()?;
        }
        Ok(())
    }

    /// After a failed write: forgets the buffered records (returns how
    /// many) and continues in a fresh segment, past any torn bytes.
    pub fn discard_buffer(&mut self) -> u64 {
        let lost = self.buf_records;
        self.buf.clear();
        self.buf_records = 0;
        self.buf_frames.clear();
        if let Err(error) = self.rotate() {
            tracing::error!(%error, "decision log spool: cannot start a new segment");
        }
        lost
    }

    /// `fdatasync` of the active segment.
    pub fn sync(&mut self) -> io::Result<()> {
        self.active.sync_data()
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.active.sync_data()?;
        self.active = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&self.dir, self.next_seq))?;
        self.segments.push_back(Segment {
            first: self.next_seq,
            end: self.next_seq,
            bytes: 0,
        });
        Ok(())
    }

    /// Deletes segments every sink has acknowledged past.
    pub fn gc(&mut self) {
        let min = self.shared.min_cursor();
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.end <= min) {
            self.remove_oldest();
        }
    }

    fn remove_oldest(&mut self) -> Option<Segment> {
        let segment = self.segments.pop_front()?;
        let _ = fs::remove_file(segment_path(&self.dir, segment.first));
        self.shared
            .bytes
            .fetch_sub(segment.bytes, Ordering::Relaxed);
        if let Some(next) = self.segments.front() {
            self.shared.floor.store(next.first, Ordering::Release);
        }
        Some(segment)
    }

    /// Overflow policy `drop_oldest`: deletes the oldest segment (rotating
    /// first if only the active one is left) and returns how many of its
    /// records some sink had not yet acknowledged; `None` when nothing can go.
    pub fn drop_oldest(&mut self) -> io::Result<Option<u64>> {
        self.flush()?;
        if self.segments.len() == 1 {
            if self.segments.front().is_some_and(|s| s.bytes == 0) {
                return Ok(None);
            }
            self.rotate()?;
        }
        let min = self.shared.min_cursor();
        Ok(self
            .remove_oldest()
            .map(|s| s.end.saturating_sub(s.first.max(min))))
    }
}

/// Reads a segment, cuts it at the first invalid frame, returns its extent
/// and the bytes cut.
fn scan_segment(path: &Path, first: u64) -> io::Result<(Segment, u64)> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let total = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(256 * 1024, &file);
    let mut valid = 0u64;
    let mut end = first;
    while let (Next::Frame(frame), len) = read_frame(&mut reader)? {
        // A segment's frames are contiguous from its first seq: a frame
        // with any other seq (a checksum that holds over a wrong frame) is
        // corrupt, and so is what follows it. Taken as the end, a seq of
        // u64::MAX wrapped `end` to 0, and the reopened spool wrote over
        // (and never delivered) every record before it.
        if frame.seq != end {
            break;
        }
        valid += len;
        end = frame.seq.saturating_add(1);
    }
    drop(reader);
    let cut = total - valid;
    if cut > 0 {
        tracing::warn!(path = %path.display(), cut, "decision log spool: cut a torn segment tail");
        file.set_len(valid)?;
        file.sync_all()?;
    }
    Ok((
        Segment {
            first,
            end,
            bytes: valid,
        },
        cut,
    ))
}

/// One sink's reading side: sequential reads from its cursor.
#[derive(Debug)]
pub struct SpoolReader {
    dir: PathBuf,
    sink: String,
    index: usize,
    shared: Arc<SpoolShared>,
    next: u64,
    file: Option<(u64, BufReader<File>)>,
    /// After a batch from memory: (segment, offset, seq) where the file
    /// read would go on.
    resume: Option<(u64, u64, u64)>,
    cursor_file: Option<File>,
    /// Records skipped because their frames were corrupt.
    pub skipped: u64,
}

impl SpoolReader {
    pub fn new(dir: &Path, sink: &str, index: usize, shared: Arc<SpoolShared>) -> Self {
        let next = shared
            .cursors
            .get(index)
            .map_or(0, |c| c.load(Ordering::Acquire));
        SpoolReader {
            dir: dir.to_path_buf(),
            sink: sink.to_owned(),
            index,
            shared,
            next,
            file: None,
            resume: None,
            cursor_file: None,
            skipped: 0,
        }
    }

    /// Records written but not yet acknowledged by this sink.
    pub fn lag(&self) -> u64 {
        let cursor = self
            .shared
            .cursors
            .get(self.index)
            .map_or(0, |c| c.load(Ordering::Acquire));
        self.shared
            .written
            .load(Ordering::Acquire)
            .saturating_sub(cursor)
    }

    /// The oldest seq still on disk.
    pub fn floor(&self) -> u64 {
        self.shared.floor.load(Ordering::Acquire)
    }

    /// Persists and publishes that every seq below `next` is acknowledged.
    pub fn commit(&mut self, next: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let file = match &mut self.cursor_file {
            Some(file) => file,
            slot => slot.insert(
                OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(cursor_path(&self.dir, &self.sink))?,
            ),
        };
        // Fixed width: every write covers the whole of the previous one.
        file.write_all_at(format!("{next:020}\n").as_bytes(), 0)?;
        if let Some(cursor) = self.shared.cursors.get(self.index) {
            cursor.store(next, Ordering::Release);
        }
        Ok(())
    }

    /// Up to `max` records from where this reader stands (empty: caught up).
    pub fn read(&mut self, max: usize) -> io::Result<Vec<Frame>> {
        let written = self.shared.written.load(Ordering::Acquire);
        if let Some(frames) = self.read_memory_at(max, written) {
            return Ok(frames);
        }
        let mut out = Vec::new();
        while out.len() < max && self.next < written {
            if self.file.is_none() && !self.open_for(self.next)? {
                break;
            }
            let Some((first, reader)) = self.file.as_mut() else {
                break;
            };
            let position = reader.stream_position()?;
            match read_frame(reader)? {
                (Next::Frame(frame), _) => {
                    if frame.seq >= self.next {
                        self.next = frame.seq.saturating_add(1);
                        out.push(frame);
                    }
                }
                (Next::End, _) => {
                    // Frames below `written` are complete, so the next one
                    // is in a later segment: the one that starts at `next`
                    // or, after a failed write whose records were dropped
                    // (and counted) with the torn segment, the first one
                    // after this segment (without this the reader stopped
                    // there for good).
                    reader.seek(SeekFrom::Start(position))?;
                    let current = *first;
                    let Some(later) = list_segments(&self.dir)?.into_iter().find(|f| *f > current)
                    else {
                        break;
                    };
                    self.next = self.next.max(later.min(written));
                    if !self.open_for(self.next)?
                        || self.file.as_ref().is_some_and(|(f, _)| *f == current)
                    {
                        break;
                    }
                }
                (Next::Corrupt, _) => {
                    tracing::error!(sink = %self.sink, segment = *first, "decision log spool: corrupt frame, skipping the rest of the segment");
                    let current = *first;
                    let later = list_segments(&self.dir)?
                        .into_iter()
                        .find(|f| *f > current)
                        .unwrap_or(written);
                    self.skipped += later.saturating_sub(self.next);
                    self.next = later;
                    self.file = None;
                }
            }
        }
        Ok(out)
    }

    /// [`Self::read`] when it needs no file: the next batch from memory,
    /// or nothing when caught up; `None` when the file must be read. Cheap
    /// enough for an async task (a lock and reference counts, no IO).
    pub fn read_memory(&mut self, max: usize) -> Option<Vec<Frame>> {
        let written = self.shared.written.load(Ordering::Acquire);
        self.read_memory_at(max, written)
    }

    fn read_memory_at(&mut self, max: usize, written: u64) -> Option<Vec<Frame>> {
        let floor = self.shared.floor.load(Ordering::Acquire);
        if self.next < floor {
            // Dropped by `drop_oldest`, which counted them.
            self.next = floor;
            self.file = None;
        }
        if self.next >= written {
            return Some(Vec::new());
        }
        self.read_recent(max, written)
    }

    /// The next batch from [`SpoolShared::recent`], when it holds `next`.
    fn read_recent(&mut self, max: usize, written: u64) -> Option<Vec<Frame>> {
        let recent = self
            .shared
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let first = recent.frames.front()?.frame.seq;
        let skip = usize::try_from(self.next.checked_sub(first)?).ok()?;
        let mut out = Vec::new();
        let mut last = None;
        // `range` starts there at once (a reader a few thousand frames
        // behind would otherwise walk them on every batch).
        let skip = skip.min(recent.frames.len());
        for recent in recent.frames.range(skip..).take(max) {
            if recent.frame.seq >= written {
                break;
            }
            out.push(recent.frame.clone());
            last = Some((recent.segment, recent.end, recent.frame.seq));
        }
        let (segment, end, seq) = last?;
        self.next = seq + 1;
        // The file position no longer matches: reopen at the noted place
        // if the file is needed again.
        self.file = None;
        self.resume = Some((segment, end, self.next));
        Some(out)
    }

    /// Opens the segment holding `seq`; false if there is none.
    fn open_for(&mut self, seq: u64) -> io::Result<bool> {
        let firsts = list_segments(&self.dir)?;
        let Some(first) = firsts
            .iter()
            .rev()
            .find(|f| **f <= seq)
            .or_else(|| firsts.first())
            .copied()
        else {
            self.file = None;
            return Ok(false);
        };
        if first > self.next {
            self.next = first;
        }
        match File::open(segment_path(&self.dir, first)) {
            Ok(file) => {
                let mut reader = BufReader::with_capacity(256 * 1024, file);
                if let Some((segment, offset, at)) = self.resume.take()
                    && segment == first
                    && at == seq
                {
                    reader.seek(SeekFrom::Start(offset))?;
                }
                self.file = Some((first, reader));
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.file = None;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sinks() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    fn write(writer: &mut SpoolWriter, n: u64) {
        for i in 0..n {
            let seq = writer.next_seq;
            writer.push(&format!("id-{seq}"), format!("{{\"n\":{i}}}").as_bytes());
        }
        writer.flush().unwrap();
    }

    /// Every frame a reader gets: from memory while caught up, from the
    /// file once it fell behind the memory, resuming where the memory
    /// batch ended (within a segment and across rotations).
    #[test]
    fn caught_up_readers_read_from_memory_and_fall_back_to_the_file_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _) = SpoolWriter::open(dir.path(), 4096, 1 << 30, &sinks()).unwrap();
        let mut a = SpoolReader::new(dir.path(), "a", 0, writer.shared());
        let mut got: Vec<Frame> = Vec::new();
        write(&mut writer, 10);
        got.extend(a.read(4).unwrap());
        assert!(a.resume.is_some(), "a caught-up batch comes from memory");
        // Fall far behind: the memory keeps only the newest frames.
        for _ in 0..((RECENT_MAX_FRAMES as u64 / 1000) + 2) {
            write(&mut writer, 1000);
        }
        let total = writer.next_seq;
        let oldest_in_memory = writer.shared().recent.lock().unwrap().frames[0].frame.seq;
        assert!(oldest_in_memory > 4, "{oldest_in_memory}");
        while (got.len() as u64) < total {
            let batch = a.read(700).unwrap();
            assert!(!batch.is_empty());
            got.extend(batch);
        }
        assert!(a.read(700).unwrap().is_empty());
        // Every seq once, in order, and each frame as the file holds it.
        let seqs: Vec<u64> = got.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, (0..total).collect::<Vec<_>>());
        writer.shared().recent.lock().unwrap().clear();
        let mut from_disk = SpoolReader::new(dir.path(), "b", 1, writer.shared());
        let mut disk = Vec::new();
        while (disk.len() as u64) < total {
            disk.extend(from_disk.read(5000).unwrap());
        }
        assert!(from_disk.resume.is_none());
        assert_eq!(got, disk);
        // A batch that was discarded (a failed write) never reaches memory.
        writer.push("lost", b"{}");
        assert_eq!(writer.discard_buffer(), 1);
        write(&mut writer, 3);
        let after: Vec<u64> = a.read(100).unwrap().iter().map(|f| f.seq).collect();
        assert_eq!(after, vec![total + 1, total + 2, total + 3]);
        assert_eq!(a.read(100).unwrap().len(), 0);
    }

    /// A well-framed record whose seq breaks the segment's sequence (a
    /// checksum that holds over a wrong frame) ends the segment there: the
    /// records before it are delivered and the next seq is not reused
    /// (fuzz/artifacts/spool_reader: a seq of u64::MAX made the reopened
    /// spool start again at 0).
    #[test]
    fn a_frame_out_of_sequence_ends_its_segment() {
        for bogus in [u64::MAX, 0, 7, 1_000] {
            let dir = tempfile::tempdir().unwrap();
            {
                let (mut writer, _) =
                    SpoolWriter::open(dir.path(), 1 << 20, 1 << 30, &sinks()).unwrap();
                write(&mut writer, 3);
            }
            let path = segment_path(dir.path(), 0);
            let mut bytes = fs::read(&path).unwrap();
            encode_frame(&mut bytes, bogus, "bogus", b"{}");
            fs::write(&path, &bytes).unwrap();
            let (mut writer, recovered) =
                SpoolWriter::open(dir.path(), 1 << 20, 1 << 30, &sinks()).unwrap();
            assert!(recovered.truncated_bytes > 0, "{bogus}");
            write(&mut writer, 1);
            let mut a = SpoolReader::new(dir.path(), "a", 0, writer.shared());
            let seqs: Vec<u64> = a.read(100).unwrap().iter().map(|f| f.seq).collect();
            assert_eq!(seqs, [0, 1, 2, 3], "{bogus}");
        }
    }

    #[test]
    fn records_are_read_in_order_across_segments_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _) = SpoolWriter::open(dir.path(), 200, 1 << 20, &sinks()).unwrap();
        for _ in 0..10 {
            write(&mut writer, 3);
        }
        let mut a = SpoolReader::new(dir.path(), "a", 0, writer.shared());
        let got: Vec<u64> = a.read(1000).unwrap().iter().map(|f| f.seq).collect();
        assert_eq!(got, (0..30).collect::<Vec<_>>());
        a.commit(30).unwrap();
        // b acknowledged only 10: segments below 10 may go, none above.
        let mut b = SpoolReader::new(dir.path(), "b", 1, writer.shared());
        assert_eq!(b.read(10).unwrap().len(), 10);
        b.commit(10).unwrap();
        writer.gc();
        drop((a, b, writer));

        // Reopen, with a torn tail appended to the last segment.
        let last = *list_segments(dir.path()).unwrap().last().unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(segment_path(dir.path(), last))
            .unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let (mut writer, recovered) =
            SpoolWriter::open(dir.path(), 200, 1 << 20, &sinks()).unwrap();
        assert_eq!(recovered.pending, 20);
        assert_eq!(writer.next_seq, 30);
        let mut b = SpoolReader::new(dir.path(), "b", 1, writer.shared());
        let got: Vec<u64> = b.read(1000).unwrap().iter().map(|f| f.seq).collect();
        assert_eq!(got, (10..30).collect::<Vec<_>>());
        write(&mut writer, 2);
        let got: Vec<u64> = b.read(1000).unwrap().iter().map(|f| f.seq).collect();
        assert_eq!(got, vec![30, 31]);
        let mut a = SpoolReader::new(dir.path(), "a", 0, writer.shared());
        assert_eq!(a.read(1000).unwrap().len(), 2);
    }

    #[test]
    fn drop_oldest_counts_undelivered_records() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _) = SpoolWriter::open(dir.path(), 100, 1 << 20, &sinks()).unwrap();
        for _ in 0..6 {
            write(&mut writer, 2);
        }
        let mut a = SpoolReader::new(dir.path(), "a", 0, writer.shared());
        a.commit(1).unwrap();
        let mut b = SpoolReader::new(dir.path(), "b", 1, writer.shared());
        b.commit(1).unwrap();
        let first = writer.segments.front().map(|s| (s.first, s.end)).unwrap();
        let dropped = writer.drop_oldest().unwrap().unwrap();
        assert_eq!(dropped, first.1 - 1);
        let got = a.read(1000).unwrap();
        assert_eq!(got.first().unwrap().seq, first.1);
        assert_eq!(a.skipped, 0);
    }

    #[test]
    fn cursors_are_overwritten_in_place_and_a_garbled_one_repeats_rather_than_loses() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _) = SpoolWriter::open(dir.path(), 1000, 1 << 20, &sinks()).unwrap();
        write(&mut writer, 30);
        let mut a = SpoolReader::new(dir.path(), "a", 0, writer.shared());
        a.commit(123_456).unwrap();
        a.commit(25).unwrap();
        let text = fs::read_to_string(cursor_path(dir.path(), "a")).unwrap();
        assert_eq!(text, "00000000000000000025\n");
        let mut b = SpoolReader::new(dir.path(), "b", 1, writer.shared());
        b.commit(20).unwrap();
        drop((a, b, writer));

        let (_, recovered) = SpoolWriter::open(dir.path(), 1000, 1 << 20, &sinks()).unwrap();
        assert_eq!(recovered.pending, 10, "b's cursor (20) is the lowest");

        // A torn cursor write: `b` starts again from the oldest record.
        fs::write(cursor_path(dir.path(), "b"), "0000000\0\0\0").unwrap();
        let (writer, recovered) = SpoolWriter::open(dir.path(), 1000, 1 << 20, &sinks()).unwrap();
        assert_eq!(recovered.pending, 30);
        let mut b = SpoolReader::new(dir.path(), "b", 1, writer.shared());
        assert_eq!(b.read(1000).unwrap().first().map(|f| f.seq), Some(0));
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = SpoolWriter::open(dir.path(), 100, 1 << 20, &sinks()).unwrap();
        assert!(matches!(
            SpoolWriter::open(dir.path(), 100, 1 << 20, &sinks()),
            Err(SpoolError::Locked(_))
        ));
    }
}
