//! Reading JSONL files line by line without trusting them.
//!
//! [`JsonlReader`] yields every non-blank line with its 1-based number. A line that is not
//! UTF-8, or longer than the reader's limit, comes back as a [`LineProblem`] for that line
//! (the rest of the file is still read); the over-long line is skipped without being held
//! in memory. Problems with the file itself (missing, a directory, an I/O error) are
//! [`JsonlError`]s that name the path and, for read errors, the line. A line that runs on
//! past [`SKIP_FACTOR`] times the limit (`/dev/zero`, a binary file without newlines)
//! ends the reading with [`JsonlError::NoLineEnd`] instead of being skipped forever. A
//! UTF-8 byte order mark at the start of the file is dropped.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Default longest line accepted: 32 MiB.
pub const DEFAULT_MAX_LINE_BYTES: usize = 32 << 20;

/// An over-long line is skipped up to this many times the line limit; longer, reading
/// stops with [`JsonlError::NoLineEnd`].
pub const SKIP_FACTOR: usize = 8;

/// The UTF-8 byte order mark some editors put at the start of a file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// A problem with the JSONL file as a whole.
#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    /// The path does not exist or cannot be opened.
    #[error("{path}: cannot open: {source}; check the path")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The path is a directory.
    #[error("{path}: is a directory, not a JSONL file; pass the .jsonl file inside it")]
    IsDirectory {
        /// The directory.
        path: PathBuf,
    },
    /// A line runs on past [`SKIP_FACTOR`] times the line limit without a newline.
    #[error("{path}:{line}: no line end within {bytes} bytes; this is not a JSONL file (one JSON object per line)")]
    NoLineEnd {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// Bytes read of that line before giving up.
        bytes: usize,
    },
    /// Reading failed part-way.
    #[error("{path}:{line}: read error: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The line being read.
        line: usize,
        /// The OS error.
        source: io::Error,
    },
}

/// Why one line could not be used as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineProblem {
    /// The line is not valid UTF-8.
    InvalidUtf8 {
        /// Byte offset of the first invalid byte within the line.
        byte_offset: usize,
    },
    /// The line is longer than the reader's limit.
    TooLong {
        /// The line's full length in bytes.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
}

impl fmt::Display for LineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LineProblem::InvalidUtf8 { byte_offset } => write!(
                f,
                "invalid UTF-8 at byte {byte_offset} of the line; re-encode the file as UTF-8"
            ),
            LineProblem::TooLong { bytes, limit } => write!(
                f,
                "line is {bytes} bytes, longer than the {} MiB limit; is this really one conversation per line?",
                limit >> 20
            ),
        }
    }
}

/// One line of a JSONL file.
#[derive(Debug)]
pub struct Line {
    /// 1-based line number.
    pub number: usize,
    /// The line's text without its line ending, or why it has none.
    pub text: Result<String, LineProblem>,
}

/// Reads a JSONL source line by line; see the module docs.
pub struct JsonlReader<R> {
    inner: R,
    path: PathBuf,
    line: usize,
    max_line_bytes: usize,
    buf: Vec<u8>,
    done: bool,
}

impl JsonlReader<BufReader<File>> {
    /// Opens a file, refusing directories with a clear error.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, JsonlError> {
        let path = path.as_ref().to_path_buf();
        let meta = std::fs::metadata(&path).map_err(|source| JsonlError::Open {
            path: path.clone(),
            source,
        })?;
        if meta.is_dir() {
            return Err(JsonlError::IsDirectory { path });
        }
        let file = File::open(&path).map_err(|source| JsonlError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(JsonlReader::new(
            BufReader::with_capacity(1 << 20, file),
            path,
        ))
    }
}

impl<R: BufRead> JsonlReader<R> {
    /// Wraps any buffered reader; `path` is used in error messages.
    pub fn new(inner: R, path: impl Into<PathBuf>) -> Self {
        JsonlReader {
            inner,
            path: path.into(),
            line: 0,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            buf: Vec::new(),
            done: false,
        }
    }

    /// Sets the longest line accepted.
    pub fn with_max_line_bytes(mut self, limit: usize) -> Self {
        self.max_line_bytes = limit;
        self
    }

