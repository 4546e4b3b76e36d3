//! `POST /v1/query` (server key): one read-only SQL statement over the environment's views,
//! answered as JSON (`columns`, `rows`, `truncated`) or CSV.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use roster_core::ErrorCode;
use roster_engine::QueryOutput;
use serde::Deserialize;
use serde_json::Value;

use crate::AppState;
use crate::auth::Caller;
use crate::body::{Body, parse_document};
use crate::error::ApiError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryRequest {
    sql: String,
    /// `json` (default) or `csv`; `Accept: text/csv` also selects CSV.
    format: Option<String>,
}

pub async fn query(
    State(state): State<AppState>,
    Caller(principal): Caller,
    headers: HeaderMap,
    Body(bytes): Body,
) -> Result<Response, ApiError> {
    let request: QueryRequest = parse_document(&bytes)?;
    let wants_csv = match request.format.as_deref() {
        Some("csv") => true,
        Some("json") => false,
        None => headers
            .get(header::ACCEPT)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|accept| accept.contains("text/csv")),
        Some(other) => {
            let mut error =
                ApiError::new(ErrorCode::InvalidType, format!("`format` must be `json` or `csv`, not `{other}`"));
            error.body.path = Some("format".into());
            return Err(error);
        }
    };
    let output = state.engine.query(&principal, &request.sql).await?;
    if wants_csv {
        let mut response = to_csv(&output).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
        if output.truncated {
            response.headers_mut().insert("x-roster-truncated", HeaderValue::from_static("true"));
        }
        return Ok(response);
    }
    Ok(Json(serde_json::json!({ "columns": output.columns, "rows": output.rows, "truncated": output.truncated }))
        .into_response())
}

/// RFC 4180 CSV: a header row, then one row per result row; JSON values as their text.
pub fn to_csv(output: &QueryOutput) -> String {
    let mut csv = String::new();
    write_csv_row(&mut csv, output.columns.iter().map(String::as_str));
    for row in &output.rows {
        let cells: Vec<String> = row.iter().map(cell_text).collect();
        write_csv_row(&mut csv, cells.iter().map(String::as_str));
    }
    csv
}

fn cell_text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn write_csv_row<'a>(csv: &mut String, cells: impl Iterator<Item = &'a str>) {
    for (index, cell) in cells.enumerate() {
        if index > 0 {
            csv.push(',');
        }
        if cell.contains([',', '"', '\n', '\r']) {
            csv.push('"');
            csv.push_str(&cell.replace('"', "\"\""));
            csv.push('"');
        } else {
            csv.push_str(cell);
        }
    }
    csv.push_str("\r\n");
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn csv_quotes_only_what_needs_quoting() {
        let output = QueryOutput {
            columns: vec!["name".into(), "note".into()],
            rows: vec![vec![json!("plain"), json!("a, \"b\"")], vec![json!(1.5), json!(null)]],
            truncated: false,
        };
        assert_eq!(to_csv(&output), "name,note\r\nplain,\"a, \"\"b\"\"\"\r\n1.5,\r\n");
    }
}
