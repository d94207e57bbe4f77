//! The message bytes: receiving DATA from the client (end detection and dot-unstuffing by
//! pecgate's own strict receiver, plus size, line-ending and NUL checks and capture of the
//! header section), and dot-stuffing on the way to the provider. Pure state machines: the
//! session feeds them bytes and writes what they return.
//!
//! The end of data is `CRLF . CRLF` and nothing else: no bare LF, no bare CR, no `CR CR LF`
//! (smtp-proto's receiver accepts `.` followed by any CRs and an LF, which is how
//! `\r\n.\r\r\n` ended a message early). Every other would-be terminator is message data,
//! and a message holding a bare CR or LF or a NUL is refused once it has been read to its
//! real end, so no server behind pecgate can see a different end of data than pecgate did.

/// Largest header section pecgate parses (the body is never held in memory).
pub const MAX_HEADER_BYTES: usize = 256 * 1024;

/// Why a received message cannot be relayed (the data was still read to its end, so the
/// session stays in sync).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataProblem {
    /// More bytes than `limit`.
    TooBig,
    /// A CR not followed by LF or an LF not preceded by CR: relaying it could let a lenient
    /// server see a different end of data (SMTP smuggling).
    BareLineEnding,
    /// The header section is larger than [`MAX_HEADER_BYTES`].
    HeaderTooBig,
    /// A NUL byte: some servers drop them, which turns `CRLF NUL . CRLF` into an end of data.
    NulByte,
}

/// Where the receiver is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// At the start of a line (DATA starts there).
    LineStart,
    /// Inside a line.
    InLine,
    /// A line that starts with `.`: the dot is not message data.
    Dot,
    /// `.` then CR at the start of a line: LF ends the data; anything else is message data.
    DotCr,
}

/// Receives one DATA transfer.
pub struct DataIntake {
    position: Position,
    /// The last message byte received (LF before the first: DATA starts a line).
    last: u8,
    limit: u64,
    size: u64,
    previous: u8,
    problem: Option<DataProblem>,
    header: Vec<u8>,
    header_done: bool,
}

impl DataIntake {
    /// `limit`: the largest message accepted, in bytes (as received, unstuffed).
    pub fn new(limit: u64) -> DataIntake {
        DataIntake {
            position: Position::LineStart,
            last: b'\n',
            limit,
            size: 0,
            previous: b'\n',
            problem: None,
            header: Vec::new(),
            header_done: false,
        }
    }

    /// Consume bytes from the front of `input`; the message bytes they carry are appended to
    /// `out` (nothing once a problem has been found). Returns `true` once the terminating
    /// `CRLF.CRLF` has been seen; what follows it stays in `input`.
    pub fn ingest(&mut self, input: &mut &[u8], out: &mut Vec<u8>) -> bool {
        let start = out.len();
        let mut done = false;
        let mut consumed = 0;
        for &b in input.iter() {
            consumed += 1;
            match (self.position, b) {
                (Position::LineStart, b'.') => self.position = Position::Dot,
                (Position::Dot, b'\r') => self.position = Position::DotCr,
                (Position::DotCr, b'\n') => {
                    done = true;
                    break;
                }
                (Position::DotCr, _) => {
                    // `.` CR and more at the start of a line: the dot goes (RFC 5321 §4.5.2),
                    // the CR is data (a bare one, refused later), and so is this byte.
                    self.emit(b'\r', out);
                    self.emit(b, out);
                }
                // `..` is one dot; `.x` loses its dot (RFC 5321 §4.5.2).
                _ => self.emit(b, out),
            }
        }
        *input = &input[consumed..];
        let new = &out[start..];
        self.size += new.len() as u64;
        if self.problem.is_none() {
            if self.size > self.limit {
                self.problem = Some(DataProblem::TooBig);
            } else if let Some(problem) = self.check_bytes(start, out) {
                self.problem = Some(problem);
            } else {
                self.capture_header(start, out);
            }
        }
        if self.problem.is_some() {
            out.truncate(start);
        }
        done
    }

    /// One message byte: a line starts after CR LF and nothing else.
    fn emit(&mut self, b: u8, out: &mut Vec<u8>) {
        self.position = if self.last == b'\r' && b == b'\n' {
            Position::LineStart
        } else {
            Position::InLine
        };
        self.last = b;
        out.push(b);
    }

    /// The first malformed byte of the new output, in order (so the problem reported does not
    /// depend on how the input was split).
    fn check_bytes(&mut self, start: usize, out: &[u8]) -> Option<DataProblem> {
        for &b in &out[start..] {
            let bare =
                (b == b'\n' && self.previous != b'\r') || (self.previous == b'\r' && b != b'\n');
            if bare {
                return Some(DataProblem::BareLineEnding);
            }
            if b == 0 {
                return Some(DataProblem::NulByte);
            }
            self.previous = b;
        }
        None
    }

