//! HTTP/JSON on the HTTP port, through the router (any node answers):
//!
//! - `GET /v1/kv/{key}[?consistency=LEVEL]`: the value as the body
//!   (`application/octet-stream`); its revisions in `ETag` (`"<mod_revision>"`),
//!   `X-Capkv-Revision` and `X-Capkv-Create-Revision`; 404 when absent.
//! - `PUT /v1/kv/{key}`: the body is the value. `If-Match: <revision>` writes only if the
//!   key's revision is that; `If-None-Match: *` only if the key is absent (412 otherwise,
//!   with the current revision). Answers `{"revision":N,"partition":P}`.
//! - `DELETE /v1/kv/{key}` (with an optional `If-Match`): `{"deleted":true,...}`, or 404.
//! - `GET /v1/kv?prefix=|start=&end=&limit=&cursor=&consistency=`: a page of keys in order,
//!   `{"kvs":[{"key","value","revision","create_revision"}],"cursor":"..."|null}`; a key or
//!   value that is not UTF-8 comes as `key_base64` / `value_base64` instead.
//! - Errors: `{"error":"<code>","message":"..."}` with 400 (InvalidArgument,
//!   CrossPartition), 404 (NotFound), 409 (SessionExpired), 412 (ConditionFailed),
//!   413 (TooLarge), 503 with `Retry-After` (Unavailable), 504 (Ambiguous), 500 (Internal).
//! - `/v1/openapi.json`: this API as an OpenAPI 3.0 document.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router as Routes};
use capkv_replication::{Condition, Op};
use capkv_types::{KvError, ReadConsistency, SessionToken};
use serde::Deserialize;
use serde_json::json;

use crate::kv::ScanParams;
use crate::router::Router;

const PROTOCOL: &str = "http";

pub fn routes(router: Arc<Router>) -> Routes {
    let body_max = router.core().limits().value_bytes_max + 1024;
    Routes::new()
        .route("/v1/kv", get(scan))
        .route(
            "/v1/kv/{*key}",
            get(get_key).put(put_key).delete(delete_key),
        )
        .route("/v1/openapi.json", get(openapi))
        .layer(DefaultBodyLimit::max(body_max))
        .with_state(router)
}

