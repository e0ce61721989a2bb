//! `logs/<id>.txt`: a human-readable mirror of the applied log (see
//! CONTRACT.md, "On disk").
//!
//! One line per applied entry, `<index>, <term>, <command as compact JSON>`,
//! or `# snapshot <index>, <term>` when the node was brought up to date by a
//! snapshot; numbering continues from the line before's index + 1.
//!
//! The mirror is never fsynced: the durable log is the truth and the mirror
//! is rebuilt from it. What [`Mirror::open`] guarantees instead is that the
//! file is always a clean prefix of the mirror, so replaying entries after a
//! restart neither duplicates nor drops a line: whatever a crash left after
//! the last good line (a torn line, zeros from a power loss) is cut off, and
//! [`Mirror::append`] skips indexes already present.
//!
//! With a [`Rotation`], the mirror does not grow forever: a new file starts
//! at every index `every × k + 1` (the same indexes on every node, so
//! replicas stay diffable file by file), beginning with the line
//! `# snapshot <every × k>, <term>` that says where its numbering continues;
//! the previous file becomes `<path>.1`, that one `<path>.2`, and so on, and
//! files beyond `keep` are deleted.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::raft::types::{Index, Term};

/// Version of the mirror's line format (entry lines and `# snapshot` lines), shown by `raft-zmq --version`.
pub const MIRROR_FORMAT_VERSION: u32 = 1;

const SNAPSHOT_PREFIX: &str = "# snapshot ";

/// A mirror failure: the file and what went wrong with it.
#[derive(Debug)]
pub struct MirrorError {
    path: PathBuf,
    problem: String,
}

impl fmt::Display for MirrorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mirror {}: {}", self.path.display(), self.problem)
    }
}

impl std::error::Error for MirrorError {}

/// When the mirror starts a new file, and how many old ones it keeps.
#[derive(Clone, Copy, Debug)]
pub struct Rotation {
    pub every: u64,
    pub keep: usize,
}

/// An open mirror file, positioned for appending after its last good line.
pub struct Mirror {
    path: PathBuf,
    out: BufWriter<File>,
    last_index: Index,
    /// Term of the last line, for the first line of the next file.
    last_term: Term,
    /// Bytes in the current file.
    len: u64,
    rotation: Option<Rotation>,
    /// The line being written, kept to be reused.
    line: Vec<u8>,
}