    /// The path given at construction.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the next line into `self.buf`; returns its full length (which may exceed what
    /// was kept), `None` at end of input, or an `InvalidData` error once a line passes
    /// [`SKIP_FACTOR`] times the limit.
    fn read_raw(&mut self) -> io::Result<Option<usize>> {
        self.buf.clear();
        let mut total = 0usize;
        let mut saw_any = false;
        loop {
            let chunk = match self.inner.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                return Ok(saw_any.then_some(total));
            }
            saw_any = true;
            let (take, done) = match memchr_newline(chunk) {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            // Line 1 keeps room for a byte order mark, which is dropped after reading.
            let bom = if self.line == 1 { BOM.len() } else { 0 };
            let room = (self.max_line_bytes + 1 + bom).saturating_sub(self.buf.len());
            self.buf.extend_from_slice(&chunk[..take.min(room)]);
            total += take;
            self.inner.consume(if done { take + 1 } else { take });
            if done {
                return Ok(Some(total));
            }
            if total > self.max_line_bytes.saturating_mul(SKIP_FACTOR) {
                return Err(io::Error::new(io::ErrorKind::InvalidData, NoLineEnd(total)));
            }
        }
    }
}

/// The payload of the `InvalidData` error of a line without end: its length so far.
#[derive(Debug)]
struct NoLineEnd(usize);

impl fmt::Display for NoLineEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no line end within {} bytes", self.0)
    }
}

impl std::error::Error for NoLineEnd {}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

impl<R: BufRead> Iterator for JsonlReader<R> {
    type Item = Result<Line, JsonlError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            self.line += 1;
            let total = match self.read_raw() {
                Ok(Some(n)) => n,
                Ok(None) => return None,
                Err(source) if source.get_ref().is_some_and(|e| e.is::<NoLineEnd>()) => {
                    // Nothing after an endless line can be read: stop here.
                    let bytes = source
                        .get_ref()
                        .and_then(|e| e.downcast_ref::<NoLineEnd>())
                        .map_or(0, |n| n.0);
                    let line = self.line;
                    self.done = true;
                    return Some(Err(JsonlError::NoLineEnd {
                        path: self.path.clone(),
                        line,
                        bytes,
                    }));
                }
                Err(source) => {
                    return Some(Err(JsonlError::Read {
                        path: self.path.clone(),
                        line: self.line,
                        source,
                    }))
                }
            };
            let mut total = total;
            if self.line == 1 && self.buf.starts_with(BOM) {
                self.buf.drain(..BOM.len());
                total -= BOM.len();
            }
            let mut len = total;
            if len <= self.buf.len() && self.buf.last() == Some(&b'\r') {
                len -= 1;
            }
            if len > self.max_line_bytes {
                return Some(Ok(Line {
                    number: self.line,
                    text: Err(LineProblem::TooLong {
                        bytes: len,
                        limit: self.max_line_bytes,
                    }),
                }));
            }
            let bytes = &self.buf[..len];
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let text = match std::str::from_utf8(bytes) {
                Ok(s) => Ok(s.to_owned()),
                Err(e) => Err(LineProblem::InvalidUtf8 {
                    byte_offset: e.valid_up_to(),
                }),
            };
            return Some(Ok(Line {
                number: self.line,
                text,
            }));
        }
    }
}

