//! RESP framing: requests (multibulk arrays of bulk strings, or inline lines) in, replies
//! (RESP2, or RESP3 after `HELLO 3`) out. Pure and bounded: the decoder never allocates
//! past its limits and reports malformed input as an error, never a panic (fuzzed by
//! `tests/resp_fuzz.rs` and `scripts/fuzz-resp.sh`).

/// Limits on what one request may carry.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Most arguments of one request (command name included).
    pub args_max: usize,
    /// Longest bulk string (a key or a value).
    pub bulk_max: usize,
    /// Longest inline request line.
    pub inline_max: usize,
    /// Most bytes of bulk strings in one request.
    pub request_max: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            args_max: 4096,
            bulk_max: 1024 * 1024,
            inline_max: 64 * 1024,
            request_max: 8 * 1024 * 1024,
        }
    }
}

/// A request's arguments and the bytes they took, `None` while incomplete.
pub type Decoded = Result<Option<(Vec<Vec<u8>>, usize)>, ProtocolError>;

/// Why a stream is not RESP; the connection answers it and closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// Decodes one request from the start of `buf`: `Ok(None)` when `buf` holds only part of
/// one, else the arguments and the bytes they took. An empty inline line yields an empty
/// request (ignored by the caller, as Redis does).
pub fn decode(buf: &[u8], limits: &DecodeLimits) -> Decoded {
    match buf.first() {
        None => Ok(None),
        Some(b'*') => decode_multibulk(buf, limits),
        Some(_) => decode_inline(buf, limits),
    }
}

/// The line at `buf[from..]` up to `\r\n`: its end (excluding `\r\n`), or `None` if the
/// line is not complete.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    let rel = buf.get(from..)?.windows(2).position(|w| w == b"\r\n")?;
    Some(from + rel)
}

/// A decimal length on a header line; `what` names it in the error.
fn parse_len(digits: &[u8], what: &str) -> Result<i64, ProtocolError> {
    let s = std::str::from_utf8(digits).ok();
    s.filter(|s| !s.is_empty() && s.len() <= 12)
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| ProtocolError(format!("invalid {what} length")))
}

fn decode_multibulk(buf: &[u8], limits: &DecodeLimits) -> Decoded {
    let Some(end) = line_end(buf, 1) else {
        return if buf.len() > 32 {
            Err(ProtocolError("invalid multibulk length".into()))
        } else {
            Ok(None)
        };
    };
    let count = parse_len(&buf[1..end], "multibulk")?;
    if count > limits.args_max as i64 {
        return Err(ProtocolError(format!(
            "too many arguments in one request (the limit is {})",
            limits.args_max
        )));
    }
    let mut pos = end + 2;
    if count <= 0 {
        return Ok(Some((Vec::new(), pos)));
    }
    let mut args = Vec::with_capacity(count as usize);
    let mut total: u64 = 0;
    for _ in 0..count {
        match buf.get(pos) {
            None => return Ok(None),
            Some(b'$') => {}
            Some(&c) => {
                return Err(ProtocolError(format!(
                    "expected '$', got '{}'",
                    char::from(c).escape_default()
                )))
            }
        }
        let Some(end) = line_end(buf, pos + 1) else {
            return if buf.len() - pos > 32 {
                Err(ProtocolError("invalid bulk length".into()))
            } else {
                Ok(None)
            };
        };
        let len = parse_len(&buf[pos + 1..end], "bulk")?;
        if len < 0 {
            return Err(ProtocolError("invalid bulk length".into()));
        }
        if len as u64 > limits.bulk_max as u64 {
            return Err(ProtocolError(format!(
                "a bulk string of {len} bytes is over the limit of {} bytes",
                limits.bulk_max
            )));
        }
        total += len as u64;
        if total > limits.request_max as u64 {
            return Err(ProtocolError(format!(
                "a request of more than {} bytes",
                limits.request_max
            )));
        }
        let start = end + 2;
        let stop = start + len as usize;
        if buf.len() < stop + 2 {
            return Ok(None);
        }
        if &buf[stop..stop + 2] != b"\r\n" {
            return Err(ProtocolError(
                "a bulk string is not followed by CRLF".into(),
            ));
        }
        args.push(buf[start..stop].to_vec());
        pos = stop + 2;
    }
    Ok(Some((args, pos)))
}

