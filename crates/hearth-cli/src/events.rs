//! `hearth events`: the tenant's event log as a table (or JSON/YAML), and
//! `--follow`, which reads the live stream (`/v1/events/stream`) and prints
//! each event as it comes until interrupted.
//!
//! The rendering and the server-sent-events parser are pure functions
//! ([`render_events`], [`event_row`], [`SseParser`]); only [`list`] and
//! [`follow`] talk to the server.

use crate::OutputFormat;
use crate::client::Client;
use crate::error::CliError;
use crate::output::{render_value, table};
use serde_json::Value;
use std::io::BufRead;

/// The columns of `hearth events`.
pub const HEADERS: &[&str] = &["ID", "TIME", "KIND", "SUBJECT", "ACTOR", "DETAILS"];

/// Widths of the columns but the last when following (rows are printed as
/// they come, so widths cannot be measured first).
const FOLLOW_WIDTHS: &[usize] = &[8, 24, 22, 44, 12];

/// `hearth events` arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EventsArgs {
    /// Keep reading the live stream and print events as they come, until
    /// interrupted
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only these kinds (vm.ready) or families (vm); repeat or separate
    /// with commas
    #[arg(long = "type", value_name = "KIND", value_delimiter = ',')]
    pub types: Vec<String>,
    /// Only events after this id
    #[arg(long, value_name = "ID")]
    pub after: Option<i64>,
}

/// One event's row: ID, TIME, KIND, SUBJECT, ACTOR, DETAILS.
pub fn event_row(event: &Value) -> Vec<String> {
    let text = |key: &str| match event.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_owned(),
        Some(other) => other.to_string(),
    };
    vec![
        text("id"),
        text("at"),
        text("kind"),
        text("subject"),
        text("actor"),
        details(event.get("data").unwrap_or(&Value::Null)),
    ]
}

