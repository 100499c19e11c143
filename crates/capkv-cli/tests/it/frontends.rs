//! The front ends without a routing client: the Redis protocol, HTTP/JSON and the seed's
//! JSON over TCP answer on every node (forwarding to leaders), with real clients where
//! the machine has them (redis-cli, redis-py; `scripts/install-test-deps.sh` installs
//! both) and raw protocol clients everywhere.

use std::time::{Duration, Instant};

use capkv_testkit::resp::{RespClient, Value};
use capkv_types::partition_for_key;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::fixture::{metric, wait_until, Cluster, Opts};

fn ok() -> Value {
    Value::Simple("OK".into())
}

fn bulk(s: &str) -> Value {
    Value::Bulk(s.as_bytes().to_vec())
}

async fn resp(cluster: &Cluster, id: u64) -> RespClient {
    RespClient::connect(&cluster.node(id).resp)
        .await
        .expect("connect to RESP")
}

async fn call(c: &mut RespClient, args: &[&str]) -> Value {
    c.call(args)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e:#}"))
}

/// Two keys in different partitions.
fn keys_in_two_partitions(partitions: u32) -> (String, String) {
    let a = "x:0".to_string();
    let pa = partition_for_key(a.as_bytes(), partitions);
    let b = (1..)
        .map(|i| format!("x:{i}"))
        .find(|k| partition_for_key(k.as_bytes(), partitions) != pa)
        .expect("another partition");
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_protocol_answers_on_every_node() {
    let cluster = Cluster::start(Opts::default()).await;
    resp_on_every_node(&cluster).await;
    resp_transactions_and_errors(&cluster).await;
    resp_bad_streams_close_only_their_connection(&cluster).await;
    resp_expiry(&cluster).await;
    json_over_tcp(&cluster).await;
    http_json(&cluster).await;
    redis_cli(&cluster).await;
    redis_py(&cluster).await;
    resp_keyspace_counts(&cluster).await;
    // Front-end requests are counted by protocol, and writes were forwarded to leaders.
    let mut forwarded = 0;
    for id in 1..=3 {
        let (_, m) = cluster.http_get(id, "/metrics").await;
        forwarded += metric(&m, "capkv_writes_forwarded_total", "");
        assert!(
            m.contains("capkv_frontend_requests_total{") && m.contains("protocol=\"resp\""),
            "node {id} counts RESP requests"
        );
    }
    assert!(
        forwarded > 0,
        "writes reached non-leaders and were forwarded"
    );
}

async fn resp_on_every_node(cluster: &Cluster) {
    let mut c = [
        resp(cluster, 1).await,
        resp(cluster, 2).await,
        resp(cluster, 3).await,
    ];
    assert_eq!(
        call(&mut c[0], &["PING"]).await,
        Value::Simple("PONG".into())
    );
    // Written through one node, read through another: every node answers every key.
    for i in 0..30 {
        let key = format!("any:{i}");
        let val = format!("v{i}");
        assert_eq!(call(&mut c[i % 3], &["SET", &key, &val]).await, ok());
        assert_eq!(call(&mut c[(i + 1) % 3], &["GET", &key]).await, bulk(&val));
    }
    // INCR from three nodes at once: atomic, each applied once, every answer distinct.
    let mut tasks = Vec::new();
    for id in 1..=3 {
        let mut client = resp(cluster, id).await;
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..40 {
                match client.call(&["INCR", "counter"]).await.expect("INCR") {
                    Value::Int(n) => seen.push(n),
                    other => panic!("INCR answered {other:?}"),
                }
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("INCR task"));
    }
    all.sort_unstable();
    assert_eq!(all, (1..=120).collect::<Vec<i64>>());
    assert_eq!(call(&mut c[1], &["GET", "counter"]).await, bulk("120"));
    // A scan whose page ends at a key of the maximal length (4096 bytes) goes on: its
    // continuation, one byte longer, is a valid start for the other nodes (they refused
    // it as TooLarge before).
    let long = "a".repeat(4096); // sorts first: pages follow it
    assert_eq!(call(&mut c[0], &["SET", &long, "x"]).await, ok());
    let mut cursor = "0".to_string();
    let mut seen = 0;
    loop {
        match call(&mut c[0], &["SCAN", &cursor, "COUNT", "1"]).await {
            Value::Array(parts) => {
                cursor = parts[0].text().expect("a cursor");
                if let Value::Array(keys) = &parts[1] {
                    seen += keys.len();
                }
            }
            other => panic!("SCAN answered {other:?}"),
        }
        if cursor == "0" {
            break;
        }
    }
    assert!(seen >= 32, "the scan went through every key ({seen})");
    // Pipelining: 200 requests in one write, answered in order.
    let mut requests: Vec<Vec<Vec<u8>>> = Vec::new();
    for i in 0..100 {
        let key = format!("pipe:{}", i % 7);
        requests.push(vec![
            b"SET".to_vec(),
            key.clone().into_bytes(),
            i.to_string().into_bytes(),
        ]);
        requests.push(vec![b"GET".to_vec(), key.into_bytes()]);
    }
    let borrowed: Vec<Vec<&[u8]>> = requests
        .iter()
        .map(|r| r.iter().map(Vec::as_slice).collect())
        .collect();
    let replies = c[2].pipeline(&borrowed).await.expect("pipeline");
    for (i, pair) in replies.chunks(2).enumerate() {
        assert_eq!(pair[0], ok(), "reply {i}");
        assert_eq!(
            pair[1],
            bulk(&i.to_string()),
            "a GET sees the SET before it"
        );
    }
}

async fn resp_transactions_and_errors(cluster: &Cluster) {
    let mut a = resp(cluster, 1).await;
    let mut b = resp(cluster, 2).await;
    // A transaction of one partition (the keys share the hash tag {t}).
    assert_eq!(call(&mut a, &["MULTI"]).await, ok());
    for cmd in [
        &["SET", "{t}a", "1"][..],
        &["INCR", "{t}a"],
        &["APPEND", "{t}b", "xy"],
        &["GET", "{t}a"],
    ] {
        assert_eq!(call(&mut a, cmd).await, Value::Simple("QUEUED".into()));
    }
    assert_eq!(
        call(&mut a, &["EXEC"]).await,
        Value::Array(vec![ok(), Value::Int(2), Value::Int(2), bulk("2")])
    );
    // WATCH: a change by another client between WATCH and EXEC discards the transaction.
    assert_eq!(call(&mut a, &["WATCH", "{w}k"]).await, ok());
    assert_eq!(call(&mut b, &["SET", "{w}k", "theirs"]).await, ok());
    call(&mut a, &["MULTI"]).await;
    call(&mut a, &["SET", "{w}k", "mine"]).await;
    assert_eq!(call(&mut a, &["EXEC"]).await, Value::Null);
    assert_eq!(call(&mut a, &["GET", "{w}k"]).await, bulk("theirs"));
    // UNWATCH inside MULTI is queued and answers OK, as in Redis.
    call(&mut a, &["MULTI"]).await;
    assert_eq!(
        call(&mut a, &["UNWATCH"]).await,
        Value::Simple("QUEUED".into())
    );
    call(&mut a, &["SET", "{w}k", "mine"]).await;
    assert_eq!(
        call(&mut a, &["EXEC"]).await,
        Value::Array(vec![ok(), ok()])
    );
    // Keys of two partitions in one command: refused, nothing written.
    let (k1, k2) = keys_in_two_partitions(cluster.partitions);
    match call(&mut a, &["MSET", &k1, "1", &k2, "2"]).await {
        Value::Error(e) => assert!(e.starts_with("CROSSPARTITION"), "{e}"),
        other => panic!("MSET across partitions answered {other:?}"),
    }
    assert_eq!(call(&mut b, &["EXISTS", &k1, &k2]).await, Value::Int(0));
    // Redis's own errors.
    assert_eq!(
        call(&mut a, &["GET"]).await,
        Value::Error("ERR wrong number of arguments for 'get' command".into())
    );
    call(&mut a, &["SET", "text", "abc"]).await;
    assert_eq!(
        call(&mut a, &["INCR", "text"]).await,
        Value::Error("ERR value is not an integer or out of range".into())
    );
    assert_eq!(
        call(&mut a, &["INCRBYFLOAT", "text", "1"]).await,
        Value::Error("ERR value is not a valid float".into())
    );
    call(&mut a, &["SET", "max", &i64::MAX.to_string()]).await;
    assert_eq!(
        call(&mut a, &["INCR", "max"]).await,
        Value::Error("ERR increment or decrement would overflow".into())
    );
    call(&mut a, &["SET", "huge", "1e308"]).await;
    for by in ["1e308", "inf"] {
        assert_eq!(
            call(&mut a, &["INCRBYFLOAT", "huge", by]).await,
            Value::Error("ERR increment would produce NaN or Infinity".into())
        );
    }
    // Found by a randomized differential run against redis-server 7.0.15: Redis checks
    // the stored value before the increment, GETEX's key before its time, EXPIRE's
    // options before its time.
    assert_eq!(
        call(&mut a, &["INCRBYFLOAT", "text", "inf"]).await,
        Value::Error("ERR value is not a valid float".into())
    );
    assert_eq!(
        call(&mut a, &["GETEX", "absent:k", "EX", "0"]).await,
        Value::Null
    );
    assert_eq!(
        call(&mut a, &["GETEX", "huge", "EX", "0"]).await,
        Value::Error("ERR invalid expire time in 'getex' command".into())
    );
    assert_eq!(
        call(&mut a, &["EXPIRE", "huge", "abc", "FOO"]).await,
        Value::Error("ERR Unsupported option FOO".into())
    );
    assert_eq!(
        call(&mut a, &["SET", "k", "v", "PX", &i64::MAX.to_string()]).await,
        Value::Error("ERR invalid expire time in 'set' command".into())
    );
    for (args, error) in [
        (
            &["EXPIRE", "max", "10", "FOO"][..],
            "ERR Unsupported option FOO",
        ),
        (
            &["EXPIRE", "max", "10", "NX", "GT"],
            "ERR NX and XX, GT or LT options at the same time are not compatible",
        ),
        (
            &["EXPIRE", "max", "10", "GT", "LT"],
            "ERR GT and LT options at the same time are not compatible",
        ),
        (
            &["CLIENT", "FOO"],
            "ERR unknown subcommand 'FOO'. Try CLIENT HELP.",
        ),
        (
            &["CLIENT", "GETNAME", "x"],
            "ERR wrong number of arguments for 'client|getname' command",
        ),
        (
            &["CONFIG", "GET"],
            "ERR wrong number of arguments for 'config|get' command",
        ),
    ] {
        assert_eq!(
            call(&mut a, args).await,
            Value::Error(error.into()),
            "{args:?}"
        );
    }
    // A Redis whose only user is `default`, without a password.
    assert_eq!(call(&mut a, &["AUTH", "default", "any"]).await, ok());
    assert_eq!(
        call(&mut a, &["AUTH", "someone", "pw"]).await,
        Value::Error("WRONGPASS invalid username-password pair or user is disabled.".into())
    );
    assert_eq!(call(&mut a, &["SET", "text", "x", "NX"]).await, Value::Null);
    assert_eq!(
        call(&mut a, &["SET", "text", "y", "XX", "GET"]).await,
        bulk("abc")
    );
    assert_eq!(
        call(&mut a, &["GETRANGE", "text", "0", "-1"]).await,
        bulk("y")
    );
    // RENAME within a partition (a shared hash tag); across partitions it is refused.
    call(&mut a, &["SET", "{r}src", "moved"]).await;
    assert_eq!(call(&mut a, &["RENAME", "{r}src", "{r}dst"]).await, ok());
    assert_eq!(call(&mut b, &["GET", "{r}dst"]).await, bulk("moved"));
    assert_eq!(
        call(&mut a, &["RENAME", "{r}src", "{r}dst"]).await,
        Value::Error("ERR no such key".into())
    );
    assert_eq!(
        call(&mut a, &["RENAMENX", "{r}dst", "{r}dst"]).await,
        Value::Int(0)
    );
    match call(&mut a, &["RENAME", &k1, &k2]).await {
        Value::Error(e) => assert!(e.starts_with("CROSSPARTITION"), "{e}"),
        other => panic!("RENAME across partitions answered {other:?}"),
    }
    // RESP3 after HELLO 3: a map, and nulls as `_`.
    match call(&mut b, &["HELLO", "3"]).await {
        Value::Map(pairs) => assert!(pairs.contains(&(bulk("proto"), Value::Int(3)))),
        other => panic!("HELLO 3 answered {other:?}"),
    }
    assert_eq!(call(&mut b, &["GET", "absent"]).await, Value::Null);
    // The connection's read level.
    assert_eq!(call(&mut b, &["CAPKV.CONSISTENCY", "session"]).await, ok());
    assert_eq!(call(&mut b, &["SET", "mine", "1"]).await, ok());
    assert_eq!(
        call(&mut b, &["GET", "mine"]).await,
        bulk("1"),
        "reads its own write"
    );
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(n) => *n,
        other => panic!("expected an integer, got {other:?}"),
    }
}