fn decode_inline(buf: &[u8], limits: &DecodeLimits) -> Decoded {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > limits.inline_max {
            Err(ProtocolError("too big inline request".into()))
        } else {
            Ok(None)
        };
    };
    if nl > limits.inline_max {
        return Err(ProtocolError("too big inline request".into()));
    }
    let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]);
    let args = split_inline(line)?;
    if args.len() > limits.args_max {
        return Err(ProtocolError("too many arguments in one request".into()));
    }
    Ok(Some((args, nl + 1)))
}

/// Splits an inline line into words: spaces separate, double quotes group (with `\"`,
/// `\\`, `\n`, `\r`, `\t` and `\xHH` escapes), single quotes group literally.
fn split_inline(line: &[u8]) -> Result<Vec<Vec<u8>>, ProtocolError> {
    let unbalanced = || ProtocolError("unbalanced quotes in request".into());
    let mut args = Vec::new();
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            break;
        }
        let mut word = Vec::new();
        match line[i] {
            b'"' => {
                i += 1;
                loop {
                    let &c = line.get(i).ok_or_else(unbalanced)?;
                    i += 1;
                    match c {
                        b'"' => break,
                        b'\\' => {
                            let &e = line.get(i).ok_or_else(unbalanced)?;
                            i += 1;
                            word.push(match e {
                                b'n' => b'\n',
                                b'r' => b'\r',
                                b't' => b'\t',
                                b'x' => {
                                    let hex = line.get(i..i + 2).ok_or_else(unbalanced)?;
                                    let v = std::str::from_utf8(hex)
                                        .ok()
                                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                                    match v {
                                        Some(v) => {
                                            i += 2;
                                            v
                                        }
                                        None => b'x',
                                    }
                                }
                                other => other,
                            });
                        }
                        other => word.push(other),
                    }
                }
            }
            b'\'' => {
                i += 1;
                loop {
                    let &c = line.get(i).ok_or_else(unbalanced)?;
                    i += 1;
                    if c == b'\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            _ => {
                while i < line.len() && !line[i].is_ascii_whitespace() {
                    word.push(line[i]);
                    i += 1;
                }
            }
        }
        args.push(word);
    }
    Ok(args)
}