/// An event's data as `key=value` pairs in key order, nulls left out,
/// strings bare.
pub fn details(data: &Value) -> String {
    let Some(map) = data.as_object() else {
        return String::new();
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    keys.into_iter()
        .filter_map(|k| match &map[k] {
            Value::Null => None,
            Value::String(s) => Some(format!("{k}={s}")),
            other => Some(format!("{k}={other}")),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The listing as a table (default), JSON or YAML (the events array).
pub fn render_events(events: &[Value], format: Option<OutputFormat>) -> String {
    match format.unwrap_or(OutputFormat::Table) {
        OutputFormat::Table if events.is_empty() => "No events found.\n".to_owned(),
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = events.iter().map(event_row).collect();
            table(HEADERS, &rows)
        }
        other => render_value(&Value::Array(events.to_vec()), other),
    }
}

/// One followed event as printed: a fixed-width row, one compact JSON
/// line, or one YAML document.
pub fn follow_line(event: &Value, format: Option<OutputFormat>) -> String {
    match format.unwrap_or(OutputFormat::Table) {
        OutputFormat::Table => fixed_row(&event_row(event)),
        OutputFormat::Json => format!("{event}\n"),
        OutputFormat::Yaml => format!("---\n{}", render_value(event, OutputFormat::Yaml)),
    }
}

/// The header `--follow` prints first in a table.
pub fn follow_header() -> String {
    fixed_row(&HEADERS.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>())
}

fn fixed_row(cells: &[String]) -> String {
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        match FOLLOW_WIDTHS.get(i) {
            Some(width) => line.push_str(&format!("{cell:<width$}   ")),
            None => line.push_str(cell),
        }
    }
    format!("{}\n", line.trim_end())
}

/// One frame of a server-sent-events stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frame {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Reads server-sent events line by line: [`SseParser::line`] answers a
/// frame when the blank line that ends it comes. Comments (keep-alives)
/// and frames without data answer nothing.
#[derive(Debug, Default)]
pub struct SseParser {
    frame: Frame,
    has_data: bool,
}

impl SseParser {
    pub fn line(&mut self, line: &str) -> Option<Frame> {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            let frame = std::mem::take(&mut self.frame);
            let had = std::mem::take(&mut self.has_data);
            return had.then_some(frame);
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => self.frame.id = Some(value.to_owned()),
            "event" => self.frame.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.frame.data.push('\n');
                }
                self.frame.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

fn query(types: &[String], after: Option<i64>) -> Vec<(&'static str, String)> {
    let mut query = Vec::new();
    if !types.is_empty() {
        query.push(("type", types.join(",")));
    }
    if let Some(after) = after {
        query.push(("after", after.to_string()));
    }
    query
}

/// `hearth events`: every event after `--after` (page by page), rendered.
pub fn list(
    client: &Client,
    args: &EventsArgs,
    format: Option<OutputFormat>,
) -> Result<String, CliError> {
    let mut events = Vec::new();
    let mut after = args.after;
    loop {
        let pairs = query(&args.types, after);
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let page: Value = client.get_query(&["events"], &pairs)?;
        let got = page
            .get("events")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| CliError::internal("GET /v1/events: no events in the answer"))?;
        if got.is_empty() {
            break;
        }
        after = page.get("next").and_then(Value::as_i64);
        events.extend(got);
    }
    Ok(render_events(&events, format))
}

/// `hearth events --follow`: prints (through `print`) each event of the
/// stream as it comes; reconnects from the last id seen when the stream
/// ends. Returns only on an error.
pub fn follow(
    client: &Client,
    args: &EventsArgs,
    format: Option<OutputFormat>,
    print: &dyn Fn(&str),
) -> Result<(), CliError> {
    if format.unwrap_or(OutputFormat::Table) == OutputFormat::Table {
        print(&follow_header());
    }
    let mut last = args.after;
    loop {
        let pairs = query(&args.types, last);
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let response = client.open_stream(&["events", "stream"], &pairs)?;
        let mut parser = SseParser::default();
        for line in std::io::BufReader::new(response).lines() {
            let Ok(line) = line else { break };
            let Some(frame) = parser.line(&line) else {
                continue;
            };
            let event: Value = serde_json::from_str(&frame.data).map_err(|e| {
                CliError::internal(format!("the event stream sent an unreadable event: {e}"))
            })?;
            if let Some(id) = event.get("id").and_then(Value::as_i64) {
                last = Some(id);
            }
            print(&follow_line(&event, format));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_end_at_blank_lines_and_comments_are_skipped() {
        let mut p = SseParser::default();
        assert_eq!(p.line(": keep-alive"), None);
        assert_eq!(p.line(""), None);
        assert_eq!(p.line("id: 7"), None);
        assert_eq!(p.line("event: vm.ready"), None);
        assert_eq!(p.line("data: {\"id\":7}\r"), None);
        assert_eq!(
            p.line(""),
            Some(Frame {
                id: Some("7".into()),
                event: Some("vm.ready".into()),
                data: "{\"id\":7}".into()
            })
        );
        assert_eq!(p.line("data:a"), None);
        assert_eq!(p.line("data: b"), None);
        assert_eq!(p.line("").unwrap().data, "a\nb");
    }

    #[test]
    fn rows_show_details_in_key_order_without_nulls() {
        let event = json!({
            "id": 12, "at": "2026-12-01T17:00:00.000Z", "kind": "agent.running",
            "subject": "agent/a1", "actor": null,
            "data": {"workspace": "web", "from": "queued", "vm": "v1", "error": null}
        });
        assert_eq!(
            event_row(&event),
            [
                "12",
                "2026-12-01T17:00:00.000Z",
                "agent.running",
                "agent/a1",
                "-",
                "from=queued vm=v1 workspace=web"
            ]
        );
        let text = render_events(std::slice::from_ref(&event), None);
        assert!(text.starts_with("ID "), "{text}");
        assert!(text.contains("from=queued vm=v1 workspace=web"), "{text}");
        assert_eq!(render_events(&[], None), "No events found.\n");
        let line = follow_line(&event, Some(OutputFormat::Json));
        assert_eq!(serde_json::from_str::<Value>(&line).unwrap(), event);
        assert!(follow_header().starts_with(&format!("{:<8}   TIME", "ID")));
    }
}
