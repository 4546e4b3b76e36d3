//! The per-environment rejections log. SDKs drop a refused message after logging it where
//! nobody looks, so every dialect hands its refusals here, and a server key reads them back.

use roster_store::Rejection;

use crate::{Engine, EngineResult, Principal, now};

/// Entries each environment's log keeps (older ones go).
pub const REJECTIONS_KEPT: usize = 1_000;

/// How long an entry is kept at most: refused messages may hold personal data.
pub const REJECTIONS_RETENTION: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Entries one request adds at most; the rest of a request's refusals are counted in one more.
const REJECTIONS_PER_REQUEST: usize = 100;

/// Bytes of a refused message kept in the log.
const PAYLOAD_BYTES: usize = 2_048;

/// One refused message as a dialect reports it.
#[derive(Debug, Clone)]
pub struct RefusedMessage {
    /// Where in the body (`batch[3]`, `[0]`).
    pub path: String,
    pub message_id: Option<String>,
    pub code: String,
    pub error: String,
    /// The message as sent (cut to a bounded size here).
    pub payload: String,
}

/// `text` cut to at most `limit` bytes on a character boundary, the cut marked.
fn truncated(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    format!("{}… ({} bytes in all)", roster_core::limits::prefix_within(text, limit), text.len())
}

/// Counts refusals by dialect and error code (`roster_rejected_items_total`). Both labels come
/// from fixed sets: the dialects name themselves with constants, codes are `ErrorCode`s.
fn count_rejections(dialect: &str, refused: &[RefusedMessage]) {
    let mut per_code: Vec<(&str, u64)> = Vec::new();
    for message in refused {
        match per_code.iter_mut().find(|(code, _)| *code == message.code) {
            Some((_, count)) => *count += 1,
            None => per_code.push((&message.code, 1)),
        }
    }
    for (code, count) in per_code {
        metrics::counter!("roster_rejected_items_total", "dialect" => dialect.to_owned(), "code" => code.to_owned())
            .increment(count);
    }
}

impl Engine {
    /// Records what a dialect refused. Best effort: the refusal was already answered, so a
    /// failure to log it is logged, never turned into an error for the caller.
    pub async fn record_rejections(
        &self,
        principal: &Principal,
        dialect: &str,
        endpoint: &str,
        refused: Vec<RefusedMessage>,
    ) {
        let Ok(environment) = principal.require_environment() else { return };
        if refused.is_empty() {
            return;
        }
        count_rejections(dialect, &refused);
        let received_at = now();
        let total = refused.len();
        let entry = |message: RefusedMessage| Rejection {
            rejection_id: 0,
            received_at,
            dialect: dialect.to_owned(),
            endpoint: truncated(endpoint, 256),
            path: truncated(&message.path, 256),
            message_id: message.message_id.map(|id| truncated(&id, 256)),
            code: message.code,
            error: truncated(&message.error, 1_024),
            payload: truncated(&message.payload, PAYLOAD_BYTES),
        };
        let mut entries: Vec<Rejection> = refused.into_iter().take(REJECTIONS_PER_REQUEST).map(entry).collect();
        if total > REJECTIONS_PER_REQUEST {
            entries.push(entry(RefusedMessage {
                path: String::new(),
                message_id: None,
                code: "more_rejections".into(),
                error: format!("{} more messages of this request were refused", total - REJECTIONS_PER_REQUEST),
                payload: String::new(),
            }));
        }
        if let Err(error) = self.store.record_rejections(environment.id, entries, REJECTIONS_KEPT).await {
            tracing::warn!(%error, environment = %environment.slug, "rejections not logged");
        }
    }

    /// The environment's rejections, newest first (server key).
    pub async fn rejections(
        &self,
        principal: &Principal,
        before: Option<i64>,
        limit: usize,
    ) -> EngineResult<Vec<Rejection>> {
        let environment = principal.require_server()?;
        Ok(self.store.rejections(environment.id, before, limit).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::truncated;

    #[test]
    fn payloads_are_cut_on_character_boundaries_and_say_so() {
        assert_eq!(truncated("short", 10), "short");
        let cut = truncated("ééééé", 3);
        assert!(cut.starts_with('é') && cut.ends_with("(10 bytes in all)"), "{cut}");
    }
}