impl Mirror {
    /// Opens or creates the file (and its parent dirs), then cuts it after
    /// the last line of its valid prefix: everything from the first torn
    /// (no trailing `\n`), unparsable or out-of-sequence line on is dropped,
    /// with a warning.
    pub fn open(path: &Path) -> Result<Mirror, MirrorError> {
        let err =
            |what: &str, e: io::Error| MirrorError { path: path.to_path_buf(), problem: format!("cannot {what}: {e}") };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| err("create its directory", e))?;
        }
        let file = OpenOptions::new().read(true).append(true).create(true).open(path).map_err(|e| err("open", e))?;
        let mut mirror = Mirror {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            last_index: 0,
            last_term: 0,
            len: 0,
            rotation: None,
            line: Vec::new(),
        };
        mirror.cut_invalid_tail()?;
        Ok(mirror)
    }

    /// Splits the mirror into files from now on (see the module docs).
    pub fn with_rotation(self, rotation: Rotation) -> Mirror {
        Mirror { rotation: Some(rotation).filter(|r| r.every > 0), ..self }
    }

    /// Index of the last line kept (0 if none; a snapshot line counts as its
    /// index).
    pub fn last_index(&self) -> Index {
        self.last_index
    }

    /// Appends `<index>, <term>, <json>`. An index at or below
    /// [`Mirror::last_index`] is skipped (it is already mirrored, e.g. entries
    /// replayed after a restart); one beyond `last_index + 1` is an error, as
    /// the gap would mean the caller skipped an entry.
    pub fn append(&mut self, index: Index, term: Term, json: &str) -> Result<(), MirrorError> {
        if index <= self.last_index {
            return Ok(());
        }
        if index != self.last_index + 1 {
            return Err(self.error(format!("entry {index} would leave a gap after line {}", self.last_index)));
        }
        // The reader would reject such a line and cut the file there.
        if json.is_empty() || has_control_bytes(json.as_bytes()) {
            return Err(self.error(format!("entry {index}: command {json:?} is not compact one-line JSON")));
        }
        if self.rotation.is_some_and(|r| (index - 1).is_multiple_of(r.every)) && self.len > 0 {
            self.rotate()?;
        }
        // Into a buffer kept for the next line: this runs for every entry applied.
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        write!(line, "{index}, {term}, {json}").expect("writing to memory cannot fail");
        let written = self.write_line(index, term, &line);
        self.line = line;
        written
    }

    fn write_line(&mut self, index: Index, term: Term, line: &[u8]) -> Result<(), MirrorError> {
        let mut write = || self.out.write_all(line).and_then(|()| self.out.write_all(b"\n"));
        write().map_err(|e| self.error(format!("cannot append line {index}: {e}")))?;
        self.len += line.len() as u64 + 1;
        self.last_index = index;
        self.last_term = term;
        Ok(())
    }

    /// Moves the current file to `<path>.1` (and older ones one further,
    /// deleting what passes `keep`), and starts a new one where it stopped.
    fn rotate(&mut self) -> Result<(), MirrorError> {
        let keep = self.rotation.map_or(0, |r| r.keep);
        self.flush()?;
        let numbered = |n: usize| PathBuf::from(format!("{}.{n}", self.path.display()));
        let err = |what: String, e: io::Error| self.error(format!("cannot {what}: {e}"));
        let ignore_missing = |result: io::Result<()>| match result {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        };
        ignore_missing(fs::remove_file(numbered(keep.max(1)))).map_err(|e| err("delete the oldest file".into(), e))?;
        for n in (1..keep).rev() {
            ignore_missing(fs::rename(numbered(n), numbered(n + 1))).map_err(|e| err(format!("rename file {n}"), e))?;
        }
        if keep == 0 {
            fs::remove_file(&self.path).map_err(|e| err("delete the full file".into(), e))?;
        } else {
            fs::rename(&self.path, numbered(1)).map_err(|e| err("rotate".into(), e))?;
        }
        let file =
            OpenOptions::new().append(true).create(true).open(&self.path).map_err(|e| err("create".into(), e))?;
        self.out = BufWriter::new(file);
        self.len = 0;
        let (index, term) = (self.last_index, self.last_term);
        self.write_line(index, term, format!("{SNAPSHOT_PREFIX}{index}, {term}").as_bytes())
    }

    /// Appends `# snapshot <index>, <term>`; numbering continues at
    /// `index + 1`. Like [`Mirror::append`], an index at or below
    /// `last_index` is already covered and skipped.
    pub fn append_snapshot(&mut self, index: Index, term: Term) -> Result<(), MirrorError> {
        if index <= self.last_index {
            return Ok(());
        }
        self.write_line(index, term, format!("{SNAPSHOT_PREFIX}{index}, {term}").as_bytes())
    }

    /// Hands buffered lines to the OS. No fsync: after a crash the mirror is
    /// completed from the durable log.
    pub fn flush(&mut self) -> Result<(), MirrorError> {
        self.out.flush().map_err(|e| self.error(format!("cannot write: {e}")))
    }

    /// Scans the file from the start and truncates it after the last valid
    /// line; sets `last_index` to that line's index.
    fn cut_invalid_tail(&mut self) -> Result<(), MirrorError> {
        let file = self.out.get_ref();
        let (keep_len, (last_index, last_term), invalid) =
            scan(file).map_err(|e| self.error(format!("cannot read: {e}")))?;
        let len = file.metadata().map_err(|e| self.error(format!("cannot stat: {e}")))?.len();
        if let Some(why) = invalid.filter(|_| keep_len < len) {
            log::warn!(
                "mirror {}: {why}; cutting {} bytes after line {last_index}",
                self.path.display(),
                len - keep_len
            );
            file.set_len(keep_len).map_err(|e| self.error(format!("cannot truncate to {keep_len} bytes: {e}")))?;
        }
        self.last_index = last_index;
        self.last_term = last_term;
        self.len = keep_len;
        Ok(())
    }

    fn error(&self, problem: String) -> MirrorError {
        MirrorError { path: self.path.clone(), problem }
    }
}

/// Reads lines while they are valid and consecutive.
/// Returns the byte length of that prefix, the index and term of its last
/// line, and why the scan stopped early if it was because of a bad line.
fn scan(file: &File) -> io::Result<(u64, (Index, Term), Option<String>)> {
    let mut reader = BufReader::new(file);
    // `file` is opened for appending, so reads start wherever the last
    // operation left the shared offset: go back to the start.
    io::Seek::rewind(&mut reader)?;
    let (mut keep_len, mut last) = (0u64, (0, 0));
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line)?;
        if read == 0 {
            return Ok((keep_len, last, None));
        }
        let Some(body) = line.strip_suffix(b"\n") else {
            return Ok((keep_len, last, Some("last line is torn".to_string())));
        };
        let position = match parse_line(body, last.0) {
            Ok(position) => position,
            Err(problem) => {
                return Ok((keep_len, last, Some(format!("line after {} is bad: {problem}", last.0))));
            }
        };
        keep_len += read as u64;
        last = position;
    }
}

