//! Admission: how much the server takes on at once. A request's body is buffered within what is
//! left of `max_body_bytes_in_flight` — each chunk reserved before it is kept, so a body holds only
//! what has arrived — and must arrive whole within `body_read_timeout`. Only then does the request
//! take one of `max_requests_in_flight` slots: a client trickling its body holds a connection and
//! the few bytes it sent, never a slot others need. Past either budget the answer is `503
//! overloaded` with `Retry-After` at once, before anything is applied (the SDKs retry those). Both
//! are held until the handler has answered.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use roster_core::ErrorCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ServerConfig;
use crate::error::ApiError;

/// Bytes allocated for a body before its chunks arrive, whatever length it declares.
const INITIAL_BODY_CAPACITY: usize = 64 * 1024;

/// Seconds a refused client is told to wait before retrying.
const RETRY_AFTER_SECONDS: &str = "1";

/// The shared budgets of requests and body bytes in flight.
pub struct Admission {
    requests_in_flight: Arc<Semaphore>,
    /// One permit per body byte held in memory by admitted requests.
    body_bytes_in_flight: Arc<Semaphore>,
    max_body_bytes: usize,
    body_read_timeout: Duration,
}

impl Admission {
    pub fn new(config: &ServerConfig) -> Self {
        // A budget smaller than one largest body would refuse that body forever.
        let body_budget = config.max_body_bytes_in_flight.max(config.max_body_bytes).min(Semaphore::MAX_PERMITS);
        Admission {
            requests_in_flight: Arc::new(Semaphore::new(
                config.max_requests_in_flight.clamp(1, Semaphore::MAX_PERMITS),
            )),
            body_bytes_in_flight: Arc::new(Semaphore::new(body_budget)),
            max_body_bytes: config.max_body_bytes,
            body_read_timeout: config.body_read_timeout,
        }
    }

    /// Reserves `bytes` of the body budget, or says the server is full.
    fn reserve_body_bytes(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let permits = u32::try_from(bytes).ok()?;
        self.body_bytes_in_flight.clone().try_acquire_many_owned(permits).ok()
    }
}

/// Middleware: admits the request (or refuses it fast), buffers its body within the budgets and
/// the read timeout, and holds both reservations until the handler has answered.
pub async fn admit(State(admission): State<Arc<Admission>>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let declared_length = declared_content_length(&parts.headers);
    if declared_length.is_some_and(|length| length > admission.max_body_bytes) {
        return closing(payload_too_large(admission.max_body_bytes).into_response());
    }
    let mut body_reservation = None;
    let buffered = tokio::time::timeout(
        admission.body_read_timeout,
        buffer_body(&admission, body, declared_length, &mut body_reservation),
    )
    .await;
    let bytes = match buffered {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(refusal)) => return refusal,
        Err(_elapsed) => {
            tracing::debug!("request refused: body not received within the read timeout");
            let message = format!(
                "the request body did not arrive within {} ms; the connection is closed",
                admission.body_read_timeout.as_millis()
            );
            return closing(ApiError::new(ErrorCode::RequestTimeout, message).into_response());
        }
    };
    let Ok(_request_slot) = admission.requests_in_flight.clone().try_acquire_owned() else {
        tracing::debug!("request refused: too many requests in flight");
        return overloaded("the server is serving as many requests as it is configured to; retry shortly");
    };
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    drop(body_reservation);
    response
}

/// Reads the whole body, reserving its bytes as they arrive (a declared length is only a claim).
async fn buffer_body(
    admission: &Admission,
    body: Body,
    declared_length: Option<usize>,
    reservation: &mut Option<OwnedSemaphorePermit>,
) -> Result<Bytes, Response> {
    let mut body = body;
    // A declared length is a claim, not bytes: allocate for at most a small first part of it.
    let mut buffered = Vec::with_capacity(declared_length.unwrap_or(0).min(INITIAL_BODY_CAPACITY));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            closing(
                ApiError::new(ErrorCode::MalformedJson, format!("the request body could not be read: {error}"))
                    .into_response(),
            )
        })?;
        let Ok(chunk) = frame.into_data() else { continue };
        if buffered.len() + chunk.len() > admission.max_body_bytes {
            return Err(closing(payload_too_large(admission.max_body_bytes).into_response()));
        }
        let Some(permit) = admission.reserve_body_bytes(chunk.len()) else {
            tracing::debug!("request refused: body budget exhausted while the body arrived");
            return Err(overloaded("the server holds as many request bodies as it is configured to; retry shortly"));
        };
        match reservation {
            Some(held) => held.merge(permit),
            None => *reservation = Some(permit),
        }
        buffered.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buffered))
}

fn declared_content_length(headers: &HeaderMap) -> Option<usize> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

fn payload_too_large(limit: usize) -> ApiError {
    ApiError::new(ErrorCode::PayloadTooLarge, format!("the request body is larger than the limit of {limit} bytes"))
}

/// `503 overloaded` with `Retry-After`; the connection is closed, as the body is left unread.
fn overloaded(message: &str) -> Response {
    let mut response = closing(ApiError::new(ErrorCode::Overloaded, message).into_response());
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
    response
}

/// Asks for the connection to be closed after this answer: the request's body may be unread.
fn closing(mut response: Response) -> Response {
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