/// Keys expire at the same time on every node, and the leaders delete them through the log.
async fn resp_expiry(cluster: &Cluster) {
    let mut a = resp(cluster, 1).await;
    let mut b = resp(cluster, 3).await;
    assert_eq!(
        call(&mut a, &["SET", "ttl:short", "v", "PX", "1500"]).await,
        ok()
    );
    let pttl = int(&call(&mut b, &["PTTL", "ttl:short"]).await);
    assert!((1..=1500).contains(&pttl), "PTTL {pttl}");
    assert_eq!(call(&mut b, &["GET", "ttl:short"]).await, bulk("v"));
    for id in 1..=3 {
        let mut c = resp(cluster, id).await;
        call(&mut c, &["CAPKV.CONSISTENCY", "eventual"]).await;
        let c = tokio::sync::Mutex::new(c);
        wait_until(
            Duration::from_secs(15),
            "the key expires on every node",
            || async { c.lock().await.call(&["GET", "ttl:short"]).await.ok() == Some(Value::Null) },
        )
        .await;
    }
    let expired_total = || async {
        let mut n = 0;
        for id in 1..=3 {
            let (_, m) = cluster.http_get(id, "/metrics").await;
            n += metric(&m, "capkv_keys_expired_total", "");
        }
        n
    };
    wait_until(
        Duration::from_secs(15),
        "a leader deletes the expired key",
        || async { expired_total().await > 0 },
    )
    .await;
    // No key with an expiry is left, and the reaper skips partitions with none; it must
    // walk again once one is stored.
    let before = expired_total().await;
    assert_eq!(
        call(&mut b, &["SET", "ttl:later", "v", "PX", "300"]).await,
        ok()
    );
    wait_until(
        Duration::from_secs(15),
        "a leader deletes a key that expires after a walk found none",
        || async { expired_total().await > before },
    )
    .await;
    // EXPIRE, TTL, PERSIST, GETEX, SETEX, and Redis's refusals.
    call(&mut a, &["SET", "ttl:k", "v"]).await;
    assert_eq!(call(&mut a, &["TTL", "ttl:k"]).await, Value::Int(-1));
    assert_eq!(call(&mut a, &["TTL", "ttl:none"]).await, Value::Int(-2));
    assert_eq!(
        call(&mut a, &["EXPIRE", "ttl:k", "100"]).await,
        Value::Int(1)
    );
    assert!((99..=100).contains(&int(&call(&mut b, &["TTL", "ttl:k"]).await)));
    assert_eq!(
        call(&mut a, &["EXPIRE", "ttl:k", "50", "GT"]).await,
        Value::Int(0)
    );
    assert_eq!(call(&mut a, &["PERSIST", "ttl:k"]).await, Value::Int(1));
    assert_eq!(call(&mut a, &["TTL", "ttl:k"]).await, Value::Int(-1));
    assert_eq!(
        call(&mut a, &["EXPIRE", "ttl:none", "10"]).await,
        Value::Int(0)
    );
    assert_eq!(
        call(&mut a, &["GETEX", "ttl:k", "PX", "100000"]).await,
        bulk("v")
    );
    assert!(int(&call(&mut a, &["PTTL", "ttl:k"]).await) > 90_000);
    assert_eq!(call(&mut a, &["SET", "ttl:k", "w"]).await, ok());
    assert_eq!(
        call(&mut a, &["TTL", "ttl:k"]).await,
        Value::Int(-1),
        "SET drops the TTL"
    );
    assert_eq!(call(&mut a, &["SETEX", "ttl:s", "100", "v"]).await, ok());
    assert_eq!(call(&mut a, &["INCR", "ttl:n"]).await, Value::Int(1));
    assert_eq!(
        call(&mut a, &["EXPIRE", "ttl:n", "100"]).await,
        Value::Int(1)
    );
    assert_eq!(call(&mut a, &["INCR", "ttl:n"]).await, Value::Int(2));
    assert!(
        int(&call(&mut a, &["TTL", "ttl:n"]).await) > 0,
        "INCR keeps the TTL"
    );
    assert_eq!(call(&mut a, &["EXPIRE", "ttl:n", "0"]).await, Value::Int(1));
    assert_eq!(
        call(&mut a, &["EXISTS", "ttl:n"]).await,
        Value::Int(0),
        "a past expiry deletes"
    );
    assert_eq!(
        call(&mut a, &["SET", "ttl:k", "v", "EX", "0"]).await,
        Value::Error("ERR invalid expire time in 'set' command".into())
    );
    assert_eq!(
        call(&mut a, &["SET", "ttl:k", "v", "EX", "10", "PX", "10"]).await,
        Value::Error("ERR syntax error".into())
    );
}