    fn capture_header(&mut self, start: usize, out: &[u8]) {
        if self.header_done {
            return;
        }
        let new = &out[start..];
        let before = self.header.len();
        let room = MAX_HEADER_BYTES + 4 - before;
        self.header.extend_from_slice(&new[..new.len().min(room)]);
        // The header ends at the first empty line (or at a message that starts with one).
        let search_from = before.saturating_sub(3);
        if self.header.starts_with(b"\r\n") {
            self.header.truncate(2);
            self.header_done = true;
        } else if let Some(i) = find(&self.header[search_from..], b"\r\n\r\n") {
            self.header.truncate(search_from + i + 4);
            self.header_done = true;
        } else if self.header.len() > MAX_HEADER_BYTES {
            self.problem = Some(DataProblem::HeaderTooBig);
        }
    }

    /// The received size so far (all bytes, even past a problem).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Call after `ingest` returned `true`: the captured header section (ending with its
    /// empty line, or the whole message if it has no body) and the message size, or the
    /// problem that makes the message unrelayable.
    pub fn finish(self) -> Result<(Vec<u8>, u64), DataProblem> {
        match self.problem {
            Some(problem) => Err(problem),
            None => Ok((self.header, self.size)),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Dot-stuffing (RFC 5321 §4.5.2) for a message streamed in chunks.
#[derive(Debug)]
pub struct DotStuffer {
    at_line_start: bool,
    last: u8,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            at_line_start: true,
            last: b'\n',
        }
    }
}

impl DotStuffer {
    /// Append `chunk`, stuffed, to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + 8);
        for &b in chunk {
            if self.at_line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            self.at_line_start = b == b'\n';
            self.last = b;
        }
    }

    /// The end-of-data sequence, with a CRLF first if the message did not end with one.
    pub fn finish(&self) -> &'static [u8] {
        if self.last == b'\n' {
            b".\r\n"
        } else {
            b"\r\n.\r\n"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Outcome = (Result<(Vec<u8>, u64), DataProblem>, Vec<u8>, Vec<u8>);

    fn run(chunks: &[&[u8]], limit: u64) -> Outcome {
        let mut intake = DataIntake::new(limit);
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut input = *chunk;
            if intake.ingest(&mut input, &mut out) {
                let rest = [input, &chunks[i + 1..].concat()].concat();
                return (intake.finish(), out, rest);
            }
            assert!(input.is_empty());
        }
        panic!("no end of data");
    }

    #[test]
    fn unstuffs_and_stops_at_the_terminator() {
        let (r, out, rest) = run(
            &[b"Subject: x\r\n\r\n..dot\r\n", b"line\r\n.\r\nQUIT\r\n"],
            1000,
        );
        assert_eq!(out, b"Subject: x\r\n\r\n.dot\r\nline\r\n");
        assert_eq!(rest, b"QUIT\r\n");
        let (header, size) = r.unwrap();
        assert_eq!(header, b"Subject: x\r\n\r\n");
        assert_eq!(size, out.len() as u64);
    }

    #[test]
    fn first_line_dot_and_empty_message() {
        let (r, out, _) = run(&[b".\r\n"], 10);
        assert_eq!(out, b"");
        assert_eq!(r.unwrap().1, 0);
        let (_, out, _) = run(&[b"..x\r\n.\r\n"], 10);
        assert_eq!(out, b".x\r\n");
    }

    #[test]
    fn terminator_split_across_chunks() {
        let (_, out, rest) = run(&[b"a: b\r\n\r\nbody\r", b"\n.", b"\r", b"\nNOOP\r\n"], 100);
        assert_eq!(out, b"a: b\r\n\r\nbody\r\n");
        assert_eq!(rest, b"NOOP\r\n");
    }

    #[test]
    fn smuggling_attempts_are_neither_terminators_nor_relayable() {
        for attempt in [
            &b"a: b\r\n\r\nx\n.\r\nMAIL FROM:<x@y>\r\n"[..],
            b"a: b\r\n\r\nx\r.\r\n",
        ] {
            let (r, out, rest) = run(&[attempt, b"\r\n.\r\n"], 1000);
            assert_eq!(r, Err(DataProblem::BareLineEnding));
            assert!(rest.is_empty());
            assert!(out.len() < attempt.len());
        }
    }

    /// Every bare-CR/LF or NUL "end of data" some server has accepted (SMTP smuggling).
    const SMUGGLING: &[&[u8]] = &[
        b"\n.\n",
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\r.\r",
        b"\n.\r",
        b"\r.\n",
        b"\r\n.\r\r\n",
        b"\r\n.\r\r\r\n",
        b"\r\n.\n\r\n",
        b"\r\n\0.\r\n",
        b"\r\n.\0\r\n",
        b"\r\0\n.\r\n",
        b"\r\n.\r\0\n",
        b"\r\0\n\0.\0\r\0\n",
    ];

    /// A message, `fake`, a smuggled transaction, the real end and a command; and where
    /// `fake` starts.
    fn smuggling_wire(fake: &[u8]) -> (Vec<u8>, usize) {
        let head: &[u8] = b"From: a@b\r\nTo: c@d\r\n\r\nciao";
        let smuggled: &[u8] =
            b"MAIL FROM:<a@b>\r\nRCPT TO:<e@f>\r\nDATA\r\nFrom: a@b\r\nTo: e@f\r\n\r\nsmuggled\r\n";
        (
            [head, fake, smuggled, b".\r\nQUIT\r\n"].concat(),
            head.len(),
        )
    }