/// Whether `bytes` holds a byte below 0x20 (`\n` among them). Without an
/// early exit, so that it compiles to vector code: every line is checked.
fn has_control_bytes(bytes: &[u8]) -> bool {
    bytes.iter().fold(false, |found, &b| found | (b < 0x20))
}

/// Parses one line (without its `\n`) that must follow a line with index
/// `last`; returns its index and term.
fn parse_line(body: &[u8], last: Index) -> Result<(Index, Term), String> {
    if has_control_bytes(body) {
        return Err("control characters (power-loss garbage?)".to_string());
    }
    let text = std::str::from_utf8(body).map_err(|_| "not UTF-8".to_string())?;
    if let Some(rest) = text.strip_prefix(SNAPSHOT_PREFIX) {
        let (index, term) = rest.split_once(", ").ok_or("snapshot line without a term")?;
        let index = parse_number(index).ok_or("snapshot index is not a number")?;
        let term = parse_number(term).ok_or("snapshot term is not a number")?;
        if index <= last {
            return Err(format!("snapshot at {index} does not move past {last}"));
        }
        return Ok((index, term));
    }
    let mut fields = text.splitn(3, ", ");
    let index = fields.next().and_then(parse_number).ok_or("no index")?;
    let term = fields.next().and_then(parse_number).ok_or("no term")?;
    if fields.next().is_none_or(str::is_empty) {
        return Err("no command".to_string());
    }
    if index != last + 1 {
        return Err(format!("index {index} is not {}", last + 1));
    }
    Ok((index, term))
}