/// An error answer: the stable code, its message, and the matching HTTP status.
struct ApiError(KvError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = match &e {
            KvError::InvalidArgument(_) | KvError::CrossPartition(_) => StatusCode::BAD_REQUEST,
            KvError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            KvError::NotFound(_) => StatusCode::NOT_FOUND,
            KvError::SessionExpired(_) => StatusCode::CONFLICT,
            KvError::NotLeader { .. } => StatusCode::MISDIRECTED_REQUEST,
            KvError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            KvError::Ambiguous(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = Json(json!({"error": e.code().as_str(), "message": e.message()}));
        let mut resp = (status, body).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// A body axum could not take, as a JSON error: `TooLarge` past the value limit.
fn body_error(router: &Router, e: BytesRejection) -> KvError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        KvError::TooLarge(format!(
            "the value is larger than the limit of {} bytes",
            router.core().limits().value_bytes_max
        ))
    } else {
        KvError::InvalidArgument(format!("the request body: {}", e.body_text()))
    }
}

fn counted<T>(router: &Router, command: &str, r: Result<T, KvError>) -> Result<T, ApiError> {
    crate::frontend::count(router, PROTOCOL, command, r.as_ref().map(|_| ()));
    r.map_err(ApiError)
}

#[derive(Deserialize, Default)]
struct ReadQuery {
    consistency: Option<String>,
}

fn level(router: &Router, q: Option<&str>) -> Result<ReadConsistency, KvError> {
    let level: ReadConsistency = match q {
        // (A node whose default is `session` serves it without a token: as `prefix`.)
        None | Some("") => return Ok(router.core().default_consistency()),
        Some(s) => s.parse().map_err(KvError::InvalidArgument)?,
    };
    if level == ReadConsistency::Session {
        // HTTP requests carry no session token: such a read would be silently eventual.
        return Err(KvError::InvalidArgument(
            "HTTP/JSON has no sessions: use linearizable, bounded:…, prefix or eventual".into(),
        ));
    }
    Ok(level)
}

async fn get_key(
    State(router): State<Arc<Router>>,
    Path(key): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Result<Response, ApiError> {
    let r = async {
        let level = level(&router, q.consistency.as_deref())?;
        router
            .get(key.as_bytes(), level, &SessionToken::default())
            .await
    }
    .await;
    let (served, value) = counted(&router, "get", r)?;
    let Some(v) = value else {
        return Err(ApiError(KvError::NotFound(format!(
            "key {key:?} does not exist"
        ))));
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let num = |n: u64| HeaderValue::from(n);
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", v.mod_revision)) {
        headers.insert(header::ETAG, etag);
    }
    headers.insert("x-capkv-revision", num(v.mod_revision));
    headers.insert("x-capkv-create-revision", num(v.create_revision));
    headers.insert("x-capkv-partition", num(served.partition.0.into()));
    headers.insert("x-capkv-served-by", num(served.served_by.0));
    Ok((headers, v.value).into_response())
}

/// The condition of `If-Match` / `If-None-Match: *`.
fn condition(headers: &HeaderMap) -> Result<Condition, KvError> {
    let text = |name: header::HeaderName| {
        headers
            .get(&name)
            .map(|v| {
                v.to_str()
                    .map(str::trim)
                    .map_err(|_| KvError::InvalidArgument(format!("{name} is not text")))
            })
            .transpose()
    };
    match (text(header::IF_MATCH)?, text(header::IF_NONE_MATCH)?) {
        (Some(_), Some(_)) => Err(KvError::InvalidArgument(
            "give If-Match or If-None-Match, not both".into(),
        )),
        (None, Some("*")) => Ok(Condition::IfAbsent),
        (None, Some(other)) => Err(KvError::InvalidArgument(format!(
            "If-None-Match takes only *, not {other:?}"
        ))),
        (Some(m), None) => m
            .trim_matches('"')
            .parse::<u64>()
            .ok()
            .filter(|r| *r > 0)
            .map(Condition::IfRevision)
            .ok_or_else(|| {
                KvError::InvalidArgument(format!("If-Match takes a revision (>= 1), not {m:?}"))
            }),
        (None, None) => Ok(Condition::Always),
    }
}

fn precondition_failed(current_revision: u64) -> Response {
    (
        StatusCode::PRECONDITION_FAILED,
        Json(json!({
            "error": "ConditionFailed",
            "message": "the key's revision is not the one the condition names",
            "current_revision": current_revision,
        })),
    )
        .into_response()
}

async fn put_key(
    State(router): State<Arc<Router>>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r = async {
        let body = body.map_err(|e| body_error(&router, e))?;
        let condition = condition(&headers)?;
        router
            .write(Op::Put {
                key: key.into_bytes(),
                value: body.to_vec(),
                condition,
            })
            .await
    }
    .await;
    let (served, r) = counted(&router, "put", r)?;
    if !r.succeeded {
        return Ok(precondition_failed(r.current_revision));
    }
    let status = if r.current_revision == 0 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = json!({"revision": r.revision, "partition": served.partition.0});
    Ok((status, Json(body)).into_response())
}

async fn delete_key(
    State(router): State<Arc<Router>>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let r = async {
        let condition = condition(&headers)?;
        if condition == Condition::IfAbsent {
            return Err(KvError::InvalidArgument(
                "If-None-Match means nothing for a delete".into(),
            ));
        }
        router
            .write(Op::Delete {
                key: key.clone().into_bytes(),
                condition,
            })
            .await
    }
    .await;
    let (served, r) = counted(&router, "delete", r)?;
    if r.current_revision == 0 {
        return Err(ApiError(KvError::NotFound(format!(
            "key {key:?} does not exist"
        ))));
    }
    if !r.succeeded {
        return Ok(precondition_failed(r.current_revision));
    }
    let body = json!({"deleted": true, "revision": r.revision, "partition": served.partition.0});
    Ok(Json(body).into_response())
}

#[derive(Deserialize, Default)]
struct ScanQuery {
    prefix: Option<String>,
    start: Option<String>,
    end: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
    consistency: Option<String>,
}

async fn scan(
    State(router): State<Arc<Router>>,
    Query(q): Query<ScanQuery>,
) -> Result<Response, ApiError> {
    let r = async {
        let continuation = match q.cursor.as_deref() {
            None | Some("") => vec![],
            Some(c) => from_hex(c).ok_or_else(|| {
                KvError::InvalidArgument("cursor is not one this API handed out".into())
            })?,
        };
        let params = ScanParams {
            start: q.start.unwrap_or_default().into_bytes(),
            end: q.end.filter(|e| !e.is_empty()).map(String::into_bytes),
            prefix: q.prefix.unwrap_or_default().into_bytes(),
            limit: q.limit.unwrap_or(0),
            continuation,
            consistency: level(&router, q.consistency.as_deref())?,
            session: SessionToken::default(),
        };
        router.scan(&params).await
    }
    .await;
    let page = counted(&router, "scan", r)?;
    let kvs: Vec<_> = page
        .kvs
        .iter()
        .map(|kv| {
            let mut o = serde_json::Map::new();
            text_or_base64(&mut o, "key", &kv.key);
            text_or_base64(&mut o, "value", &kv.value.value);
            o.insert("revision".into(), kv.value.mod_revision.into());
            o.insert("create_revision".into(), kv.value.create_revision.into());
            serde_json::Value::Object(o)
        })
        .collect();
    let cursor = (!page.continuation.is_empty()).then(|| to_hex(&page.continuation));
    Ok(Json(json!({"kvs": kvs, "cursor": cursor})).into_response())
}

/// `name` as a string when UTF-8, else `name_base64`.
fn text_or_base64(o: &mut serde_json::Map<String, serde_json::Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => o.insert(name.into(), s.into()),
        Err(_) => o.insert(format!("{name}_base64"), base64(bytes).into()),
    };
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Standard base64 with padding (RFC 4648).
fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_hex_round_trip() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"\xff\x00\xfe"), "/wD+");
        assert_eq!(from_hex(&to_hex(b"\x01k\xff")), Some(b"\x01k\xff".to_vec()));
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex("abc"), None);
    }

    #[test]
    fn conditions_come_from_if_match_and_if_none_match() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        assert_eq!(condition(&h(&[])).unwrap(), Condition::Always);
        assert_eq!(
            condition(&h(&[("if-match", "\"7\"")])).unwrap(),
            Condition::IfRevision(7)
        );
        assert_eq!(
            condition(&h(&[("if-none-match", "*")])).unwrap(),
            Condition::IfAbsent
        );
        assert!(condition(&h(&[("if-match", "0")])).is_err());
        assert!(condition(&h(&[("if-none-match", "\"3\"")])).is_err());
        assert!(condition(&h(&[("if-match", "1"), ("if-none-match", "*")])).is_err());
    }

    #[test]
    fn the_openapi_document_is_json_and_names_every_route() {
        let doc: serde_json::Value = serde_json::from_str(include_str!("openapi.json")).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in ["/v1/kv", "/v1/kv/{key}"] {
            assert!(paths.contains_key(p), "{p}");
        }
    }
}