    /// `wire` cut at the increasing offsets `cuts`.
    fn cut<'a>(wire: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < wire.len()));
        bounds.push(wire.len());
        bounds.windows(2).map(|w| &wire[w[0]..w[1]]).collect()
    }

    #[test]
    fn smuggling_table_in_any_chunking() {
        for &fake in SMUGGLING {
            let (wire, start) = smuggling_wire(fake);
            let around: Vec<usize> = (start - 1..=start + fake.len() + 1).collect();
            let mut plans: Vec<Vec<usize>> = vec![Vec::new(), around.clone()];
            plans.extend(around.iter().map(|&k| vec![k]));
            plans.extend((1..=4).map(|n| (n..wire.len()).step_by(n).collect::<Vec<_>>()));
            for cuts in &plans {
                let (r, out, rest) = run(&cut(&wire, cuts), 10_000);
                let what = format!("{} cut at {cuts:?}", fake.escape_ascii());
                // The fake end is message data: only the real CRLF.CRLF ends it.
                assert_eq!(rest, b"QUIT\r\n", "{what}: the data ended early");
                assert!(
                    r.is_err(),
                    "{what}: relayable: {:?}",
                    String::from_utf8_lossy(&out)
                );
                let expected = if fake.contains(&0) {
                    [DataProblem::NulByte, DataProblem::BareLineEnding]
                } else {
                    [DataProblem::BareLineEnding; 2]
                };
                assert!(expected.contains(&r.unwrap_err()), "{what}");
            }
        }
    }

    /// Found by the fuzzer: with a NUL and a bare LF in different reads, which problem was
    /// reported depended on the read boundaries. The first in the message decides.
    #[test]
    fn the_first_malformed_byte_decides_whatever_the_split() {
        let wire: &[u8] = b"\n\xff\0a\r\n.\r\n";
        for split in 1..wire.len() {
            let (r, _, rest) = run(&[&wire[..split], &wire[split..]], 1000);
            assert_eq!(r, Err(DataProblem::BareLineEnding), "split at {split}");
            assert!(rest.is_empty());
        }
        let (r, _, _) = run(&[b"a\0\n\r\n.\r\n"], 1000);
        assert_eq!(r, Err(DataProblem::NulByte));
    }

    #[test]
    fn size_limit_keeps_reading_to_the_end() {
        let (r, out, rest) = run(&[b"a: b\r\n\r\n0123456789\r\n", b".\r\nQUIT\r\n"], 10);
        assert_eq!(r, Err(DataProblem::TooBig));
        assert!(out.len() <= 10);
        assert_eq!(rest, b"QUIT\r\n");
    }

    #[test]
    fn header_capture() {
        let (r, _, _) = run(
            &[b"A: 1\r\n", b" folded\r\nB: 2\r", b"\n\r\nbody\r\n.\r\n"],
            1000,
        );
        assert_eq!(r.unwrap().0, b"A: 1\r\n folded\r\nB: 2\r\n\r\n");
        // No body at all: the whole message is the header.
        let (r, _, _) = run(&[b"A: 1\r\n.\r\n"], 1000);
        assert_eq!(r.unwrap().0, b"A: 1\r\n");
        let big = vec![b'x'; MAX_HEADER_BYTES + 10];
        let (r, _, _) = run(&[b"A: ", &big, b"\r\n\r\n.\r\n"], u64::MAX);
        assert_eq!(r, Err(DataProblem::HeaderTooBig));
    }

    #[test]
    fn any_chunking_gives_the_same_message() {
        let wire: &[u8] = b"A: b\r\n\r\n..x\r\n\r\n...\r\nend\r\n.\r\nQUIT\r\n";
        let expected: &[u8] = b"A: b\r\n\r\n.x\r\n\r\n..\r\nend\r\n";
        for split in 1..wire.len() {
            let chunks: Vec<&[u8]> = wire.chunks(split).collect();
            let (r, out, rest) = run(&chunks, 1000);
            assert_eq!(out, expected, "chunks of {split}");
            assert_eq!(rest, b"QUIT\r\n", "chunks of {split}");
            assert_eq!(r.unwrap().0, b"A: b\r\n\r\n");
        }
    }

    #[test]
    fn stuffing_round_trip() {
        let message = b"A: b\r\n\r\n.starts with a dot\r\n..two\r\n.\r\nend";
        let mut stuffer = DotStuffer::default();
        let mut wire = Vec::new();
        stuffer.push(&message[..10], &mut wire);
        stuffer.push(&message[10..], &mut wire);
        wire.extend_from_slice(stuffer.finish());
        assert_eq!(
            wire,
            b"A: b\r\n\r\n..starts with a dot\r\n...two\r\n..\r\nend\r\n.\r\n".to_vec()
        );
        // What the provider's receiver makes of it is the original (plus the final CRLF).
        let (r, out, _) = run(&[&wire], 1000);
        assert!(r.is_ok());
        assert_eq!(out, [&message[..], b"\r\n"].concat());
    }
}