/// Strict decimal: `u64::from_str` would also take a leading `+`.
fn parse_number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("logs").join("0.txt");
        (tmp, path)
    }

    fn contents(path: &Path) -> String {
        fs::read_to_string(path).unwrap()
    }

    const PUT: &str = r#"{"op":"put","key":"a","value":"1"}"#;

    #[test]
    fn fresh_file_is_created_empty() {
        let (_tmp, path) = setup();
        let m = Mirror::open(&path).unwrap();
        assert_eq!(m.last_index(), 0);
        assert_eq!(contents(&path), "");
    }

    #[test]
    fn append_flush_reopen() {
        let (_tmp, path) = setup();
        let mut m = Mirror::open(&path).unwrap();
        m.append(1, 1, r#"{"op":"noop"}"#).unwrap();
        m.append(2, 1, PUT).unwrap();
        m.flush().unwrap();
        assert_eq!(contents(&path), format!("1, 1, {{\"op\":\"noop\"}}\n2, 1, {PUT}\n"));
        drop(m);
        let mut m = Mirror::open(&path).unwrap();
        assert_eq!(m.last_index(), 2);
        m.append(3, 2, PUT).unwrap();
        m.flush().unwrap();
        assert!(contents(&path).ends_with(&format!("\n3, 2, {PUT}\n")));
    }

    #[test]
    fn already_mirrored_indexes_are_skipped() {
        let (_tmp, path) = setup();
        let mut m = Mirror::open(&path).unwrap();
        m.append(1, 1, PUT).unwrap();
        m.append(1, 1, PUT).unwrap();
        m.append(2, 1, PUT).unwrap();
        m.append(1, 1, PUT).unwrap();
        m.flush().unwrap();
        assert_eq!(contents(&path).lines().count(), 2);
        assert_eq!(m.last_index(), 2);
    }

    #[test]
    fn gap_is_an_error() {
        let (_tmp, path) = setup();
        let mut m = Mirror::open(&path).unwrap();
        m.append(1, 1, PUT).unwrap();
        let e = m.append(3, 1, PUT).unwrap_err().to_string();
        assert!(e.starts_with(&format!("mirror {}: ", path.display())), "{e}");
        assert!(e.contains("entry 3 would leave a gap after line 1"), "{e}");
        assert_eq!(m.last_index(), 1);
    }

    #[test]
    fn multi_line_or_empty_command_is_an_error() {
        let (_tmp, path) = setup();
        let mut m = Mirror::open(&path).unwrap();
        assert!(m.append(1, 1, "{\n}").is_err());
        assert!(m.append(1, 1, "").is_err());
        assert_eq!(m.last_index(), 0);
    }

    #[test]
    fn torn_last_line_is_dropped() {
        let (_tmp, path) = setup();
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, format!("1, 1, {PUT}\n2, 1, {{\"op\":\"pu")).unwrap();
        let mut m = Mirror::open(&path).unwrap();
        assert_eq!(m.last_index(), 1);
        assert_eq!(contents(&path), format!("1, 1, {PUT}\n"));
        m.append(2, 1, PUT).unwrap();
        m.flush().unwrap();
        assert_eq!(contents(&path), format!("1, 1, {PUT}\n2, 1, {PUT}\n"));
    }

    #[test]
    fn garbage_middle_line_cuts_the_rest() {
        let (_tmp, path) = setup();
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, format!("1, 1, {PUT}\nhello world\n3, 1, {PUT}\n")).unwrap();
        let m = Mirror::open(&path).unwrap();
        assert_eq!(m.last_index(), 1);
        assert_eq!(contents(&path), format!("1, 1, {PUT}\n"));
    }

    #[test]
    fn out_of_sequence_line_cuts_the_rest() {
        for bad in ["3, 1, {}", "1, 1, {}", "+2, 1, {}", "2, x, {}", "2, 1, ", "2, 1"] {
            let (_tmp, path) = setup();
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, format!("1, 1, {PUT}\n{bad}\n2, 1, {PUT}\n")).unwrap();
            let m = Mirror::open(&path).unwrap();
            assert_eq!(m.last_index(), 1, "after {bad:?}");
            assert_eq!(contents(&path), format!("1, 1, {PUT}\n"), "after {bad:?}");
        }
    }

    #[test]
    fn first_line_must_be_index_one_or_a_snapshot() {
        let (_tmp, path) = setup();
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, format!("2, 1, {PUT}\n")).unwrap();
        assert_eq!(Mirror::open(&path).unwrap().last_index(), 0);
        assert_eq!(contents(&path), "");
    }

    #[test]
    fn power_loss_zeros_are_cut() {
        let (_tmp, path) = setup();
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let good = format!("1, 1, {PUT}\n");
        for tail in [vec![0u8; 4096], [b"2, 1, {\"op\"".as_slice(), &[0; 100], b"\n"].concat()] {
            fs::write(&path, [good.as_bytes(), &tail].concat()).unwrap();
            let m = Mirror::open(&path).unwrap();
            assert_eq!(m.last_index(), 1);
            assert_eq!(contents(&path), good);
        }
    }

    #[test]
    fn snapshot_line_continues_numbering() {
        let (_tmp, path) = setup();
        let mut m = Mirror::open(&path).unwrap();
        m.append(1, 1, PUT).unwrap();
        m.append_snapshot(10, 3).unwrap();
        assert_eq!(m.last_index(), 10);
        m.append_snapshot(7, 2).unwrap(); // already covered: skipped
        assert!(m.append(10, 3, PUT).is_ok(), "covered by the snapshot");
        m.append(11, 3, PUT).unwrap();
        m.flush().unwrap();
        assert_eq!(contents(&path), format!("1, 1, {PUT}\n# snapshot 10, 3\n11, 3, {PUT}\n"));
        drop(m);
        assert_eq!(Mirror::open(&path).unwrap().last_index(), 11);
    }

    #[test]
    fn file_starting_with_a_snapshot_reopens() {
        let (_tmp, path) = setup();
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, format!("# snapshot 5, 2\n6, 2, {PUT}\n# snapshot 6, 2\n")).unwrap();
        let m = Mirror::open(&path).unwrap();
        assert_eq!(m.last_index(), 6, "a snapshot that does not move forward is cut");
        assert_eq!(contents(&path), format!("# snapshot 5, 2\n6, 2, {PUT}\n"));
    }

    #[test]
    fn rotation_starts_a_file_at_every_boundary_and_keeps_a_few() {
        let (_tmp, path) = setup();
        let mut m = Mirror::open(&path).unwrap().with_rotation(Rotation { every: 3, keep: 2 });
        for index in 1..=10 {
            m.append(index, 1 + index / 5, PUT).unwrap();
        }
        m.flush().unwrap();
        let numbered = |n: usize| PathBuf::from(format!("{}.{n}", path.display()));
        assert_eq!(contents(&path), format!("# snapshot 9, 2\n10, 3, {PUT}\n"));
        assert_eq!(contents(&numbered(1)), format!("# snapshot 6, 2\n7, 2, {PUT}\n8, 2, {PUT}\n9, 2, {PUT}\n"));
        assert!(contents(&numbered(2)).starts_with("# snapshot 3, 1\n4, 1, "));
        assert!(!numbered(3).exists(), "only two old files are kept");
        drop(m);
        let mut m = Mirror::open(&path).unwrap().with_rotation(Rotation { every: 3, keep: 2 });
        assert_eq!(m.last_index(), 10);
        m.append(11, 3, PUT).unwrap();
        m.append(12, 3, PUT).unwrap();
        m.append(13, 3, PUT).unwrap();
        m.flush().unwrap();
        assert_eq!(contents(&path), format!("# snapshot 12, 3\n13, 3, {PUT}\n"), "the reopened file rotates too");
    }
}