/// Every node answers DBSIZE and INFO keyspace from the counts its replicas keep, and
/// they follow creates, overwrites, deletes, expiries set and removed, and renames.
async fn resp_keyspace_counts(cluster: &Cluster) {
    let mut a = resp(cluster, 1).await;
    assert_eq!(call(&mut a, &["FLUSHALL"]).await, ok());
    let counts_everywhere = |keys: i64, expiring: i64| async move {
        for id in 1..=3 {
            let mut c = resp(cluster, id).await;
            let c = tokio::sync::Mutex::new(&mut c);
            let line = format!("db0:keys={keys},expires={expiring},");
            wait_until(
                Duration::from_secs(15),
                &format!("node {id} counts {keys} keys, {expiring} with an expiry"),
                || async {
                    let mut c = c.lock().await;
                    let info = c
                        .call(&["INFO", "keyspace"])
                        .await
                        .ok()
                        .and_then(|v| v.text());
                    let n = c.call(&["DBSIZE"]).await.ok();
                    n == Some(Value::Int(keys))
                        && info.is_some_and(|t| {
                            if keys == 0 {
                                !t.contains("db0:")
                            } else {
                                t.contains(&line)
                            }
                        })
                },
            )
            .await;
        }
    };
    counts_everywhere(0, 0).await;
    for i in 0..20 {
        let k = format!("count:{i}");
        if i < 5 {
            call(&mut a, &["SET", &k, "v", "EX", "1000"]).await;
        } else {
            call(&mut a, &["SET", &k, "v"]).await;
        }
    }
    counts_everywhere(20, 5).await;
    // Overwrites keep the count; a plain SET drops the expiry, KEEPTTL keeps it.
    call(&mut a, &["SET", "count:0", "w"]).await;
    call(&mut a, &["SET", "count:1", "w", "KEEPTTL"]).await;
    call(&mut a, &["INCR", "count:19"]).await;
    counts_everywhere(20, 4).await;
    // Deletes, PERSIST, EXPIRE, and a rename within one partition.
    assert_eq!(
        call(&mut a, &["DEL", "count:2", "count:10", "count:absent"]).await,
        Value::Int(2)
    );
    assert_eq!(call(&mut a, &["PERSIST", "count:3"]).await, Value::Int(1));
    assert_eq!(
        call(&mut a, &["EXPIRE", "count:11", "1000"]).await,
        Value::Int(1)
    );
    call(&mut a, &["SET", "{cnt}from", "v", "EX", "1000"]).await;
    call(&mut a, &["SET", "{cnt}to", "v"]).await;
    assert_eq!(
        call(&mut a, &["RENAME", "{cnt}from", "{cnt}to"]).await,
        ok()
    );
    counts_everywhere(19, 4).await;
    // A connection counts its own writes at once, on any node (they are forwarded to
    // leaders elsewhere; the count waits for this node's replicas to apply them).
    let mut before = 19;
    for id in [2, 3] {
        // Start from a count every node agrees on: another connection's writes may reach
        // this node's replicas late (node 2's, counted on node 3), and would add to it
        // between two of this connection's DBSIZEs.
        counts_everywhere(before, 4).await;
        let mut c = resp(cluster, id).await;
        for i in 0..5 {
            call(&mut c, &["SET", &format!("own:{id}:{i}"), "v"]).await;
            assert_eq!(
                call(&mut c, &["DBSIZE"]).await,
                Value::Int(before + i + 1),
                "node {id} counts the connection's own SET at once"
            );
        }
        before += 5;
    }
}