/// Counts the lines of a reader quickly (for progress bars): the number of `\n` bytes,
/// plus one if the last line has no newline.
pub fn count_lines(mut reader: impl Read) -> io::Result<usize> {
    let mut buf = vec![0u8; 1 << 20];
    let mut count = 0;
    let mut last = b'\n';
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        count += buf[..n].iter().filter(|&&b| b == b'\n').count();
        last = buf[n - 1];
    }
    Ok(count + usize::from(last != b'\n'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn lines(data: &[u8], limit: usize) -> Vec<(usize, Result<String, LineProblem>)> {
        JsonlReader::new(Cursor::new(data.to_vec()), "mem.jsonl")
            .with_max_line_bytes(limit)
            .map(|l| {
                let l = l.unwrap();
                (l.number, l.text)
            })
            .collect()
    }

    #[test]
    fn numbers_lines_and_skips_blank_ones() {
        let got = lines(b"a\n\n  \r\nb\r\nc", 100);
        assert_eq!(
            got,
            vec![
                (1, Ok("a".into())),
                (4, Ok("b".into())),
                (5, Ok("c".into()))
            ]
        );
    }

    #[test]
    fn invalid_utf8_is_reported_for_its_line_only() {
        let got = lines(b"ok\nab\xffcd\nok2\n", 100);
        assert_eq!(got[0], (1, Ok("ok".into())));
        assert_eq!(
            got[1],
            (2, Err(LineProblem::InvalidUtf8 { byte_offset: 2 }))
        );
        assert_eq!(got[2], (3, Ok("ok2".into())));
    }

    #[test]
    fn over_long_lines_are_skipped_with_their_length() {
        let mut data = vec![b'x'; 5000];
        data.extend_from_slice(b"\nshort\n");
        // A tiny buffer forces the long line across many fill_buf calls.
        let reader = JsonlReader::new(BufReader::with_capacity(64, Cursor::new(data)), "m")
            .with_max_line_bytes(1000);
        let got: Vec<_> = reader.map(|l| l.unwrap()).collect();
        assert_eq!(
            got[0].text,
            Err(LineProblem::TooLong {
                bytes: 5000,
                limit: 1000
            })
        );
        assert_eq!(got[1].number, 2);
        assert_eq!(got[1].text, Ok("short".into()));
    }

    #[test]
    fn a_leading_byte_order_mark_is_dropped() {
        let got = lines(b"\xEF\xBB\xBF{\"a\":1}\n\xEF\xBB\xBFx\n", 100);
        assert_eq!(got[0], (1, Ok("{\"a\":1}".into())));
        // Only at the start of the file.
        assert_eq!(got[1], (2, Ok("\u{feff}x".into())));
        assert!(
            lines(b"\xEF\xBB\xBF", 100).is_empty(),
            "a BOM alone is an empty file"
        );
    }

    #[test]
    fn a_line_without_end_stops_the_reader() {
        // An endless source, like /dev/zero.
        let reader = JsonlReader::new(BufReader::with_capacity(64, io::repeat(0)), "zero")
            .with_max_line_bytes(1000);
        let got: Vec<_> = reader.collect();
        assert_eq!(got.len(), 1);
        let err = got[0].as_ref().unwrap_err().to_string();
        assert!(err.contains("zero:1: no line end within"), "{err}");
        // A long line that does end is still only skipped.
        let mut data = vec![b'x'; 5 * 1000];
        data.extend_from_slice(b"\nok\n");
        let got = lines(&data, 1000);
        assert_eq!(got[1], (2, Ok("ok".into())));
    }

    #[test]
    fn empty_input_yields_nothing() {
        assert!(lines(b"", 10).is_empty());
    }

    #[test]
    fn directories_and_missing_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = JsonlReader::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("is a directory"), "{err}");
        let err = JsonlReader::open(dir.path().join("nope.jsonl"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("nope.jsonl: cannot open"), "{err}");
    }

    /// Fuzzing of the reader and the conversation parser with arbitrary bytes (run by
    /// `cargo test`, so CI runs it on every build): nothing panics, line numbers only
    /// grow, every line is within the limit, and the reader always ends.
    mod fuzz {
        use super::*;
        use crate::Conversation;
        use proptest::prelude::*;

        fn check(data: &[u8], limit: usize, chunk: usize) {
            let reader = JsonlReader::new(BufReader::with_capacity(chunk, Cursor::new(data)), "f")
                .with_max_line_bytes(limit);
            let mut last = 0;
            let mut ended = false;
            for line in reader {
                assert!(!ended, "nothing is read after a line without end");
                let line = match line {
                    Ok(line) => line,
                    // A line far past the limit: the only error of an in-memory reader.
                    Err(JsonlError::NoLineEnd { .. }) => {
                        ended = true;
                        continue;
                    }
                    Err(e) => panic!("{e}"),
                };
                assert!(line.number > last);
                last = line.number;
                if let Ok(text) = &line.text {
                    assert!(text.len() <= limit);
                    let _ = Conversation::from_json(text);
                }
            }
        }

        fn jsonish() -> impl Strategy<Value = Vec<u8>> {
            let pieces = prop::sample::select(vec![
                &b"{\"messages\":["[..],
                b"{\"role\":\"user\",\"content\":",
                b"\"hi\"",
                b"null",
                b"}",
                b"]",
                b",",
                b"\n",
                b"\r\n",
                b"\xEF\xBB\xBF",
                b"\xff",
                b"\\u0000",
                b"{\"tool_calls\":[{\"function\":{\"name\":1}}]}",
            ]);
            prop::collection::vec(pieces, 0..40).prop_map(|v| v.concat())
        }

        proptest! {
            #[test]
            fn arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..2048),
                               limit in 1usize..300, chunk in 1usize..64) {
                check(&data, limit, chunk);
            }

            #[test]
            fn json_like_fragments(data in jsonish(), limit in 8usize..400) {
                check(&data, limit, 16);
            }

            #[test]
            fn arbitrary_text_never_panics_the_parser(text in "\\PC{0,200}") {
                let _ = Conversation::from_json(&text);
            }
        }
    }

    #[test]
    fn counts_lines_with_and_without_final_newline() {
        assert_eq!(count_lines(Cursor::new(b"a\nb\n")).unwrap(), 2);
        assert_eq!(count_lines(Cursor::new(b"a\nb")).unwrap(), 2);
        assert_eq!(count_lines(Cursor::new(b"")).unwrap(), 0);
    }
}