/// A reply, encoded for the connection's protocol version.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Simple(String),
    /// The whole error line after `-`, prefix included (`ERR ...`, `CROSSPARTITION ...`).
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    /// Absent (RESP2 `$-1`, RESP3 `_`).
    Null,
    /// No array (RESP2 `*-1`, RESP3 `_`): EXEC of a transaction whose WATCH failed.
    NullArray,
    Array(Vec<Reply>),
    /// RESP3 map; a flat array of keys and values in RESP2.
    Map(Vec<(Reply, Reply)>),
    /// RESP3 verbatim text (INFO); a bulk string in RESP2.
    Verbatim(String),
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::Simple("OK".into())
    }

    pub fn err(msg: impl Into<String>) -> Reply {
        Reply::Error(format!("ERR {}", msg.into()))
    }

    pub fn bulk(s: impl Into<Vec<u8>>) -> Reply {
        Reply::Bulk(s.into())
    }

    pub fn opt_bulk(v: Option<Vec<u8>>) -> Reply {
        v.map_or(Reply::Null, Reply::Bulk)
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    /// Appends the reply to `out` in RESP `version` (2 or 3).
    pub fn encode(&self, version: u8, out: &mut Vec<u8>) {
        match self {
            Reply::Simple(s) => line(out, b'+', s.as_bytes()),
            Reply::Error(s) => line(out, b'-', s.as_bytes()),
            Reply::Int(n) => line(out, b':', n.to_string().as_bytes()),
            Reply::Bulk(b) => {
                line(out, b'$', b.len().to_string().as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Null if version >= 3 => out.extend_from_slice(b"_\r\n"),
            Reply::Null => out.extend_from_slice(b"$-1\r\n"),
            Reply::NullArray if version >= 3 => out.extend_from_slice(b"_\r\n"),
            Reply::NullArray => out.extend_from_slice(b"*-1\r\n"),
            Reply::Array(items) => {
                line(out, b'*', items.len().to_string().as_bytes());
                for i in items {
                    i.encode(version, out);
                }
            }
            Reply::Map(pairs) => {
                if version >= 3 {
                    line(out, b'%', pairs.len().to_string().as_bytes());
                } else {
                    line(out, b'*', (pairs.len() * 2).to_string().as_bytes());
                }
                for (k, v) in pairs {
                    k.encode(version, out);
                    v.encode(version, out);
                }
            }
            Reply::Verbatim(text) if version >= 3 => {
                line(out, b'=', (text.len() + 4).to_string().as_bytes());
                out.extend_from_slice(b"txt:");
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Reply::Verbatim(text) => Reply::Bulk(text.clone().into_bytes()).encode(version, out),
        }
    }
}

/// `prefix`, `body` (CR and LF replaced by spaces: a simple string or error is one line),
/// CRLF.
fn line(out: &mut Vec<u8>, prefix: u8, body: &[u8]) {
    out.push(prefix);
    out.extend(
        body.iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<Vec<u8>> {
        v.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn multibulk_requests_decode_whole_or_wait_for_more() {
        let l = DecodeLimits::default();
        let req = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
        assert_eq!(
            decode(req, &l).unwrap(),
            Some((args(&["SET", "k", "hello"]), req.len()))
        );
        for cut in 0..req.len() {
            assert_eq!(decode(&req[..cut], &l).unwrap(), None, "cut at {cut}");
        }
        // Pipelined: the first request only.
        let two = [&req[..], b"*1\r\n$4\r\nPING\r\n"].concat();
        assert_eq!(decode(&two, &l).unwrap().unwrap().1, req.len());
        // Binary-safe.
        let bin = b"*2\r\n$3\r\nGET\r\n$3\r\na\r\n\r\n";
        assert_eq!(decode(bin, &l).unwrap().unwrap().0[1], b"a\r\n");
    }

    #[test]
    fn malformed_or_oversized_requests_are_errors() {
        let l = DecodeLimits {
            args_max: 3,
            bulk_max: 8,
            inline_max: 16,
            request_max: 12,
        };
        for bad in [
            &b"*x\r\n"[..],
            b"*2\r\n:1\r\n",
            b"*1\r\n$-5\r\n",
            b"*1\r\n$2\r\nabXY",
            b"*4\r\n",
            b"*1\r\n$9\r\n",
            b"*99999999999999999999\r\n",
            b"this inline line is too long\r\n",
            b"GET \"unbalanced\r\n",
            b"*3\r\n$5\r\naaaaa\r\n$5\r\nbbbbb\r\n$5\r\n",
        ] {
            assert!(
                decode(bad, &l).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A header that never ends is an error once it is long enough to tell.
        assert!(decode(&[b'*'; 40], &l).is_err());
    }

    #[test]
    fn inline_requests_split_on_spaces_and_quotes() {
        let l = DecodeLimits::default();
        let (a, n) = decode(b"SET k \"a b\\x41\\n\" 'c d'\r\nPING", &l)
            .unwrap()
            .unwrap();
        assert_eq!(a, args(&["SET", "k", "a bA\n", "c d"]));
        assert_eq!(n, 25);
        assert_eq!(decode(b"PING\n", &l).unwrap().unwrap().0, args(&["PING"]));
        assert_eq!(
            decode(b"\r\n", &l).unwrap().unwrap().0,
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(decode(b"PING", &l).unwrap(), None);
    }

    #[test]
    fn replies_encode_in_resp2_and_resp3() {
        let enc = |r: Reply, v| {
            let mut out = Vec::new();
            r.encode(v, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(enc(Reply::Null, 2), "$-1\r\n");
        assert_eq!(enc(Reply::Null, 3), "_\r\n");
        let map = Reply::Map(vec![(Reply::bulk("a"), Reply::Int(1))]);
        assert_eq!(enc(map.clone(), 2), "*2\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(enc(map, 3), "%1\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(enc(Reply::err("bad\r\nthing"), 2), "-ERR bad  thing\r\n");
        assert_eq!(enc(Reply::Verbatim("x".into()), 3), "=5\r\ntxt:x\r\n");
        assert_eq!(enc(Reply::Verbatim("x".into()), 2), "$1\r\nx\r\n");
    }
}