async fn resp_bad_streams_close_only_their_connection(cluster: &Cluster) {
    for garbage in [
        &b"*1\r\n$x\r\n"[..],
        b"*2\r\n$3\r\nSET\r\n$999999999\r\n",
        b"*99999999\r\n",
        b"*1\r\n:1\r\n",
    ] {
        let mut c = resp(cluster, 2).await;
        c.send_raw(garbage).await.unwrap();
        match c.read().await.expect("an error reply") {
            Value::Error(e) => assert!(e.starts_with("ERR Protocol error"), "{e}"),
            other => panic!("garbage answered {other:?}"),
        }
        assert!(
            c.closed_within(Duration::from_secs(5)).await,
            "connection closed"
        );
    }
    let mut c = resp(cluster, 2).await;
    assert_eq!(call(&mut c, &["PING"]).await, Value::Simple("PONG".into()));
}

/// The seed's protocol: one JSON object per line, many per connection, any node.
async fn json_over_tcp(cluster: &Cluster) {
    let addr = cluster.node(3).json.clone();
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect JSON");
    let (r, mut w) = tcp.into_split();
    let mut lines = BufReader::new(r).lines();
    let mut ask = async |req: &str| -> serde_json::Value {
        w.write_all(format!("{req}\n").as_bytes()).await.unwrap();
        let line = lines.next_line().await.unwrap().expect("an answer line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"))
    };
    let put = ask(r#"{"op":"PUT","key":"seed:1","value":"alice"}"#).await;
    assert_eq!(put["status"], "ok");
    let get = ask(r#"{"op":"GET","key":"seed:1"}"#).await;
    assert_eq!(
        (&get["status"], &get["value"]),
        (&"ok".into(), &"alice".into())
    );
    let del = ask(r#"{"op":"DELETE","key":"seed:1"}"#).await;
    assert_eq!(del["status"], "ok");
    let gone = ask(r#"{"op":"get","key":"seed:1"}"#).await;
    assert_eq!(gone["value"], serde_json::Value::Null);
    let bad = ask("this is not json").await;
    assert_eq!(
        (&bad["status"], &bad["error"]),
        (&"error".into(), &"InvalidArgument".into())
    );
    let unknown = ask(r#"{"op":"FROB","key":"k"}"#).await;
    assert_eq!(unknown["error"], "InvalidArgument");
    // The connection goes on after errors; many requests, answered in order.
    for i in 0..20 {
        let r = ask(&format!(
            r#"{{"op":"PUT","key":"seed:n{i}","value":"{i}"}}"#
        ))
        .await;
        assert_eq!(r["status"], "ok");
    }
    // The seed's clients send one request and half-close.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(br#"{"op":"GET","key":"seed:n7"}"#)
        .await
        .unwrap();
    tcp.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(answer.trim()).unwrap();
    assert_eq!(v["value"], "7");
}

async fn http_json(cluster: &Cluster) {
    use capkv_testkit::http_request as req;
    let (n1, n2) = (cluster.node(1).http.clone(), cluster.node(2).http.clone());
    let (code, _, body) = req("PUT", &n1, "/v1/kv/web/page", &[], b"<html/>".to_vec())
        .await
        .unwrap();
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let created: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let rev = created["revision"].as_u64().unwrap();
    let (code, headers, body) = req("GET", &n2, "/v1/kv/web/page", &[], vec![])
        .await
        .unwrap();
    assert_eq!((code, body.as_slice()), (200, &b"<html/>"[..]));
    assert_eq!(headers["etag"], format!("\"{rev}\""));
    // Conditional writes.
    let stale = (rev + 100).to_string();
    let (code, _, body) = req(
        "PUT",
        &n2,
        "/v1/kv/web/page",
        &[("If-Match", &stale)],
        b"x".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(code, 412);
    let failed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(failed["current_revision"].as_u64(), Some(rev));
    let (code, _, _) = req(
        "PUT",
        &n2,
        "/v1/kv/web/page",
        &[("If-None-Match", "*")],
        b"x".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(code, 412);
    let (code, _, _) = req(
        "PUT",
        &n2,
        "/v1/kv/web/page",
        &[("If-Match", &rev.to_string())],
        b"v2".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(code, 200);
    // Scans page with a cursor.
    for i in 0..5 {
        req(
            "PUT",
            &n1,
            &format!("/v1/kv/web/item{i}"),
            &[],
            vec![b'a' + i],
        )
        .await
        .unwrap();
    }
    let mut keys = Vec::new();
    let mut cursor = String::new();
    loop {
        let path = format!("/v1/kv?prefix=web/&limit=2&cursor={cursor}");
        let (code, _, body) = req("GET", &n2, &path, &[], vec![]).await.unwrap();
        assert_eq!(code, 200);
        let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
        for kv in page["kvs"].as_array().unwrap() {
            keys.push(kv["key"].as_str().unwrap().to_string());
        }
        match page["cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    assert_eq!(keys.len(), 6, "{keys:?}");
    // Deletes, errors with their codes.
    let (code, _, _) = req("DELETE", &n1, "/v1/kv/web/page", &[], vec![])
        .await
        .unwrap();
    assert_eq!(code, 200);
    let (code, _, body) = req("GET", &n1, "/v1/kv/web/page", &[], vec![])
        .await
        .unwrap();
    assert_eq!(code, 404);
    let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(e["error"], "NotFound");
    let (code, _, _) = req("GET", &n1, "/v1/kv/x?consistency=nonsense", &[], vec![])
        .await
        .unwrap();
    assert_eq!(code, 400);
    // A value over the limit: 413 with a JSON error, like every other error.
    let (code, _, body) = req("PUT", &n1, "/v1/kv/web/huge", &[], vec![b'x'; 2 << 20])
        .await
        .unwrap();
    assert_eq!(code, 413);
    let e: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&body)));
    assert_eq!(e["error"], "TooLarge", "{e}");
    let (code, _, body) = req("GET", &n1, "/v1/openapi.json", &[], vec![])
        .await
        .unwrap();
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
}

fn have(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

async fn redis_cli(cluster: &Cluster) {
    if !have("redis-cli") {
        eprintln!("SKIPPED redis-cli part: redis-cli is not installed (scripts/install-test-deps.sh installs it)");
        return;
    }
    let port = |id: u64| {
        cluster
            .node(id)
            .resp
            .rsplit(':')
            .next()
            .unwrap()
            .to_string()
    };
    let run = |id: u64, args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port(id)])
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(run(1, &["set", "cli:k", "from redis-cli"]), "OK");
    assert_eq!(run(2, &["get", "cli:k"]), "from redis-cli");
    assert_eq!(run(3, &["incrby", "cli:n", "5"]), "5");
    // redis-cli prints a null as an empty line (trimmed here).
    assert_eq!(run(3, &["mget", "cli:k", "cli:none"]), "from redis-cli");
    assert_eq!(run(1, &["type", "cli:k"]), "string");
    assert!(run(2, &["info", "replication"]).contains("capkv_partitions:8"));
}

async fn redis_py(cluster: &Cluster) {
    let has_module = std::process::Command::new("python3")
        .args(["-c", "import redis"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_module {
        eprintln!("SKIPPED redis-py part: the Python module redis is not installed (scripts/install-test-deps.sh installs it)");
        return;
    }
    let port = cluster.node(2).resp.rsplit(':').next().unwrap().to_string();
    let script = r#"
import sys, redis
r = redis.Redis(port=int(sys.argv[1]))
assert r.set("py:k", "v") is True
assert r.get("py:k") == b"v"
# A transaction (MULTI/EXEC) of one partition, as redis-py's pipeline sends it.
assert r.pipeline().set("{py}a", 1).incr("{py}a").get("{py}a").execute() == [True, 2, b"2"]
assert r.pipeline(transaction=False).set("py:b", 1).incr("py:b").execute() == [True, 2]
# Optimistic locking with WATCH.
def bump(pipe):
    n = int(pipe.get("{py}a"))
    pipe.multi()
    pipe.set("{py}a", n + 10)
r.transaction(bump, "{py}a")
assert r.get("{py}a") == b"12"
r3 = redis.Redis(port=int(sys.argv[1]), protocol=3)
assert r3.get("py:k") == b"v"
assert r3.get("py:none") is None
cursor, keys = r.scan(0, match="py:*", count=1000)
assert b"py:k" in keys, keys
print("redis-py ok")
"#;
    let out = tokio::process::Command::new("python3")
        .args(["-c", script, &port])
        .output()
        .await
        .expect("run python3");
    assert!(
        out.status.success(),
        "redis-py: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A write loop through one node's RESP port while the leader of some of its keys' partitions
/// is killed: no acknowledged write is lost, and no INCR is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resp_writes_survive_a_leader_kill() {
    let mut cluster = Cluster::start(Opts::default()).await;
    // The client speaks to node 1; node 2 leads some partitions (the map spreads leaders).
    let victim = 2;
    let c = &cluster;
    wait_until(
        Duration::from_secs(30),
        "node 2 leads a partition",
        || async move { c.leaders().await.contains(&Some(victim)) },
    )
    .await;
    let mut c = resp(&cluster, 1).await;
    let mut acked: Vec<(String, String)> = Vec::new();
    let (mut incr_acked, mut incr_unsure) = (Vec::new(), 0);
    let mut failures = Vec::new();
    let started = Instant::now();
    let mut killed = false;
    let mut i = 0;
    while acked.len() < 400 && started.elapsed() < Duration::from_secs(90) {
        if i == 100 && !killed {
            cluster.kill(victim);
            killed = true;
        }
        let key = format!("lk:{i}");
        let val = format!("value-{i}");
        match c.call(&["SET", &key, &val]).await.expect("RESP answers") {
            Value::Simple(s) if s == "OK" => acked.push((key, val)),
            Value::Error(e) => failures.push(e),
            other => panic!("SET answered {other:?}"),
        }
        if i % 4 == 0 {
            match c.call(&["INCR", "lk:counter"]).await.expect("RESP answers") {
                Value::Int(n) => incr_acked.push(n),
                Value::Error(e) => {
                    // Unavailable: certainly not applied; Ambiguous: perhaps.
                    assert!(
                        e.starts_with("UNAVAILABLE") || e.starts_with("AMBIGUOUS"),
                        "{e}"
                    );
                    incr_unsure += usize::from(e.starts_with("AMBIGUOUS"));
                }
                other => panic!("INCR answered {other:?}"),
            }
        }
        i += 1;
    }
    assert!(killed, "the loop reached the kill");
    eprintln!(
        "{} writes acknowledged in {:?}, {} failed ({:?}); INCR: {} acknowledged, {incr_unsure} ambiguous",
        acked.len(),
        started.elapsed(),
        failures.len(),
        failures.first(),
        incr_acked.len()
    );
    assert_eq!(
        acked.len(),
        400,
        "writes kept being acknowledged; failures: {failures:?}"
    );
    for e in &failures {
        assert!(
            e.starts_with("UNAVAILABLE") || e.starts_with("AMBIGUOUS"),
            "{e}"
        );
    }
    cluster.spawn(victim);
    cluster.wait_ready(Duration::from_secs(60)).await;
    // Every acknowledged write is there, read through another node.
    let mut reader = resp(&cluster, 3).await;
    for (key, val) in &acked {
        assert_eq!(
            call(&mut reader, &["GET", key]).await,
            bulk(val),
            "{key} was acknowledged"
        );
    }
    // Each acknowledged INCR counted once: distinct answers, and the counter holds at
    // least all of them and at most those plus the ones that may have applied.
    let mut sorted = incr_acked.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        incr_acked.len(),
        "an INCR answer repeated: {incr_acked:?}"
    );
    let final_count = match call(&mut reader, &["GET", "lk:counter"]).await {
        Value::Bulk(b) => String::from_utf8(b).unwrap().parse::<usize>().unwrap(),
        other => panic!("counter is {other:?}"),
    };
    assert!(
        (incr_acked.len()..=incr_acked.len() + incr_unsure).contains(&final_count),
        "counter {final_count}, acknowledged {}, unsure {incr_unsure}",
        incr_acked.len()
    );
}
