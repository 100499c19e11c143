//! The JSON-over-TCP protocol of the simple store capkv grew out of: one JSON object per
//! line, `{"op":"GET","key":"k"}`, `{"op":"PUT","key":"k","value":"v"}`,
//! `{"op":"DELETE","key":"k"}`, answered in order with one line each:
//! `{"status":"ok","value":"v"}` (`"value":null` when absent), `{"status":"ok"}` for writes,
//! or `{"status":"error","error":"<code>","message":"..."}`. A request may name its read
//! level (`"consistency":"session"`); the default is the node's. A client may send one
//! request and half-close; it gets its answer. A line that is not a request gets an error
//! and the connection goes on; a line over the limit closes it.

use std::sync::Arc;

use capkv_replication::{Condition, Op};
use capkv_types::{KvError, ReadConsistency, SessionToken};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::frontend::stop_signal;
use crate::router::Router;

const PROTOCOL: &str = "json";

#[derive(Deserialize)]
struct Request {
    op: String,
    key: Option<String>,
    value: Option<String>,
    consistency: Option<String>,
}

/// Serves one connection until the client closes it, a line is too long, or the node
/// stops.
pub async fn connection(router: Arc<Router>, tcp: TcpStream, shutdown: watch::Receiver<bool>) {
    let (read, write) = tcp.into_split();
    let mut reader = BufReader::new(read);
    let mut writer = BufWriter::new(write);
    let line_max = router.core().limits().message_bytes_max();
    // The connection's read session: a `session` read sees this connection's writes.
    let mut session = SessionToken::default();
    let mut line = Vec::new();
    // One waiter for the whole connection (a new one per read costs a registration).
    let stopping = stop_signal(shutdown);
    tokio::pin!(stopping);
    loop {
        line.clear();
        let read = tokio::select! {
            r = read_line(&mut reader, &mut line, line_max) => r,
            _ = &mut stopping => return,
        };
        match read {
            Ok(0) => break,
            Ok(_) => {}
            Err(LineError::TooLong) => {
                let e = KvError::too_large("request line", line_max + 1, line_max);
                let _ = send(&mut writer, &error_reply(&e)).await;
                break;
            }
            Err(LineError::Io) => break,
        }
        let text = trim_line(&line);
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply = answer(&router, text, &mut session).await;
        if send(&mut writer, &reply).await.is_err() {
            break;
        }
    }
    let _ = writer.shutdown().await;
}

enum LineError {
    TooLong,
    Io,
}

/// Reads up to and including `\n` (or to the end of the stream), at most `max` bytes.
async fn read_line(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    line: &mut Vec<u8>,
    max: usize,
) -> Result<usize, LineError> {
    loop {
        let buf = reader.fill_buf().await.map_err(|_| LineError::Io)?;
        if buf.is_empty() {
            return Ok(line.len());
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max + 1 {
            return Err(LineError::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            return Ok(line.len());
        }
    }
}

fn trim_line(line: &[u8]) -> &[u8] {
    let mut l = line;
    while let Some((&last, rest)) = l.split_last() {
        if last == b'\n' || last == b'\r' {
            l = rest;
        } else {
            break;
        }
    }
    l
}

async fn send(
    writer: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    reply: &Value,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).unwrap_or_else(|_| b"{}".to_vec());
    bytes.push(b'\n');
    writer.write_all(&bytes).await?;
    writer.flush().await
}

fn error_reply(e: &KvError) -> Value {
    let mut v = json!({"status": "error", "error": e.code().as_str(), "message": e.message()});
    if let KvError::NotLeader {
        leader_addr: Some(a),
        ..
    } = e
    {
        v["leader"] = json!(a);
    }
    v
}

async fn answer(router: &Router, text: &[u8], session: &mut SessionToken) -> Value {
    let (command, result) = match serde_json::from_slice::<Request>(text) {
        Err(e) => (
            "invalid",
            Err(KvError::InvalidArgument(format!(
                "not a request: {e}; send one JSON object per line, e.g. {{\"op\":\"GET\",\"key\":\"k\"}}"
            ))),
        ),
        Ok(req) => {
            let op = req.op.to_ascii_uppercase();
            let command = match op.as_str() {
                "GET" => "get",
                "PUT" => "put",
                "DELETE" => "delete",
                _ => "unknown",
            };
            (command, run(router, &op, req, session).await)
        }
    };
    crate::frontend::count(router, PROTOCOL, command, result.as_ref().map(|_| ()));
    result.unwrap_or_else(|e| error_reply(&e))
}

async fn run(
    router: &Router,
    op: &str,
    req: Request,
    session: &mut SessionToken,
) -> Result<Value, KvError> {
    let key = req
        .key
        .ok_or_else(|| KvError::InvalidArgument("the request has no \"key\"".into()))?
        .into_bytes();
    match op {
        "GET" => {
            let level = match &req.consistency {
                None => router.core().default_consistency(),
                Some(s) => s
                    .parse::<ReadConsistency>()
                    .map_err(KvError::InvalidArgument)?,
            };
            let (served, value) = router.get(&key, level, session).await?;
            session.observe(served.partition, served.applied_index);
            let value = value.map(|v| String::from_utf8_lossy(&v.value).into_owned());
            Ok(json!({"status": "ok", "value": value}))
        }
        "PUT" => {
            let value = req
                .value
                .ok_or_else(|| KvError::InvalidArgument("a PUT needs a \"value\"".into()))?;
            let (served, r) = router
                .write(Op::Put {
                    key,
                    value: value.into_bytes(),
                    condition: Condition::Always,
                })
                .await?;
            session.observe(served.partition, r.log_index.max(served.applied_index));
            Ok(json!({"status": "ok", "revision": r.revision}))
        }
        "DELETE" => {
            let (served, r) = router
                .write(Op::Delete {
                    key,
                    condition: Condition::Always,
                })
                .await?;
            session.observe(served.partition, r.log_index.max(served.applied_index));
            Ok(json!({"status": "ok", "deleted": r.succeeded}))
        }
        other => Err(KvError::InvalidArgument(format!(
            "unknown op {other:?}: GET, PUT or DELETE"
        ))),
    }
}
