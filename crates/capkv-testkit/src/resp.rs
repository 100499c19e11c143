//! A small Redis-protocol client, for tests and `capkv check --protocol resp`: sends
//! requests as RESP arrays of bulk strings, several at once if asked (pipelining), and
//! reads RESP2 or RESP3 replies. It trusts nothing it reads: a malformed reply is an error.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Null,
    Array(Vec<Value>),
    /// RESP3 map, as pairs.
    Map(Vec<(Value, Value)>),
    Double(String),
    Bool(bool),
}

impl Value {
    /// The bulk or simple string as text (lossy), else `None`.
    pub fn text(&self) -> Option<String> {
        match self {
            Value::Bulk(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::Simple(s) => Some(s.clone()),
            _ => None,
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Value::Error(_))
    }
}

pub struct RespClient {
    stream: BufReader<TcpStream>,
    timeout: Duration,
}

/// One request in RESP.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

impl RespClient {
    pub async fn connect(addr: &str) -> anyhow::Result<RespClient> {
        let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .with_context(|| format!("connect to {addr} timed out"))?
            .with_context(|| format!("connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        Ok(RespClient {
            stream: BufReader::new(tcp),
            timeout: Duration::from_secs(30),
        })
    }

    /// Every reply must come within this time (default 30 s).
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// Sends one request and reads its reply.
    pub async fn call(&mut self, args: &[&str]) -> anyhow::Result<Value> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.call_bytes(&args).await
    }

    pub async fn call_bytes(&mut self, args: &[&[u8]]) -> anyhow::Result<Value> {
        let mut replies = self.pipeline(&[args.to_vec()]).await?;
        Ok(replies.remove(0))
    }

    /// Sends every request in one write, then reads one reply each, in order.
    pub async fn pipeline(&mut self, requests: &[Vec<&[u8]>]) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        for r in requests {
            out.extend_from_slice(&encode(r));
        }
        self.send_raw(&out).await?;
        let mut replies = Vec::with_capacity(requests.len());
        for _ in requests {
            replies.push(self.read().await?);
        }
        Ok(replies)
    }

    /// Writes bytes as they are (for malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.get_mut().write_all(bytes).await?;
        Ok(())
    }

    /// Reads one reply.
    pub async fn read(&mut self) -> anyhow::Result<Value> {
        let t = self.timeout;
        tokio::time::timeout(t, read_value(&mut self.stream, 0))
            .await
            .context("no reply in time")?
    }

    /// Whether the server closed the connection (reads to the end within `wait`).
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(wait, self.stream.read_to_end(&mut rest)).await,
            Ok(Ok(_))
        )
    }
}

async fn read_line(r: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    let mut line = Vec::new();
    let n = r.read_until(b'\n', &mut line).await?;
    if n == 0 {
        bail!("the server closed the connection");
    }
    if !line.ends_with(b"\r\n") {
        bail!(
            "a reply line does not end in CRLF: {:?}",
            String::from_utf8_lossy(&line)
        );
    }
    line.truncate(line.len() - 2);
    Ok(String::from_utf8(line)?)
}

fn read_value(
    r: &mut BufReader<TcpStream>,
    depth: usize,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Value>> + Send + '_>> {
    Box::pin(async move {
        if depth > 32 {
            bail!("replies nested too deep");
        }
        let line = read_line(r).await?;
        let (kind, rest) = line.split_at(line.len().min(1));
        let count = || -> anyhow::Result<i64> { Ok(rest.parse::<i64>()?) };
        Ok(match kind {
            "+" => Value::Simple(rest.to_string()),
            "-" => Value::Error(rest.to_string()),
            ":" => Value::Int(count()?),
            "," => Value::Double(rest.to_string()),
            "#" => Value::Bool(rest == "t"),
            "_" => Value::Null,
            "$" | "=" => {
                let n = count()?;
                if n < 0 {
                    return Ok(Value::Null);
                }
                let mut b = vec![0; n as usize + 2];
                r.read_exact(&mut b).await?;
                b.truncate(n as usize);
                if kind == "=" {
                    b.drain(..4.min(b.len())); // "txt:"
                }
                Value::Bulk(b)
            }
            "*" | "~" | ">" => {
                let n = count()?;
                if n < 0 {
                    return Ok(Value::Null);
                }
                let mut items = Vec::new();
                for _ in 0..n {
                    items.push(read_value(r, depth + 1).await?);
                }
                Value::Array(items)
            }
            "%" => {
                let mut pairs = Vec::new();
                for _ in 0..count()? {
                    let k = read_value(r, depth + 1).await?;
                    let v = read_value(r, depth + 1).await?;
                    pairs.push((k, v));
                }
                Value::Map(pairs)
            }
            other => bail!("unknown reply type {other:?}"),
        })
    })
}
