//! Everything the CLI prints on success, as pure functions of the server's
//! answers: the wire shapes of those answers, YAML and JSON rendering, the
//! kubectl-style tables (borderless, uppercase headers), the one-line
//! `kind/name verb` messages, the text of `hearth pool status`, the lines
//! of the pool, agent and build commands, and the warm-pool settings,
//! provisioning runs (instances) and their step lines. Anything that
//! depends on the clock takes `now` as an argument.

use crate::error::CliError;
use comfy_table::{Table, presets::NOTHING};
use hearth_core::resource::{Kind, Repo};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::time::{Duration, SystemTime};

/// The `-o/--output` formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Yaml,
    Json,
    Table,
}

/// A stored resource as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub version: Option<i64>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
    /// The resource's fields, secrets already masked by the server.
    #[serde(default)]
    pub spec: Value,
}

/// The answer to `GET /v1/{segment}`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResourceList {
    pub items: Vec<Resource>,
}

/// The answer to `PUT` and `PATCH` of a resource.
#[derive(Debug, Clone, Deserialize)]
pub struct WriteAnswer {
    /// `created`, `updated` or `unchanged`.
    pub outcome: String,
    pub resource: Resource,
}

/// The answer to the list endpoints that are not resources (tenants,
/// identities): their items are shown as they come.
#[derive(Debug, Clone, Deserialize)]
pub struct Items {
    pub items: Vec<Value>,
}

/// Whether output of `kind` shows the resource version (the versioned kinds,
/// whose VMs go stale when it changes).
pub fn shows_version(kind: Kind) -> bool {
    matches!(kind, Kind::Environment | Kind::Image)
}

/// The object shown for one resource: its spec, plus `version` as the last
/// key for environments and images.
pub fn resource_view(kind: Kind, resource: &Resource) -> Value {
    let mut object = match &resource.spec {
        Value::Object(map) => map.clone(),
        Value::Null => Map::new(),
        other => return other.clone(),
    };
    append_version(kind, resource, &mut object);
    Value::Object(object)
}

/// The object shown for a resource inside a list: `name` first, then the
/// spec's fields (and `version` last, as in [`resource_view`]).
pub fn list_item_view(kind: Kind, resource: &Resource) -> Value {
    let mut object = Map::new();
    object.insert("name".into(), Value::String(resource.name.clone()));
    if let Value::Object(spec) = &resource.spec {
        for (key, value) in spec {
            if key != "name" {
                object.insert(key.clone(), value.clone());
            }
        }
    }
    append_version(kind, resource, &mut object);
    Value::Object(object)
}

fn append_version(kind: Kind, resource: &Resource, object: &mut Map<String, Value>) {
    if shows_version(kind) {
        object.shift_remove("version");
        if let Some(version) = resource.version {
            object.insert("version".into(), Value::from(version));
        }
    }
}

/// `value` as YAML, ending in a newline.
pub fn to_yaml(value: &Value) -> String {
    let text = serde_yaml_ng::to_string(value).unwrap_or_else(|_| to_json(value));
    with_newline(text)
}

/// `value` as pretty JSON, ending in a newline.
pub fn to_json(value: &Value) -> String {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    with_newline(text)
}

fn with_newline(mut text: String) -> String {
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// A kubectl-style table: no borders, uppercase headers as given, columns
/// separated by three spaces, no trailing whitespace; ends in a newline.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(headers.to_vec());
    for row in rows {
        t.add_row(row.clone());
    }
    let count = t.column_count();
    for (i, column) in t.column_iter_mut().enumerate() {
        let right = if i + 1 == count { 0 } else { 3 };
        column.set_padding((0, right));
    }
    with_newline(t.trim_fmt())
}

/// How a JSON value reads in a table cell: strings bare, absent or null as
/// `<none>`, anything else as compact JSON.
pub fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "<none>".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// A spec field as a cell, with the default the server applies when absent.
fn field(spec: &Value, key: &str, default: &str) -> String {
    match spec.get(key) {
        None | Some(Value::Null) => default.to_owned(),
        value => cell(value),
    }
}

/// The table columns for `kind`.
pub fn resource_headers(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::PoolConfig => &[
            "NAME",
            "MAX_VMS",
            "MAX_AGENTS_PER_DEVELOPER",
            "REAP_STRANDED_WORKFLOWS",
        ],
        Kind::Workspace => &["NAME", "ENVIRONMENT", "MIN_IDLE", "MAX_IDLE", "REPOS"],
        Kind::Environment => &["NAME", "DRIVER", "IMAGE", "CPUS", "MEMORY", "VERSION"],
        Kind::Image => &["NAME", "DRIVER", "VERSION"],
    }
}

/// The table row of one resource, matching [`resource_headers`].
pub fn resource_row(kind: Kind, resource: &Resource) -> Vec<String> {
    let spec = &resource.spec;
    let name = resource.name.clone();
    let version = resource
        .version
        .map_or_else(|| "<none>".to_owned(), |v| v.to_string());
    match kind {
        Kind::PoolConfig => vec![
            name,
            field(spec, "max_vms", "<none>"),
            field(spec, "max_agents_per_developer", "0"),
            field(spec, "reap_stranded_workflows", "dry_run"),
        ],
        Kind::Workspace => {
            let min_idle = field(spec, "min_idle", "0");
            vec![
                name,
                field(spec, "environment", "<none>"),
                min_idle.clone(),
                field(spec, "max_idle", &min_idle),
                repos_cell(spec.get("repos")),
            ]
        }
        Kind::Environment => vec![
            name,
            field(spec, "driver", "sandbox"),
            field(spec, "image", "<default>"),
            field(spec, "cpus", "1"),
            field(spec, "memory", "512Mi"),
            version,
        ],
        Kind::Image => vec![name, field(spec, "driver", "<none>"), version],
    }
}

/// A workspace's repos as the folder names they are cloned into, joined
/// with `,`.
fn repos_cell(repos: Option<&Value>) -> String {
    let names: Vec<String> = repos
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|repo| match serde_json::from_value::<Repo>(repo.clone()) {
                    Ok(parsed) => parsed.dir_name(),
                    Err(_) => cell(repo.get("url").or(Some(repo))),
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        "<none>".to_owned()
    } else {
        names.join(",")
    }
}

/// `hearth get KIND NAME`: YAML of the spec by default.
pub fn render_resource(kind: Kind, resource: &Resource, format: Option<OutputFormat>) -> String {
    match format.unwrap_or(OutputFormat::Yaml) {
        OutputFormat::Yaml => to_yaml(&resource_view(kind, resource)),
        OutputFormat::Json => to_json(&resource_view(kind, resource)),
        OutputFormat::Table => table(resource_headers(kind), &[resource_row(kind, resource)]),
    }
}

/// `hearth get KIND`: a table by default; YAML and JSON show a sequence of
/// [`list_item_view`] objects.
pub fn render_resource_list(
    kind: Kind,
    items: &[Resource],
    format: Option<OutputFormat>,
) -> String {
    match format.unwrap_or(OutputFormat::Table) {
        OutputFormat::Table if items.is_empty() => format!("No {kind} resources found.\n"),
        OutputFormat::Table => {
            let rows: Vec<_> = items.iter().map(|r| resource_row(kind, r)).collect();
            table(resource_headers(kind), &rows)
        }
        OutputFormat::Yaml | OutputFormat::Json => {
            let list = Value::Array(items.iter().map(|r| list_item_view(kind, r)).collect());
            render_value(&list, format.unwrap_or(OutputFormat::Yaml))
        }
    }
}

/// YAML or JSON of any value (a table falls back to YAML).
pub fn render_value(value: &Value, format: OutputFormat) -> String {
    match format {
        OutputFormat::Json => to_json(value),
        OutputFormat::Yaml | OutputFormat::Table => to_yaml(value),
    }
}

/// The line `hearth set` prints: `kind/name created|configured|unchanged`.
pub fn set_message(kind: Kind, name: &str, outcome: &str) -> String {
    let verb = match outcome {
        "updated" => "configured",
        other => other,
    };
    format!("{kind}/{name} {verb}\n")
}

/// The line `hearth patch` prints: `kind/name patched|unchanged`.
pub fn patch_message(kind: Kind, name: &str, outcome: &str) -> String {
    let verb = if outcome == "unchanged" {
        "unchanged"
    } else {
        "patched"
    };
    format!("{kind}/{name} {verb}\n")
}

/// The line `hearth delete` prints: `kind/name deleted`.
pub fn deleted_message(kind: impl std::fmt::Display, name: &str) -> String {
    format!("{kind}/{name} deleted\n")
}

/// A single record (whoami, a created tenant or identity, a token): YAML by
/// default; as a table, one row whose headers are the keys uppercased, with
/// nested objects flattened into their own keys.
pub fn render_record(value: &Value, format: Option<OutputFormat>) -> String {
    match format.unwrap_or(OutputFormat::Yaml) {
        OutputFormat::Table => {
            let mut headers = Vec::new();
            let mut row = Vec::new();
            let mut push = |key: &str, v: &Value| {
                headers.push(key.to_uppercase());
                row.push(cell(Some(v)));
            };
            if let Value::Object(map) = value {
                for (key, v) in map {
                    match v {
                        Value::Object(inner) => inner.iter().for_each(|(k, v)| push(k, v)),
                        _ => push(key, v),
                    }
                }
            }
            let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
            table(&headers, &[row])
        }
        other => render_value(value, other),
    }
}

/// `hearth auth whoami`: tenant, identity, kind and role by default; every
/// field (permissions too) with `-o yaml|json`.
pub fn render_whoami(answer: &Value, format: Option<OutputFormat>) -> String {
    match format {
        Some(OutputFormat::Yaml | OutputFormat::Json) => render_record(answer, format),
        _ => {
            let mut short = Map::new();
            for key in ["tenant", "identity", "kind", "role"] {
                if let Some(v) = answer.get(key) {
                    short.insert(key.into(), v.clone());
                }
            }
            render_record(&Value::Object(short), format)
        }
    }
}

/// A list of records shown as a table of `columns` (header, field), or as
/// the items themselves in YAML or JSON. An empty table prints `empty`.
pub fn render_items(
    items: &[Value],
    columns: &[(&str, &str)],
    format: Option<OutputFormat>,
    empty: &str,
) -> String {
    match format.unwrap_or(OutputFormat::Table) {
        OutputFormat::Table if items.is_empty() => format!("{empty}\n"),
        OutputFormat::Table => {
            let headers: Vec<&str> = columns.iter().map(|(h, _)| *h).collect();
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|item| columns.iter().map(|(_, f)| cell(item.get(*f))).collect())
                .collect();
            table(&headers, &rows)
        }
        other => render_value(&Value::Array(items.to_vec()), other),
    }
}

/// The columns of `hearth webhook list`.
pub const WEBHOOK_COLUMNS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("URL", "url"),
    ("TYPES", "types"),
    ("ENABLED", "enabled"),
    ("CURSOR", "cursor"),
    ("CREATED", "created_at"),
];

/// The columns of `hearth webhook deliveries`.
pub const DELIVERY_COLUMNS: &[(&str, &str)] = &[
    ("EVENT", "event_id"),
    ("KIND", "kind"),
    ("ATTEMPT", "attempt"),
    ("OUTCOME", "outcome"),
    ("STATUS", "status"),
    ("ERROR", "error"),
    ("STARTED", "started_at"),
    ("NEXT RETRY", "next_retry_at"),
];

/// The columns of `hearth tenant list`.
pub const TENANT_COLUMNS: &[(&str, &str)] = &[("NAME", "name"), ("CREATED", "created_at")];

/// `hearth node list`: a table of NAME STATE REACHABLE VMS CPUS MEMORY
/// HEARTBEAT (what the node's VMs take of its capacity), or the answer's
/// items with `-o json|yaml`.
pub fn render_nodes(items: &[Value], format: Option<OutputFormat>) -> String {
    match format.unwrap_or(OutputFormat::Table) {
        OutputFormat::Table if items.is_empty() => "No nodes found.\n".to_owned(),
        OutputFormat::Table => {
            let of = |item: &Value, usage: &str, capacity: &str| {
                format!(
                    "{}/{}",
                    cell(item.pointer(&format!("/usage/{usage}"))),
                    cell(item.pointer(&format!("/capacity/{capacity}")))
                )
            };
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|item| {
                    vec![
                        cell(item.get("name")),
                        cell(item.get("state")),
                        match item.get("reachable") {
                            Some(Value::Bool(true)) => "yes".to_owned(),
                            Some(Value::Bool(false)) => "no".to_owned(),
                            other => cell(other),
                        },
                        of(item, "vms", "vm_slots"),
                        of(item, "cpus", "cpus"),
                        format!("{}Mi", of(item, "memory_mib", "memory_mib")),
                        cell(item.get("last_heartbeat")),
                    ]
                })
                .collect();
            table(
                &[
                    "NAME",
                    "STATE",
                    "REACHABLE",
                    "VMS",
                    "CPUS",
                    "MEMORY",
                    "HEARTBEAT",
                ],
                &rows,
            )
        }
        other => render_value(&Value::Array(items.to_vec()), other),
    }
}

/// The columns of `hearth identity list`.
pub const IDENTITY_COLUMNS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("KIND", "kind"),
    ("ROLE", "role"),
    ("CREATED", "created_at"),
];

/// An answer of a shape this client does not expect: the server and the
/// client disagree on the contract.
fn unexpected(what: &str, err: impl std::fmt::Display) -> CliError {
    CliError::internal(format!("unexpected answer to {what}: {err}"))
}

/// Reads a JSON answer into its wire type; `what` names the call for the
/// error when it does not fit (`POST /v1/pool/flush`).
pub fn parse_answer<T: DeserializeOwned>(what: &str, answer: &Value) -> Result<T, CliError> {
    T::deserialize(answer).map_err(|e| unexpected(what, e))
}

// ---------------------------------------------------------------------------
// Pool

/// The answer to `GET /v1/pool/status`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PoolStatus {
    pub pool: String,
    /// `healthy`, `degraded`, `over_cap`, `stopped` or `unconfigured`.
    pub status: String,
    pub vms: PoolVms,
    /// Agents waiting for a VM, across the pool.
    pub queued: i64,
    pub configuration: PoolConfiguration,
    #[serde(default)]
    pub workspaces: Vec<WorkspaceStatus>,
    #[serde(default)]
    pub reaper: Option<Reaper>,
    /// The tenant's last reconcile pass (absent from older servers).
    #[serde(default)]
    pub pass: Option<PassSummary>,
}

/// What `hearth pool status` shows of the last reconcile pass (the JSON
/// has more: totals, the last error's time, where it came from).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PassSummary {
    pub replica: String,
    pub iteration: u64,
    pub woken_by: String,
    pub duration_ms: f64,
    /// Actions by kind.
    #[serde(default)]
    pub actions: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub errors: u64,
}

/// `Pass: 12 (replica r1, woken by api, 3.2ms): 2 boot, 1 destroy; 0 errors`.
fn pass_line(p: &PassSummary) -> String {
    let acted: Vec<String> = p
        .actions
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(kind, n)| format!("{n} {kind}"))
        .collect();
    let acted = if acted.is_empty() {
        "no actions".to_owned()
    } else {
        acted.join(", ")
    };
    format!(
        "Pass: {} (replica {}, woken by {}, {:.1}ms): {acted}; {}\n",
        p.iteration,
        p.replica,
        p.woken_by,
        p.duration_ms,
        plural(p.errors as i64, "error", "errors")
    )
}

/// The pool's VMs by state.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PoolVms {
    pub total: i64,
    pub active: i64,
    pub idle: i64,
    pub booting: i64,
    #[serde(default)]
    pub draining: i64,
    #[serde(default)]
    pub stale: i64,
}

/// The pool's settings as one line; each field is shown as sent (`null` as
/// `-`, and `idle_timeout` may be `"mixed"` across workspaces).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PoolConfiguration {
    #[serde(default)]
    pub max_vms: Value,
    #[serde(default)]
    pub min_idle: Value,
    #[serde(default)]
    pub max_idle: Value,
    #[serde(default)]
    pub idle_timeout: Value,
    #[serde(default)]
    pub boot_timeout: Value,
}

/// One workspace's share of the pool.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WorkspaceStatus {
    pub name: String,
    /// `healthy`, `backing_off`, `hard_limited` or `disabled`.
    pub status: String,
    pub idle: i64,
    pub booting: i64,
    pub active: i64,
    pub stale: i64,
    pub queued: i64,
    #[serde(default)]
    pub min_idle: Value,
    #[serde(default)]
    pub max_idle: Value,
    #[serde(default)]
    pub idle_timeout: Value,
    #[serde(default)]
    pub consecutive_failures: i64,
    /// When the next boot is allowed (RFC 3339), while backing off.
    #[serde(default)]
    pub backoff_until: Option<String>,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// The stranded-workflow reaper.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Reaper {
    /// `dry_run`, `enabled` or `disabled`.
    pub mode: String,
    pub stranded: i64,
}

/// `word` for one, `words` otherwise.
fn plural(n: i64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

/// A setting as shown in `hearth pool status`: bare strings and numbers,
/// `-` for null or absent.
fn setting(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `  <label padded to 10><value>`, then `<value padded to 4>(<note>)`
/// when there is a note. The value keeps one space before the note even
/// past 4 digits.
fn count_line(out: &mut String, label: &str, value: i64, note: Option<&str>) {
    let line = match note {
        Some(note) => format!("  {label:<10}{value:<3} ({note})"),
        None => format!("  {label:<10}{value}"),
    };
    out.push_str(&line);
    out.push('\n');
}

/// The `Status:` value of a workspace: the status, with the failure count
/// and what to do while it backs off or is hard-limited.
fn workspace_status_text(ws: &WorkspaceStatus) -> String {
    let failures = plural(
        ws.consecutive_failures,
        "consecutive failure",
        "consecutive failures",
    );
    match ws.status.as_str() {
        "backing_off" => match &ws.backoff_until {
            Some(until) => format!("backing_off ({failures}, next boot at {until})"),
            None => format!("backing_off ({failures})"),
        },
        "hard_limited" => format!(
            "hard_limited ({failures}; fix the configuration or run hearth pool reset --workspace {})",
            ws.name
        ),
        other => other.to_owned(),
    }
}

/// `hearth pool status` as text: the pool's counts, configuration and
/// reaper, then one block per workspace.
pub fn pool_status_text(s: &PoolStatus) -> String {
    let status = match s.status.as_str() {
        "over_cap" => format!(
            "over_cap ({} live, max_vms {}: destroying idle VMs until within the cap)",
            plural(s.vms.total, "VM", "VMs"),
            setting(&s.configuration.max_vms)
        ),
        other => other.to_owned(),
    };
    let mut out = format!("Pool: {}\nStatus: {status}\nVMs:\n", s.pool);
    count_line(&mut out, "Total:", s.vms.total, None);
    count_line(&mut out, "Active:", s.vms.active, Some("running agents"));
    count_line(&mut out, "Idle:", s.vms.idle, Some("warm, ready to claim"));
    count_line(&mut out, "Booting:", s.vms.booting, Some("starting up"));
    count_line(
        &mut out,
        "Queued:",
        s.queued,
        Some("agents waiting for a VM"),
    );
    let c = &s.configuration;
    out.push_str(&format!(
        "Configuration:\n  max_vms: {}  min_idle: {}  max_idle: {}  idle_timeout: {}  boot_timeout: {}\n",
        setting(&c.max_vms),
        setting(&c.min_idle),
        setting(&c.max_idle),
        setting(&c.idle_timeout),
        setting(&c.boot_timeout),
    ));
    match &s.reaper {
        Some(r) => out.push_str(&format!(
            "Reaper: {} ({})\n",
            r.mode,
            plural(r.stranded, "stranded workflow", "stranded workflows")
        )),
        None => out.push_str("Reaper: -\n"),
    }
    if let Some(pass) = &s.pass {
        out.push_str(&pass_line(pass));
    }
    for ws in &s.workspaces {
        out.push_str(&format!(
            "\nWorkspace: {}\n  {:<10}{}\n",
            ws.name,
            "Status:",
            workspace_status_text(ws)
        ));
        if let Some(error) = ws.last_error.as_deref().filter(|e| !e.is_empty()) {
            out.push_str(&format!("  {:<10}{error}\n", "Error:"));
        }
        let idle_note = format!(
            "min_idle {}, max_idle {}",
            setting(&ws.min_idle),
            setting(&ws.max_idle)
        );
        count_line(&mut out, "Idle:", ws.idle, Some(&idle_note));
        count_line(&mut out, "Booting:", ws.booting, None);
        count_line(&mut out, "Active:", ws.active, None);
        count_line(&mut out, "Stale:", ws.stale, None);
        count_line(&mut out, "Queued:", ws.queued, None);
    }
    out
}

/// `hearth pool status`: the answer as is with `-o yaml|json`, else (and
/// with `-o table`) the text of [`pool_status_text`].
pub fn render_pool_status(
    answer: &Value,
    format: Option<OutputFormat>,
) -> Result<String, CliError> {
    match format {
        Some(f @ (OutputFormat::Yaml | OutputFormat::Json)) => Ok(render_value(answer, f)),
        _ => Ok(pool_status_text(&parse_answer(
            "GET /v1/pool/status",
            answer,
        )?)),
    }
}

/// The line `hearth pool flush` prints before it sends the request.
pub fn flush_progress(nuke: bool) -> &'static str {
    if nuke {
        "Nuking all workflows and VMs...\n"
    } else {
        "Flushing warm VMs...\n"
    }
}

/// The answer to `POST /v1/pool/flush` without `nuke`.
#[derive(Debug, Clone, Deserialize)]
pub struct FlushAnswer {
    pub flushed: u64,
}

/// The answer to `POST /v1/pool/flush` with `nuke`.
#[derive(Debug, Clone, Deserialize)]
pub struct NukeAnswer {
    pub terminated: u64,
    pub deleted: u64,
    pub total: u64,
}

/// The line `hearth pool flush [--nuke]` prints after the answer.
pub fn flush_message(answer: &Value, nuke: bool) -> Result<String, CliError> {
    const WHAT: &str = "POST /v1/pool/flush";
    if nuke {
        let a: NukeAnswer = parse_answer(WHAT, answer)?;
        return Ok(format!("Nuke complete ({} terminated/deleted)\n", a.total));
    }
    let a: FlushAnswer = parse_answer(WHAT, answer)?;
    Ok(match a.flushed {
        0 => "No warm VMs to flush\n".to_owned(),
        1 => "Flushed 1 warm VM — pool will replenish with fresh ones\n".to_owned(),
        n => format!("Flushed {n} warm VMs — pool will replenish with fresh ones\n"),
    })
}

/// The answer to `POST /v1/pool/up`.
#[derive(Debug, Clone, Deserialize)]
pub struct PoolUpAnswer {
    pub was_stopped: bool,
}

/// The line `hearth pool up` prints.
pub fn pool_up_message(answer: &Value) -> Result<String, CliError> {
    let a: PoolUpAnswer = parse_answer("POST /v1/pool/up", answer)?;
    Ok(if a.was_stopped {
        "Pool started — replenishing to min_idle\n".to_owned()
    } else {
        "Pool is already up — replenishing to min_idle\n".to_owned()
    })
}

/// The line `hearth pool reset` prints.
pub fn pool_reset_message(workspace: &str) -> String {
    format!("Workspace {workspace}: failure back-off cleared\n")
}

// ---------------------------------------------------------------------------
// Agents

/// The fields of an agent (`AgentView` on the wire) the CLI acts on; the
/// answer itself is what `-o yaml|json` prints.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AgentView {
    pub id: String,
    pub workspace: String,
    /// `queued`, `provisioning`, `running`, `idle`, `sleeping`,
    /// `completed`, `failed` or `killed`.
    pub phase: String,
    #[serde(default)]
    pub vm: Option<String>,
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i64>,
    /// What the agent's command printed; `None` when the server withheld
    /// it (`output_hidden`: not the caller's agent, or a viewer).
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

impl AgentView {
    /// Reads an agent answer; `what` names the call for the error.
    pub fn from_answer(what: &str, answer: &Value) -> Result<AgentView, CliError> {
        parse_answer(what, answer)
    }

    /// Whether the agent is over for good: `completed`, `failed` or
    /// `killed`.
    pub fn is_terminal(&self) -> bool {
        matches!(self.phase.as_str(), "completed" | "failed" | "killed")
    }

    /// Whether the agent has no VM to run on yet: `queued` or
    /// `provisioning`.
    pub fn is_starting(&self) -> bool {
        matches!(self.phase.as_str(), "queued" | "provisioning")
    }

    /// The exit status a finished agent stands for: its exit code, else 0
    /// when it completed and 1 when it failed or was killed.
    pub fn exit_status(&self) -> i32 {
        match self.exit_code {
            Some(code) => i32::try_from(code).unwrap_or(1),
            None if self.phase == "completed" => 0,
            None => 1,
        }
    }
}

/// The line `hearth spawn` prints:
/// `Agent <id> <phase> (workspace <W>)[ on VM <vm>]`.
pub fn agent_line(agent: &AgentView) -> String {
    let mut line = format!(
        "Agent {} {} (workspace {})",
        agent.id, agent.phase, agent.workspace
    );
    if let Some(vm) = agent.vm.as_deref().filter(|vm| !vm.is_empty()) {
        line.push_str(&format!(" on VM {vm}"));
    }
    line.push('\n');
    line
}

/// `text` ending in a newline unless empty (a command's output before the
/// line that follows it).
pub fn ending_in_newline(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        with_newline(text.to_owned())
    }
}

/// The actions `hearth agents kill|sleep|wake|resurrect` ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentAction {
    Kill,
    Sleep,
    Wake,
    Resurrect,
}

impl AgentAction {
    /// The last segment of `POST /v1/agents/{id}/<verb>`.
    pub fn verb(self) -> &'static str {
        match self {
            AgentAction::Kill => "kill",
            AgentAction::Sleep => "sleep",
            AgentAction::Wake => "wake",
            AgentAction::Resurrect => "resurrect",
        }
    }
}

/// The line an agent action prints: `agent/<id> killed`, `agent/<id>
/// sleeping`, `agent/<id> woken (<phase>)`, `agent/<id> resurrected
/// (<phase>)`.
pub fn agent_action_message(action: AgentAction, id: &str, agent: &AgentView) -> String {
    match action {
        AgentAction::Kill => format!("agent/{id} killed\n"),
        AgentAction::Sleep => format!("agent/{id} sleeping\n"),
        AgentAction::Wake => format!("agent/{id} woken ({})\n", agent.phase),
        AgentAction::Resurrect => format!("agent/{id} resurrected ({})\n", agent.phase),
    }
}

/// The line `hearth agents finish` prints: `agent/<id> completed|failed`.
pub fn finish_message(id: &str, status: &str) -> String {
    format!("agent/{id} {status}\n")
}

/// Reads an RFC 3339 timestamp (`2026-11-23T03:00:00.123Z`, or with a
/// `+01:00` style offset).
/// Unix milliseconds as the API writes a timestamp (tests build answers
/// with it).
#[cfg(test)]
pub(crate) fn rfc3339_at(ms: Value) -> Value {
    match ms.as_u64() {
        Some(ms) => Value::String(
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .to_string(),
        ),
        None => ms,
    }
}

pub fn parse_timestamp(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    if let Ok(t) = humantime::parse_rfc3339(text) {
        return Some(t);
    }
    // humantime reads only `Z`: move a numeric offset into the result.
    let cut = text.len().checked_sub(6)?;
    let (local, offset) = (text.get(..cut)?, text.get(cut..)?);
    let sign = match offset.as_bytes() {
        [b'+', _, _, b':', _, _] => 1,
        [b'-', _, _, b':', _, _] => -1,
        _ => return None,
    };
    let hours: u64 = offset[1..3].parse().ok()?;
    let minutes: u64 = offset[4..6].parse().ok()?;
    let shift = Duration::from_secs(hours * 3600 + minutes * 60);
    let local = humantime::parse_rfc3339(&format!("{local}Z")).ok()?;
    // Local time ahead of UTC (+hh:mm) means an earlier instant.
    if sign > 0 {
        local.checked_sub(shift)
    } else {
        local.checked_add(shift)
    }
}

/// How long ago `created_at` was, kubectl style, in its largest whole unit:
/// `5s`, `3m`, `2h`, `4d` (`0s` for a time after `now`; `<unknown>` when
/// the timestamp cannot be read).
pub fn age(created_at: &str, now: SystemTime) -> String {
    let Some(then) = parse_timestamp(created_at) else {
        return "<unknown>".to_owned();
    };
    let secs = now.duration_since(then).map_or(0, |d| d.as_secs());
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// An id shortened to its first 8 characters, or `<none>`.
pub fn short_id(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) if !s.is_empty() => s.chars().take(8).collect(),
        _ => "<none>".to_owned(),
    }
}

/// The headers of `hearth agents list`.
pub const AGENT_HEADERS: &[&str] = &["ID", "PHASE", "WORKSPACE", "OWNER", "VM", "AGE"];

/// One agent as a table row (see [`AGENT_HEADERS`]); AGE is counted up to
/// `now`.
pub fn agent_row(agent: &Value, now: SystemTime) -> Vec<String> {
    vec![
        cell(agent.get("id")),
        cell(agent.get("phase")),
        cell(agent.get("workspace")),
        cell(agent.get("owner")),
        short_id(agent.get("vm")),
        agent
            .get("created_at")
            .and_then(Value::as_str)
            .map_or_else(|| "<unknown>".to_owned(), |t| age(t, now)),
    ]
}

/// `hearth agents list`: a table by default (`No agents found.` when
/// empty), the items as they came with `-o yaml|json`.
pub fn render_agents(items: &[Value], format: Option<OutputFormat>, now: SystemTime) -> String {
    match format.unwrap_or(OutputFormat::Table) {
        OutputFormat::Table if items.is_empty() => "No agents found.\n".to_owned(),
        OutputFormat::Table => {
            let rows: Vec<_> = items.iter().map(|a| agent_row(a, now)).collect();
            table(AGENT_HEADERS, &rows)
        }
        other => render_value(&Value::Array(items.to_vec()), other),
    }
}

/// `hearth agents get`: the agent as YAML by default, JSON with `-o json`,
/// a one-row [`render_agents`] table with `-o table`.
pub fn render_agent(agent: &Value, format: Option<OutputFormat>, now: SystemTime) -> String {
    match format.unwrap_or(OutputFormat::Yaml) {
        OutputFormat::Table => render_agents(std::slice::from_ref(agent), format, now),
        other => render_value(agent, other),
    }
}

/// The answer to `POST /v1/agents/{id}/exec`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExecAnswer {
    /// Tolerated as null (a command that timed out may have none).
    #[serde(default)]
    pub exit_code: Option<i64>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

// ---------------------------------------------------------------------------
// Builds

/// The headers of `hearth builds list`.
pub const BUILD_HEADERS: &[&str] = &["BUILD", "FIRST_SEEN", "RETIRED", "CURRENT"];

/// One build as a table row: RETIRED is `-` until retired, CURRENT is `*`
/// for the build new VMs get.
pub fn build_row(build: &Value) -> Vec<String> {
    let retired = match build.get("retired_at") {
        None | Some(Value::Null) => "-".to_owned(),
        value => cell(value),
    };
    let current = if build.get("current").and_then(Value::as_bool) == Some(true) {
        "*"
    } else {
        ""
    };
    vec![
        cell(build.get("id")),
        cell(build.get("first_seen")),
        retired,
        current.to_owned(),
    ]
}

/// `hearth builds list`: a table by default (`No builds found.` when
/// empty), the items as they came with `-o yaml|json`.
pub fn render_builds(items: &[Value], format: Option<OutputFormat>) -> String {
    match format.unwrap_or(OutputFormat::Table) {
        OutputFormat::Table if items.is_empty() => "No builds found.\n".to_owned(),
        OutputFormat::Table => {
            let rows: Vec<_> = items.iter().map(build_row).collect();
            table(BUILD_HEADERS, &rows)
        }
        other => render_value(&Value::Array(items.to_vec()), other),
    }
}

/// The line `hearth builds retire` prints.
pub fn retired_message(id: &str) -> String {
    format!("build/{id} retired\n")
}

/// An answer with `-o yaml|json`, else `message` (also with `-o table`:
/// these answers are single records with nothing to tabulate).
pub fn answer_or_message(answer: &Value, format: Option<OutputFormat>, message: String) -> String {
    match format {
        Some(f @ (OutputFormat::Yaml | OutputFormat::Json)) => render_value(answer, f),
        _ => message,
    }
}

// ---------------------------------------------------------------------------
// Warm pools and instances

/// The headers of `hearth warm-pool get -o table`.
pub const WARM_POOL_HEADERS: &[&str] = &[
    "ENABLED",
    "TARGET_SIZE",
    "MAX_IDLE",
    "BRANCH",
    "SETUP_COMMANDS",
    "READY",
    "PROVISIONING",
    "FAILED",
];

/// `hearth warm-pool get|set`: the settings and the VMs' status as the API
/// sends them (camelCase keys), YAML by default, JSON with `-o json`, one
/// row of [`WARM_POOL_HEADERS`] with `-o table` (the setup commands by
/// name, then the ready, provisioning and recently failed VMs).
pub fn render_warm_pool(answer: &Value, format: Option<OutputFormat>) -> String {
    match format.unwrap_or(OutputFormat::Yaml) {
        OutputFormat::Table => {
            let names: Vec<String> = answer
                .get("setupCommands")
                .and_then(Value::as_array)
                .map(|list| list.iter().map(|c| cell(c.get("name"))).collect())
                .unwrap_or_default();
            let setup = if names.is_empty() {
                "<none>".to_owned()
            } else {
                names.join(",")
            };
            let row = vec![
                cell(answer.get("enabled")),
                cell(answer.get("targetSize")),
                cell(answer.get("maxIdle")),
                cell(answer.get("branch")),
                setup,
                cell(answer.pointer("/status/ready")),
                cell(answer.pointer("/status/provisioning")),
                cell(answer.pointer("/status/failed")),
            ];
            table(WARM_POOL_HEADERS, &[row])
        }
        other => render_value(answer, other),
    }
}

/// The line `hearth warm-pool set` prints before the settings.
pub fn warm_pool_configured(workspace: &str) -> String {
    format!("warm-pool/{workspace} configured\n")
}

/// The line `hearth warm-pool test` prints once the test boot is started.
pub fn test_started_message(id: &str) -> String {
    format!("Test boot started: instance {id}\n")
}

/// A provisioning run (`Instance` on the wire, camelCase) as far as the CLI
/// reads it; the answer itself is what `-o yaml|json` prints.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceView {
    pub id: String,
    pub workspace: String,
    #[serde(default)]
    pub vm: Option<String>,
    #[serde(default)]
    pub test: bool,
    /// `provisioning`, `ready` or `failed`.
    pub status: String,
    /// Set once the run ended.
    #[serde(default)]
    pub summary: Option<InstanceSummary>,
    #[serde(default)]
    pub steps: Vec<StepView>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
}

/// How a provisioning run ended.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSummary {
    pub success: bool,
    #[serde(default)]
    pub failed_step: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// One step of a provisioning run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepView {
    pub name: String,
    /// The repo's folder, for the per-repo steps.
    #[serde(default)]
    pub repo: Option<String>,
    /// `pending`, `running`, `succeeded` or `failed`.
    pub status: String,
    /// The tail of what the step printed.
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub duration_ms: Option<u64>,
}

impl InstanceView {
    /// Reads an instance answer; `what` names the call for the error.
    pub fn from_answer(what: &str, answer: &Value) -> Result<InstanceView, CliError> {
        parse_answer(what, answer)
    }

    /// Whether the run is over: `ready` or `failed`.
    pub fn is_finished(&self) -> bool {
        matches!(self.status.as_str(), "ready" | "failed")
    }

    /// The step the run failed at: the first `failed` one, else the one the
    /// summary names.
    pub fn failed_step(&self) -> Option<&StepView> {
        self.steps
            .iter()
            .find(|s| s.status == "failed")
            .or_else(|| {
                let name = self.summary.as_ref()?.failed_step.as_deref()?;
                self.steps.iter().find(|s| s.name == name)
            })
    }

    /// The name of the step the run failed at (the summary's `failedStep`,
    /// else the failed step's), if any.
    pub fn failed_step_name(&self) -> Option<&str> {
        self.summary
            .as_ref()
            .and_then(|s| s.failed_step.as_deref())
            .filter(|s| !s.is_empty())
            .or_else(|| self.failed_step().map(|s| s.name.as_str()))
    }

    /// How long the run took: the sum of its steps' durations (they run one
    /// after the other), else `finishedAt - createdAt`; `None` when neither
    /// is known.
    pub fn total_duration(&self) -> Option<Duration> {
        let durations: Vec<u64> = self.steps.iter().filter_map(|s| s.duration_ms).collect();
        if !durations.is_empty() {
            return Some(Duration::from_millis(durations.iter().sum()));
        }
        let created = parse_timestamp(self.created_at.as_deref()?)?;
        let finished = parse_timestamp(self.finished_at.as_deref()?)?;
        Some(finished.duration_since(created).unwrap_or_default())
    }
}

impl StepView {
    /// `name`, or `name (repo)` for a per-repo step.
    pub fn label(&self) -> String {
        match self.repo.as_deref().filter(|r| !r.is_empty()) {
            Some(repo) => format!("{} ({repo})", self.name),
            None => self.name.clone(),
        }
    }

    /// Whether the step is over: `succeeded` or `failed`.
    pub fn is_finished(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed")
    }

    /// What the step printed (none: empty).
    pub fn output(&self) -> &str {
        self.output.as_deref().unwrap_or("")
    }
}

/// A duration as the warm-pool commands show it: to the hundredth of a
/// second under a second (`0.01s`, `0.3s`), to the tenth under a minute
/// (`1.2s`, `12s`), trailing zeros dropped; then `2m03s` under an hour and
/// `1h02m03s` beyond. Each is rounded to its last digit.
pub fn format_duration(d: Duration) -> String {
    fn seconds(whole: u128, fraction: String) -> String {
        let fraction = fraction.trim_end_matches('0');
        if fraction.is_empty() {
            format!("{whole}s")
        } else {
            format!("{whole}.{fraction}s")
        }
    }
    let ms = d.as_millis();
    let centis = (ms + 5) / 10;
    if centis < 100 {
        return seconds(0, format!("{centis:02}"));
    }
    let decis = (ms + 50) / 100;
    if decis < 600 {
        return seconds(decis / 10, (decis % 10).to_string());
    }
    let secs = (ms + 500) / 1000;
    if secs < 3600 {
        return format!("{}m{:02}s", secs / 60, secs % 60);
    }
    format!("{}h{:02}m{:02}s", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// The mark of a step that succeeded.
pub const STEP_SUCCEEDED: &str = "✓";
/// The mark of a step that failed.
pub const STEP_FAILED: &str = "✗";
/// The mark of a step that has not started.
pub const STEP_PENDING: &str = "·";
/// The mark of a running step where nothing spins (`instances get --steps`).
pub const STEP_RUNNING: &str = "▸";

/// One step as a line (no newline, no trailing blanks): its mark, its
/// label padded to `width` (0: no padding, one space before the duration),
/// then its duration — for a running step (marked `running`, a spinner
/// frame on a terminal) the time since it started, up to `now_ms` (Unix
/// ms); none for a pending one.
///
/// `✓ clone_repo (myrepo) 1.2s`, `⠹ project_setup 2.4s`, `· repo_setup`.
pub fn step_line(step: &StepView, width: usize, running: &str, now_ms: i64) -> String {
    let mark = match step.status.as_str() {
        "succeeded" => STEP_SUCCEEDED,
        "failed" => STEP_FAILED,
        "running" => running,
        "pending" => STEP_PENDING,
        _ => "?",
    };
    let duration = match step.status.as_str() {
        "running" => step
            .started_at
            .as_deref()
            .and_then(parse_timestamp)
            .map(|started| {
                let started = started
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                Duration::from_millis(u64::try_from(now_ms.saturating_sub(started)).unwrap_or(0))
            }),
        "pending" => None,
        _ => step.duration_ms.map(Duration::from_millis),
    };
    let line = format!(
        "{mark} {:<width$} {}",
        step.label(),
        duration.map(format_duration).unwrap_or_default()
    );
    line.trim_end().to_owned()
}

/// How many lines of the failed step's output a failure shows.
pub const OUTPUT_TAIL_LINES: usize = 20;

/// The last `n` lines of `output`, each indented two spaces (blank lines
/// stay empty), each ending in a newline.
pub fn indented_tail(output: &str, n: usize) -> String {
    let lines: Vec<&str> = output.trim_end_matches(['\n', '\r']).lines().collect();
    if lines.iter().all(|l| l.trim().is_empty()) {
        return String::new();
    }
    let skip = lines.len().saturating_sub(n);
    lines[skip..]
        .iter()
        .map(|line| {
            let line = line.trim_end();
            if line.is_empty() {
                "\n".to_owned()
            } else {
                format!("  {line}\n")
            }
        })
        .collect()
}

/// The line that says how a run ended: `Instance <id> ready in <total>`,
/// `Instance <id> failed at <step>: <error>` (the step with its repo, as
/// in [`step_line`]), or `Instance <id> <status>` while it runs.
pub fn instance_headline(instance: &InstanceView) -> String {
    let id = &instance.id;
    match instance.status.as_str() {
        "ready" => match instance.total_duration() {
            Some(total) => format!("Instance {id} ready in {}\n", format_duration(total)),
            None => format!("Instance {id} ready\n"),
        },
        "failed" => {
            let step = match (instance.failed_step(), instance.failed_step_name()) {
                (Some(step), Some(name)) if step.name == name => Some(step.label()),
                (_, name) => name.map(str::to_owned),
            };
            let error = instance
                .summary
                .as_ref()
                .and_then(|s| s.error.clone())
                .or_else(|| instance.failed_step().and_then(|s| s.error.clone()))
                .filter(|e| !e.trim().is_empty());
            let mut line = format!("Instance {id} failed");
            if let Some(step) = step {
                line.push_str(&format!(" at {step}"));
            }
            if let Some(error) = error {
                line.push_str(&format!(": {}", error.trim_end()));
            }
            line.push('\n');
            line
        }
        other => format!("Instance {id} {other}\n"),
    }
}

/// What `hearth warm-pool test --watch` prints at the end: the
/// [`instance_headline`], and after a failure the last
/// [`OUTPUT_TAIL_LINES`] lines of the failed step's output, indented.
pub fn instance_outcome(instance: &InstanceView) -> String {
    let mut text = instance_headline(instance);
    if instance.status == "failed"
        && let Some(step) = instance.failed_step()
    {
        text.push_str(&indented_tail(step.output(), OUTPUT_TAIL_LINES));
    }
    text
}

/// `hearth instances get ID --steps`: every step as a [`step_line`] (no
/// padding, as when the output is not a terminal) followed by its whole
/// output indented, then the [`instance_headline`].
pub fn render_instance_steps(instance: &InstanceView, now_ms: i64) -> String {
    let mut text = String::new();
    for step in &instance.steps {
        text.push_str(&step_line(step, 0, STEP_RUNNING, now_ms));
        text.push('\n');
        text.push_str(&indented_tail(step.output(), usize::MAX));
    }
    text.push_str(&instance_headline(instance));
    text
}

/// The headers of `hearth instances list`.
pub const INSTANCE_HEADERS: &[&str] = &[
    "ID",
    "WORKSPACE",
    "STATUS",
    "TEST",
    "FAILED_STEP",
    "DURATION",
    "AGE",
];

/// One instance as a table row (see [`INSTANCE_HEADERS`]): DURATION is `-`
/// while it provisions, FAILED_STEP `-` unless it failed; AGE is counted up
/// to `now`.
pub fn instance_row(instance: &InstanceView, now: SystemTime) -> Vec<String> {
    let failed_step = if instance.status == "failed" {
        instance.failed_step_name().unwrap_or("-").to_owned()
    } else {
        "-".to_owned()
    };
    let duration = if instance.is_finished() {
        instance
            .total_duration()
            .map_or_else(|| "-".to_owned(), format_duration)
    } else {
        "-".to_owned()
    };
    vec![
        instance.id.clone(),
        instance.workspace.clone(),
        instance.status.clone(),
        instance.test.to_string(),
        failed_step,
        duration,
        instance
            .created_at
            .as_deref()
            .map_or_else(|| "<unknown>".to_owned(), |t| age(t, now)),
    ]
}

/// `hearth instances list`: a table by default (`No instances found.` when
/// empty), the items as they came with `-o yaml|json`.
pub fn render_instances(
    items: &[Value],
    format: Option<OutputFormat>,
    now: SystemTime,
) -> Result<String, CliError> {
    Ok(match format.unwrap_or(OutputFormat::Table) {
        OutputFormat::Table if items.is_empty() => "No instances found.\n".to_owned(),
        OutputFormat::Table => {
            let rows = items
                .iter()
                .map(|item| {
                    InstanceView::from_answer("GET /v1/instances", item)
                        .map(|i| instance_row(&i, now))
                })
                .collect::<Result<Vec<_>, _>>()?;
            table(INSTANCE_HEADERS, &rows)
        }
        other => render_value(&Value::Array(items.to_vec()), other),
    })
}

/// `hearth instances get`: the instance as YAML by default, JSON with
/// `-o json`, a one-row [`render_instances`] table with `-o table`.
pub fn render_instance(
    answer: &Value,
    format: Option<OutputFormat>,
    now: SystemTime,
) -> Result<String, CliError> {
    match format.unwrap_or(OutputFormat::Yaml) {
        OutputFormat::Table => render_instances(std::slice::from_ref(answer), format, now),
        other => Ok(render_value(answer, other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resource(kind: &str, name: &str, version: i64, spec: Value) -> Resource {
        serde_json::from_value(json!({
            "kind": kind, "name": name, "version": version,
            "created_at": "2026-11-23T03:00:00.000Z",
            "updated_at": "2026-11-23T03:00:00.000Z",
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn tables_are_borderless_and_aligned() {
        let t = table(
            &["NAME", "X"],
            &[
                vec!["a".into(), "1".into()],
                vec!["longer".into(), "22".into()],
            ],
        );
        assert_eq!(t, "NAME     X\na        1\nlonger   22\n");
    }

    #[test]
    fn pool_config_table() {
        let r = resource(
            "pool-config",
            "default",
            3,
            json!({"max_vms": 50, "max_agents_per_developer": 0, "reap_stranded_workflows": "dry_run"}),
        );
        assert_eq!(
            render_resource_list(Kind::PoolConfig, std::slice::from_ref(&r), None),
            "NAME      MAX_VMS   MAX_AGENTS_PER_DEVELOPER   REAP_STRANDED_WORKFLOWS\n\
             default   50        0                          dry_run\n"
        );
        // A single resource as a table is the same one-row table.
        assert_eq!(
            render_resource(Kind::PoolConfig, &r, Some(OutputFormat::Table)),
            render_resource_list(Kind::PoolConfig, &[r], None)
        );
    }

    #[test]
    fn workspace_table() {
        let items = [
            resource(
                "workspace",
                "web",
                1,
                json!({"environment": "dev", "repos": [
                    {"url": "https://git.example.org/org/web.git", "branch": "main"},
                    {"url": "git@example.org:org/api", "branch": "main", "name": "backend"},
                ], "min_idle": 2, "max_idle": 4}),
            ),
            resource(
                "workspace",
                "docs",
                1,
                json!({"environment": "small", "repos": [], "min_idle": 1}),
            ),
        ];
        assert_eq!(
            render_resource_list(Kind::Workspace, &items, None),
            "NAME   ENVIRONMENT   MIN_IDLE   MAX_IDLE   REPOS\n\
             web    dev           2          4          web,backend\n\
             docs   small         1          1          <none>\n"
        );
    }

    #[test]
    fn environment_table() {
        let items = [
            resource(
                "environment",
                "dev",
                7,
                json!({"driver": "qemu", "image": "ubuntu", "cpus": 2, "memory": "2Gi", "env": {"K": "***"}}),
            ),
            resource(
                "environment",
                "tiny",
                1,
                json!({"driver": "sandbox", "cpus": 1, "memory": "512Mi"}),
            ),
        ];
        assert_eq!(
            render_resource_list(Kind::Environment, &items, Some(OutputFormat::Table)),
            "NAME   DRIVER    IMAGE       CPUS   MEMORY   VERSION\n\
             dev    qemu      ubuntu      2      2Gi      7\n\
             tiny   sandbox   <default>   1      512Mi    1\n"
        );
    }

    #[test]
    fn image_table() {
        let items = [resource(
            "image",
            "ubuntu",
            2,
            json!({"driver": "qemu", "kernel": "/k"}),
        )];
        assert_eq!(
            render_resource_list(Kind::Image, &items, None),
            "NAME     DRIVER   VERSION\nubuntu   qemu     2\n"
        );
    }

    #[test]
    fn empty_lists_say_so() {
        assert_eq!(
            render_resource_list(Kind::Workspace, &[], None),
            "No workspace resources found.\n"
        );
        assert_eq!(
            render_resource_list(Kind::PoolConfig, &[], Some(OutputFormat::Table)),
            "No pool-config resources found.\n"
        );
        assert_eq!(
            render_resource_list(Kind::Image, &[], Some(OutputFormat::Yaml)),
            "[]\n"
        );
        assert_eq!(
            render_resource_list(Kind::Image, &[], Some(OutputFormat::Json)),
            "[]\n"
        );
    }

    #[test]
    fn yaml_of_one_resource_puts_version_last() {
        // The spec may even carry a version of its own: the resource's wins
        // and moves to the end.
        let env = resource(
            "environment",
            "dev",
            4,
            json!({"version": 1, "driver": "sandbox", "cpus": 2, "memory": "1Gi", "env": {"TOKEN": "***"}}),
        );
        assert_eq!(
            render_resource(Kind::Environment, &env, None),
            "driver: sandbox\ncpus: 2\nmemory: 1Gi\nenv:\n  TOKEN: '***'\nversion: 4\n"
        );
        let img = resource(
            "image",
            "base",
            9,
            json!({"driver": "sandbox", "root_dir": "/srv/base"}),
        );
        assert_eq!(
            render_resource(Kind::Image, &img, Some(OutputFormat::Yaml)),
            "driver: sandbox\nroot_dir: /srv/base\nversion: 9\n"
        );
        // Unversioned kinds show only the spec.
        let pc = resource(
            "pool-config",
            "default",
            3,
            json!({"max_vms": 50, "description": "x"}),
        );
        assert_eq!(
            render_resource(Kind::PoolConfig, &pc, None),
            "max_vms: 50\ndescription: x\n"
        );
    }

    #[test]
    fn json_of_one_resource_is_the_same_object() {
        let env = resource(
            "environment",
            "dev",
            4,
            json!({"driver": "sandbox", "cpus": 2}),
        );
        let text = render_resource(Kind::Environment, &env, Some(OutputFormat::Json));
        assert_eq!(
            text,
            "{\n  \"driver\": \"sandbox\",\n  \"cpus\": 2,\n  \"version\": 4\n}\n"
        );
    }

    #[test]
    fn yaml_and_json_of_a_list_lead_with_the_name() {
        let items = [
            resource("image", "a", 1, json!({"driver": "sandbox"})),
            resource("image", "b", 2, json!({"driver": "qemu", "kernel": "/k"})),
        ];
        assert_eq!(
            render_resource_list(Kind::Image, &items, Some(OutputFormat::Yaml)),
            "- name: a\n  driver: sandbox\n  version: 1\n- name: b\n  driver: qemu\n  kernel: /k\n  version: 2\n"
        );
        let json: Value = serde_json::from_str(&render_resource_list(
            Kind::Image,
            &items,
            Some(OutputFormat::Json),
        ))
        .unwrap();
        assert_eq!(
            json,
            json!([{"name": "a", "driver": "sandbox", "version": 1},
                   {"name": "b", "driver": "qemu", "kernel": "/k", "version": 2}])
        );
        let ws = [resource(
            "workspace",
            "web",
            5,
            json!({"environment": "dev"}),
        )];
        assert_eq!(
            render_resource_list(Kind::Workspace, &ws, Some(OutputFormat::Yaml)),
            "- name: web\n  environment: dev\n"
        );
    }

    #[test]
    fn messages() {
        assert_eq!(
            set_message(Kind::PoolConfig, "default", "created"),
            "pool-config/default created\n"
        );
        assert_eq!(
            set_message(Kind::PoolConfig, "default", "updated"),
            "pool-config/default configured\n"
        );
        assert_eq!(
            set_message(Kind::Workspace, "web", "unchanged"),
            "workspace/web unchanged\n"
        );
        assert_eq!(
            patch_message(Kind::PoolConfig, "default", "updated"),
            "pool-config/default patched\n"
        );
        assert_eq!(
            patch_message(Kind::Image, "x", "unchanged"),
            "image/x unchanged\n"
        );
        assert_eq!(
            deleted_message(Kind::Workspace, "web"),
            "workspace/web deleted\n"
        );
        assert_eq!(deleted_message("identity", "ci"), "identity/ci deleted\n");
    }

    #[test]
    fn whoami_shows_the_short_form_by_default() {
        let answer = json!({"tenant": "default", "identity": "admin", "kind": "developer",
                            "role": "operator", "permissions": ["pool-config.get"]});
        assert_eq!(
            render_whoami(&answer, None),
            "tenant: default\nidentity: admin\nkind: developer\nrole: operator\n"
        );
        assert!(render_whoami(&answer, Some(OutputFormat::Yaml)).contains("- pool-config.get"));
        let json: Value =
            serde_json::from_str(&render_whoami(&answer, Some(OutputFormat::Json))).unwrap();
        assert_eq!(json, answer);
        assert_eq!(
            render_whoami(&answer, Some(OutputFormat::Table)),
            "TENANT    IDENTITY   KIND        ROLE\ndefault   admin      developer   operator\n"
        );
    }

    #[test]
    fn records_and_item_tables() {
        let created = json!({"identity": {"name": "ci", "kind": "service", "role": "developer",
                             "created_at": "t0"}, "token": "tok", "expires_at": null});
        assert_eq!(
            render_record(&created, None),
            "identity:\n  name: ci\n  kind: service\n  role: developer\n  created_at: t0\ntoken: tok\nexpires_at: null\n"
        );
        assert_eq!(
            render_record(&created, Some(OutputFormat::Table)),
            "NAME   KIND      ROLE        CREATED_AT   TOKEN   EXPIRES_AT\n\
             ci     service   developer   t0           tok     <none>\n"
        );
        let items = vec![
            json!({"name": "admin", "kind": "developer", "role": "operator", "created_at": "t1"}),
            json!({"name": "ci", "kind": "service", "role": "developer", "created_at": "t2"}),
        ];
        assert_eq!(
            render_items(&items, IDENTITY_COLUMNS, None, "No identities found."),
            "NAME    KIND        ROLE        CREATED\n\
             admin   developer   operator    t1\n\
             ci      service     developer   t2\n"
        );
        let tenants = vec![json!({"name": "default", "created_at": "t0"})];
        assert_eq!(
            render_items(&tenants, TENANT_COLUMNS, None, "No tenants found."),
            "NAME      CREATED\ndefault   t0\n"
        );
        assert_eq!(
            render_items(&[], TENANT_COLUMNS, None, "No tenants found."),
            "No tenants found.\n"
        );
        assert_eq!(
            render_items(&tenants, TENANT_COLUMNS, Some(OutputFormat::Yaml), ""),
            "- name: default\n  created_at: t0\n"
        );
    }

    #[test]
    fn cells() {
        assert_eq!(cell(None), "<none>");
        assert_eq!(cell(Some(&Value::Null)), "<none>");
        assert_eq!(cell(Some(&json!("x"))), "x");
        assert_eq!(cell(Some(&json!(true))), "true");
        assert_eq!(cell(Some(&json!([1, 2]))), "[1,2]");
    }

    fn status_answer(max_vms: Value, workspaces: Value) -> Value {
        json!({"pool": "default", "status": "healthy",
               "vms": {"total": 12, "active": 8, "idle": 3, "booting": 1, "draining": 0, "stale": 0},
               "queued": 0,
               "configuration": {"max_vms": max_vms, "min_idle": 2, "max_idle": 5,
                                 "idle_timeout": "15m", "boot_timeout": "5m"},
               "workspaces": workspaces,
               "reaper": {"mode": "dry_run", "stranded": 0}})
    }

    fn workspace(name: &str, status: &str, failures: i64, until: Value, error: Value) -> Value {
        json!({"name": name, "status": status, "idle": 3, "booting": 1, "active": 8,
               "stale": 0, "queued": 0, "min_idle": 2, "max_idle": 5, "idle_timeout": "15m",
               "consecutive_failures": failures, "backoff_until": until, "last_error": error})
    }

    const POOL_HEADER: &str = "\
Pool: default
Status: healthy
VMs:
  Total:    12
  Active:   8   (running agents)
  Idle:     3   (warm, ready to claim)
  Booting:  1   (starting up)
  Queued:   0   (agents waiting for a VM)
Configuration:
  max_vms: 30  min_idle: 2  max_idle: 5  idle_timeout: 15m  boot_timeout: 5m
Reaper: dry_run (0 stranded workflows)
";

    #[test]
    fn pool_status_of_a_healthy_workspace() {
        let answer = status_answer(
            json!(30),
            json!([workspace("web", "healthy", 0, Value::Null, Value::Null)]),
        );
        let expected = format!(
            "{POOL_HEADER}
Workspace: web
  Status:   healthy
  Idle:     3   (min_idle 2, max_idle 5)
  Booting:  1
  Active:   8
  Stale:    0
  Queued:   0
"
        );
        assert_eq!(render_pool_status(&answer, None).unwrap(), expected);
        // A table is the same text.
        assert_eq!(
            render_pool_status(&answer, Some(OutputFormat::Table)).unwrap(),
            expected
        );
    }

    #[test]
    fn pool_status_of_a_workspace_backing_off() {
        let answer = status_answer(
            json!(30),
            json!([workspace(
                "web",
                "backing_off",
                3,
                json!("2026-11-23T03:05:00Z"),
                json!("boot timed out after 5m")
            )]),
        );
        assert_eq!(
            render_pool_status(&answer, None).unwrap(),
            format!(
                "{POOL_HEADER}
Workspace: web
  Status:   backing_off (3 consecutive failures, next boot at 2026-11-23T03:05:00Z)
  Error:    boot timed out after 5m
  Idle:     3   (min_idle 2, max_idle 5)
  Booting:  1
  Active:   8
  Stale:    0
  Queued:   0
"
            )
        );
    }

    #[test]
    fn pool_status_over_the_cap_says_so() {
        let mut answer = status_answer(json!(10), json!([]));
        answer["status"] = json!("over_cap");
        let text = render_pool_status(&answer, None).unwrap();
        assert!(
            text.starts_with(
                "Pool: default\nStatus: over_cap (12 VMs live, max_vms 10: destroying idle VMs until within the cap)\nVMs:\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn pool_status_of_a_hard_limited_workspace() {
        let answer = status_answer(
            json!(30),
            json!([workspace(
                "web",
                "hard_limited",
                5,
                Value::Null,
                Value::Null
            )]),
        );
        assert_eq!(
            render_pool_status(&answer, None).unwrap(),
            format!(
                "{POOL_HEADER}
Workspace: web
  Status:   hard_limited (5 consecutive failures; fix the configuration or run hearth pool reset --workspace web)
  Idle:     3   (min_idle 2, max_idle 5)
  Booting:  1
  Active:   8
  Stale:    0
  Queued:   0
"
            )
        );
    }

    #[test]
    fn pool_status_unconfigured_without_workspaces() {
        let mut answer = status_answer(Value::Null, json!([]));
        answer["status"] = json!("unconfigured");
        answer["configuration"]["idle_timeout"] = json!("mixed");
        answer["reaper"] = json!({"mode": "enabled", "stranded": 1});
        assert_eq!(
            render_pool_status(&answer, None).unwrap(),
            "\
Pool: default
Status: unconfigured
VMs:
  Total:    12
  Active:   8   (running agents)
  Idle:     3   (warm, ready to claim)
  Booting:  1   (starting up)
  Queued:   0   (agents waiting for a VM)
Configuration:
  max_vms: -  min_idle: 2  max_idle: 5  idle_timeout: mixed  boot_timeout: 5m
Reaper: enabled (1 stranded workflow)
"
        );
    }

    #[test]
    fn pool_status_details() {
        // Several workspaces, one failure, no back-off end, big numbers.
        let mut answer = status_answer(
            json!(30),
            json!([
                workspace("web", "backing_off", 1, Value::Null, json!("")),
                workspace("docs", "disabled", 0, Value::Null, json!("old error")),
            ]),
        );
        answer["vms"]["active"] = json!(12345);
        let text = render_pool_status(&answer, None).unwrap();
        assert!(
            text.contains("\n  Active:   12345 (running agents)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "\nWorkspace: web\n  Status:   backing_off (1 consecutive failure)\n  Idle:"
            ),
            "an empty error is no error: {text}"
        );
        assert!(
            text.contains("\nWorkspace: docs\n  Status:   disabled\n  Error:    old error\n"),
            "{text}"
        );
        assert!(!text.contains(" \n"), "no trailing blanks: {text:?}");
    }

    #[test]
    fn pool_status_with_its_last_pass() {
        let mut answer = status_answer(json!(30), json!([]));
        answer["pass"] = json!({"replica": "r1", "iteration": 12, "woken_by": "api",
            "started_at": "2026-12-01T17:00:00.000Z", "duration_ms": 3.24, "reused_snapshot": false,
            "actions": {"assign": 0, "boot": 2, "destroy": 1}, "errors": 1, "last_error": null,
            "totals": {"actions": {}, "errors": 1, "wakes": {}}, "source": "live"});
        assert_eq!(
            render_pool_status(&answer, None).unwrap(),
            format!(
                "{POOL_HEADER}Pass: 12 (replica r1, woken by api, 3.2ms): 2 boot, 1 destroy; 1 error\n"
            )
        );
        answer["pass"]["actions"] = json!({"boot": 0});
        answer["pass"]["errors"] = json!(0);
        assert!(
            render_pool_status(&answer, None)
                .unwrap()
                .ends_with("\nPass: 12 (replica r1, woken by api, 3.2ms): no actions; 0 errors\n")
        );
        // `null` before the first pass: no line.
        answer["pass"] = Value::Null;
        assert_eq!(render_pool_status(&answer, None).unwrap(), POOL_HEADER);
    }

    #[test]
    fn pool_status_as_yaml_and_json_is_the_answer() {
        let answer = status_answer(json!(30), json!([]));
        let json_text = render_pool_status(&answer, Some(OutputFormat::Json)).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&json_text).unwrap(), answer);
        let yaml = render_pool_status(&answer, Some(OutputFormat::Yaml)).unwrap();
        assert!(
            yaml.starts_with("pool: default\nstatus: healthy\nvms:\n  total: 12\n"),
            "{yaml}"
        );
        // Even an answer the text cannot show prints as is.
        let odd = json!({"pool": "default"});
        assert!(render_pool_status(&odd, Some(OutputFormat::Json)).is_ok());
        let e = render_pool_status(&odd, None).unwrap_err();
        assert_eq!(e.code, "INTERNAL");
        assert!(
            e.message
                .starts_with("unexpected answer to GET /v1/pool/status: missing field"),
            "{}",
            e.message
        );
    }

    #[test]
    fn pool_messages() {
        assert_eq!(flush_progress(false), "Flushing warm VMs...\n");
        assert_eq!(flush_progress(true), "Nuking all workflows and VMs...\n");
        let flush = |n: u64| flush_message(&json!({"flushed": n}), false).unwrap();
        assert_eq!(flush(0), "No warm VMs to flush\n");
        assert_eq!(
            flush(1),
            "Flushed 1 warm VM — pool will replenish with fresh ones\n"
        );
        assert_eq!(
            flush(4),
            "Flushed 4 warm VMs — pool will replenish with fresh ones\n"
        );
        assert_eq!(
            flush_message(&json!({"terminated": 2, "deleted": 5, "total": 7}), true).unwrap(),
            "Nuke complete (7 terminated/deleted)\n"
        );
        let e = flush_message(&json!({"flushed": 3}), true).unwrap_err();
        assert!(
            e.message
                .starts_with("unexpected answer to POST /v1/pool/flush"),
            "{e}"
        );
        assert_eq!(
            pool_up_message(&json!({"was_stopped": true})).unwrap(),
            "Pool started — replenishing to min_idle\n"
        );
        assert_eq!(
            pool_up_message(&json!({"was_stopped": false})).unwrap(),
            "Pool is already up — replenishing to min_idle\n"
        );
        assert_eq!(
            pool_reset_message("web"),
            "Workspace web: failure back-off cleared\n"
        );
    }

    fn agent(phase: &str, vm: Value) -> Value {
        json!({"id": "0190c5a4-7e1f-7a8b-9c2d-3e4f5a6b7c8d", "workspace": "web", "owner": "dana",
               "owner_kind": "developer", "parent": null, "phase": phase, "vm": vm,
               "on_idle": "sleep", "command": null, "build": "b1", "exit_code": null,
               "output": "", "error": null, "resurrections": 0,
               "created_at": "2026-11-23T03:00:00.000Z", "updated_at": "2026-11-23T03:00:00.000Z",
               "started_at": null, "finished_at": null})
    }

    fn view(answer: &Value) -> AgentView {
        AgentView::from_answer("test", answer).unwrap()
    }

    #[test]
    fn agent_lines_and_phases() {
        let queued = view(&agent("queued", Value::Null));
        assert_eq!(
            agent_line(&queued),
            "Agent 0190c5a4-7e1f-7a8b-9c2d-3e4f5a6b7c8d queued (workspace web)\n"
        );
        assert!(queued.is_starting() && !queued.is_terminal());
        let running = view(&agent("running", json!("vm-1234567890")));
        assert_eq!(
            agent_line(&running),
            "Agent 0190c5a4-7e1f-7a8b-9c2d-3e4f5a6b7c8d running (workspace web) on VM vm-1234567890\n"
        );
        assert!(!running.is_starting() && !running.is_terminal());

        let status = |phase: &str, code: Value| {
            let mut a = agent(phase, Value::Null);
            a["exit_code"] = code;
            view(&a).exit_status()
        };
        assert_eq!(status("completed", Value::Null), 0);
        assert_eq!(status("completed", json!(3)), 3);
        assert_eq!(status("failed", json!(2)), 2);
        assert_eq!(status("failed", Value::Null), 1);
        assert_eq!(status("killed", Value::Null), 1);
        assert_eq!(status("failed", json!(1_i64 << 40)), 1, "out of range");

        assert_eq!(ending_in_newline(""), "");
        assert_eq!(ending_in_newline("a"), "a\n");
        assert_eq!(ending_in_newline("a\n"), "a\n");
    }

    #[test]
    fn agent_action_messages() {
        let a = view(&agent("queued", Value::Null));
        let msg = |action| agent_action_message(action, "ID", &a);
        assert_eq!(msg(AgentAction::Kill), "agent/ID killed\n");
        assert_eq!(msg(AgentAction::Sleep), "agent/ID sleeping\n");
        assert_eq!(msg(AgentAction::Wake), "agent/ID woken (queued)\n");
        assert_eq!(
            msg(AgentAction::Resurrect),
            "agent/ID resurrected (queued)\n"
        );
        assert_eq!(
            [
                AgentAction::Kill,
                AgentAction::Sleep,
                AgentAction::Wake,
                AgentAction::Resurrect
            ]
            .map(AgentAction::verb),
            ["kill", "sleep", "wake", "resurrect"]
        );
        assert_eq!(finish_message("ID", "failed"), "agent/ID failed\n");
    }

    #[test]
    fn timestamps_and_ages() {
        let t0 = humantime::parse_rfc3339("2026-11-23T03:00:00Z").unwrap();
        assert_eq!(parse_timestamp("2026-11-23T03:00:00.000Z"), Some(t0));
        assert_eq!(parse_timestamp("2026-11-23T04:00:00+01:00"), Some(t0));
        assert_eq!(
            parse_timestamp("2026-11-23T01:30:00.5-01:30"),
            Some(t0 + Duration::from_millis(500))
        );
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(parse_timestamp("2026-11-23T04:00:00+1:000"), None);

        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let created = "2026-11-23T03:00:00Z";
        assert_eq!(age(created, at(0)), "0s");
        assert_eq!(age(created, at(5)), "5s");
        assert_eq!(age(created, at(59)), "59s");
        assert_eq!(age(created, at(60)), "1m");
        assert_eq!(age(created, at(3 * 60 + 59)), "3m");
        assert_eq!(age(created, at(2 * 3600 + 1)), "2h");
        assert_eq!(age(created, at(23 * 3600 + 3599)), "23h");
        assert_eq!(age(created, at(4 * 86_400 + 5)), "4d");
        assert_eq!(
            age(created, t0 - Duration::from_secs(10)),
            "0s",
            "clock skew"
        );
        assert_eq!(age("soon", t0), "<unknown>");
    }

    #[test]
    fn agents_table() {
        let now = humantime::parse_rfc3339("2026-11-23T03:03:10Z").unwrap();
        let mut second = agent("queued", Value::Null);
        second["id"] = json!("0190c5a4-0000-7000-8000-000000000002");
        second["owner"] = json!("ci");
        second["created_at"] = json!("2026-11-23T03:03:05Z");
        let items = vec![
            agent("running", json!("4f9a1c2e-1111-4222-8333-944455556666")),
            second,
        ];
        assert_eq!(
            render_agents(&items, None, now),
            "ID                                     PHASE     WORKSPACE   OWNER   VM         AGE\n\
             0190c5a4-7e1f-7a8b-9c2d-3e4f5a6b7c8d   running   web         dana    4f9a1c2e   3m\n\
             0190c5a4-0000-7000-8000-000000000002   queued    web         ci      <none>     5s\n"
        );
        assert_eq!(render_agents(&[], None, now), "No agents found.\n");
        assert_eq!(render_agents(&[], Some(OutputFormat::Json), now), "[]\n");
        let json_text = render_agents(&items, Some(OutputFormat::Json), now);
        assert_eq!(
            serde_json::from_str::<Value>(&json_text).unwrap(),
            Value::Array(items.clone())
        );
        // One agent: YAML of the answer by default, a one-row table on request.
        let yaml = render_agent(&items[0], None, now);
        assert!(
            yaml.starts_with(
                "id: 0190c5a4-7e1f-7a8b-9c2d-3e4f5a6b7c8d\nworkspace: web\nowner: dana\n"
            ),
            "{yaml}"
        );
        assert!(
            yaml.contains("\nvm: 4f9a1c2e-1111-4222-8333-944455556666\n"),
            "{yaml}"
        );
        assert_eq!(
            render_agent(&items[0], Some(OutputFormat::Table), now),
            render_agents(&items[..1], None, now)
        );
        assert_eq!(short_id(Some(&json!("abc"))), "abc");
        assert_eq!(short_id(Some(&json!(""))), "<none>");
        assert_eq!(short_id(None), "<none>");
    }

    #[test]
    fn builds_table() {
        let items = vec![
            json!({"id": "b-2026-11-01", "first_seen": "2026-11-01T00:00:00Z",
                   "retired_at": "2026-11-20T00:00:00Z", "current": false}),
            json!({"id": "b-2026-11-20", "first_seen": "2026-11-20T00:00:00Z",
                   "retired_at": null, "current": true}),
            json!({"id": "b-2026-11-21", "first_seen": "2026-11-21T00:00:00Z",
                   "retired_at": null, "current": false}),
        ];
        assert_eq!(
            render_builds(&items, None),
            "BUILD          FIRST_SEEN             RETIRED                CURRENT\n\
             b-2026-11-01   2026-11-01T00:00:00Z   2026-11-20T00:00:00Z\n\
             b-2026-11-20   2026-11-20T00:00:00Z   -                      *\n\
             b-2026-11-21   2026-11-21T00:00:00Z   -\n"
        );
        assert_eq!(render_builds(&[], None), "No builds found.\n");
        assert_eq!(
            render_builds(&items[1..2], Some(OutputFormat::Yaml)),
            "- id: b-2026-11-20\n  first_seen: 2026-11-20T00:00:00Z\n  retired_at: null\n  current: true\n"
        );
        assert_eq!(retired_message("b1"), "build/b1 retired\n");
    }

    #[test]
    fn answers_or_messages() {
        let answer = json!({"workspace": "web"});
        assert_eq!(answer_or_message(&answer, None, "msg\n".into()), "msg\n");
        assert_eq!(
            answer_or_message(&answer, Some(OutputFormat::Table), "msg\n".into()),
            "msg\n"
        );
        assert_eq!(
            answer_or_message(&answer, Some(OutputFormat::Yaml), "msg\n".into()),
            "workspace: web\n"
        );
    }

    fn instance_answer(status: &str, summary: Value, steps: Value) -> Value {
        json!({"id": "0190c5a4-aaaa-7000-8000-000000000001", "workspace": "web",
               "vm": "0190c5a4-bbbb-7000-8000-000000000002", "test": true, "status": status,
               "summary": summary, "steps": steps,
               "createdAt": "2026-11-23T03:00:00.000Z", "updatedAt": "2026-11-23T03:00:05.000Z",
               "finishedAt": null})
    }

    fn step_answer(name: &str, status: &str, started: Value, ms: Value) -> Value {
        json!({"name": name, "status": status, "output": "", "startedAt": rfc3339_at(started),
               "durationMs": ms})
    }

    fn step_view(step: Value) -> StepView {
        serde_json::from_value(step).unwrap()
    }

    fn instance_view(answer: &Value) -> InstanceView {
        InstanceView::from_answer("test", answer).unwrap()
    }

    #[test]
    fn durations() {
        let ms = |n: u64| format_duration(Duration::from_millis(n));
        assert_eq!(ms(0), "0s");
        assert_eq!(ms(4), "0s");
        assert_eq!(ms(5), "0.01s");
        assert_eq!(ms(10), "0.01s");
        assert_eq!(ms(300), "0.3s");
        assert_eq!(ms(340), "0.34s");
        assert_eq!(ms(994), "0.99s");
        assert_eq!(ms(995), "1s", "rounds up into the next form");
        assert_eq!(ms(1200), "1.2s");
        assert_eq!(ms(1249), "1.2s");
        assert_eq!(ms(1250), "1.3s");
        assert_eq!(ms(10_000), "10s");
        assert_eq!(ms(10_050), "10.1s");
        assert_eq!(ms(59_949), "59.9s");
        assert_eq!(ms(59_950), "1m00s");
        assert_eq!(ms(123_000), "2m03s");
        assert_eq!(ms(123_499), "2m03s");
        assert_eq!(ms(123_500), "2m04s");
        assert_eq!(ms(3_599_499), "59m59s");
        assert_eq!(ms(3_599_500), "1h00m00s");
        assert_eq!(ms(3_723_000), "1h02m03s");
        assert_eq!(ms(100 * 3600 * 1000), "100h00m00s");
    }

    #[test]
    fn step_lines() {
        let line = |step: Value, width, now| step_line(&step_view(step), width, "⠹", now);
        let mut clone = step_answer("clone_repo", "succeeded", json!(1000), json!(1200));
        clone["repo"] = json!("myrepo");
        assert_eq!(line(clone.clone(), 0, 0), "✓ clone_repo (myrepo) 1.2s");
        assert_eq!(line(clone, 21, 0), "✓ clone_repo (myrepo)   1.2s");
        assert_eq!(
            line(
                step_answer("create_vm", "succeeded", json!(1000), json!(10)),
                0,
                0
            ),
            "✓ create_vm 0.01s"
        );
        assert_eq!(
            line(
                step_answer("warm_pool_setup", "failed", json!(1000), json!(300)),
                17,
                0
            ),
            "✗ warm_pool_setup   0.3s"
        );
        // Running: the spinner frame given and the time since it started.
        assert_eq!(
            line(
                step_answer("project_setup", "running", json!(1000), Value::Null),
                0,
                3400
            ),
            "⠹ project_setup 2.4s"
        );
        assert_eq!(
            line(
                step_answer("project_setup", "running", json!(5000), Value::Null),
                0,
                3400
            ),
            "⠹ project_setup 0s",
            "a server clock ahead of ours counts as just started"
        );
        assert_eq!(
            line(
                step_answer("ensure_server", "running", Value::Null, Value::Null),
                20,
                0
            ),
            "⠹ ensure_server",
            "no start time, no duration, no trailing blanks"
        );
        // Pending: the label alone, even when padded.
        assert_eq!(
            line(
                step_answer("project_setup", "pending", Value::Null, Value::Null),
                20,
                0
            ),
            "· project_setup"
        );
        // A finished step without a duration, an unknown status.
        assert_eq!(
            line(
                step_answer("init_repo", "succeeded", Value::Null, Value::Null),
                0,
                0
            ),
            "✓ init_repo"
        );
        assert_eq!(
            line(
                step_answer("init_repo", "skipped", Value::Null, json!(1)),
                0,
                0
            ),
            "? init_repo 0s"
        );
        assert_eq!(
            step_line(
                &step_view(step_answer("x", "running", Value::Null, Value::Null)),
                0,
                STEP_RUNNING,
                0
            ),
            "▸ x"
        );
    }

    fn failed_run() -> Value {
        let mut failed = step_answer("warm_pool_setup", "failed", json!(3000), json!(300));
        failed["output"] = json!(
            (1..=25)
                .map(|i| format!("line {i}"))
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        );
        failed["error"] = json!("deps exited with 2");
        instance_answer(
            "failed",
            json!({"success": false, "failedStep": "warm_pool_setup",
                   "error": "setup command deps exited with 2"}),
            json!([
                step_answer("create_vm", "succeeded", json!(1000), json!(10)),
                step_answer("project_setup", "succeeded", json!(1010), json!(1990)),
                failed,
                step_answer("done_later", "pending", Value::Null, Value::Null),
            ]),
        )
    }

    #[test]
    fn outcome_of_a_ready_run() {
        let answer = instance_answer(
            "ready",
            json!({"success": true}),
            json!([
                step_answer("create_vm", "succeeded", json!(1000), json!(10)),
                step_answer("clone_repo", "succeeded", json!(1010), json!(1200)),
                step_answer("warm_pool_setup", "succeeded", json!(2210), json!(61_000)),
            ]),
        );
        assert_eq!(
            instance_outcome(&instance_view(&answer)),
            "Instance 0190c5a4-aaaa-7000-8000-000000000001 ready in 1m02s\n"
        );
        // No step durations: from the timestamps; neither: no total.
        let mut answer = instance_answer("ready", json!({"success": true}), json!([]));
        answer["finishedAt"] = json!("2026-11-23T03:00:04.250Z");
        assert_eq!(
            instance_outcome(&instance_view(&answer)),
            "Instance 0190c5a4-aaaa-7000-8000-000000000001 ready in 4.3s\n"
        );
        answer["finishedAt"] = Value::Null;
        assert_eq!(
            instance_outcome(&instance_view(&answer)),
            "Instance 0190c5a4-aaaa-7000-8000-000000000001 ready\n"
        );
    }

    #[test]
    fn outcome_of_a_failed_run_shows_the_output_tail() {
        let tail: String = (6..=25).map(|i| format!("  line {i}\n")).collect();
        assert_eq!(
            instance_outcome(&instance_view(&failed_run())),
            format!(
                "Instance 0190c5a4-aaaa-7000-8000-000000000001 failed at warm_pool_setup: setup command deps exited with 2\n{tail}"
            )
        );
        // A per-repo step is named with its repo; without a summary, the
        // failed step's own error; an empty output adds nothing.
        let mut clone = step_answer("clone_repo", "failed", json!(1000), json!(50));
        clone["repo"] = json!("myrepo");
        clone["error"] = json!("repository not found");
        clone["output"] = json!("\n");
        let answer = instance_answer("failed", Value::Null, json!([clone]));
        assert_eq!(
            instance_outcome(&instance_view(&answer)),
            "Instance 0190c5a4-aaaa-7000-8000-000000000001 failed at clone_repo (myrepo): repository not found\n"
        );
        // Nothing known but the status.
        let answer = instance_answer("failed", json!({"success": false}), json!([]));
        assert_eq!(
            instance_outcome(&instance_view(&answer)),
            "Instance 0190c5a4-aaaa-7000-8000-000000000001 failed\n"
        );
        // Still running: the status.
        let answer = instance_answer("provisioning", Value::Null, json!([]));
        assert_eq!(
            instance_outcome(&instance_view(&answer)),
            "Instance 0190c5a4-aaaa-7000-8000-000000000001 provisioning\n"
        );
    }

    #[test]
    fn output_tails() {
        assert_eq!(indented_tail("", 20), "");
        assert_eq!(indented_tail(" \n\n", 20), "");
        assert_eq!(indented_tail("a\n\nb  \r\nc", 20), "  a\n\n  b\n  c\n");
        assert_eq!(indented_tail("a\nb\nc\n", 2), "  b\n  c\n");
    }

    #[test]
    fn instance_steps_view() {
        let mut answer = failed_run();
        answer["steps"][0]["output"] = json!("created vm\n");
        answer["steps"][2]["output"] = json!("make: *** [deps] Error 2");
        assert_eq!(
            render_instance_steps(&instance_view(&answer), 0),
            "✓ create_vm 0.01s\n  created vm\n✓ project_setup 2s\n✗ warm_pool_setup 0.3s\n  make: *** [deps] Error 2\n· done_later\n\
             Instance 0190c5a4-aaaa-7000-8000-000000000001 failed at warm_pool_setup: setup command deps exited with 2\n"
        );
        let running = instance_answer(
            "provisioning",
            Value::Null,
            json!([step_answer(
                "create_vm",
                "running",
                json!(1000),
                Value::Null
            )]),
        );
        assert_eq!(
            render_instance_steps(&instance_view(&running), 2500),
            "▸ create_vm 1.5s\nInstance 0190c5a4-aaaa-7000-8000-000000000001 provisioning\n"
        );
    }

    #[test]
    fn instances_table() {
        let now = humantime::parse_rfc3339("2026-11-23T03:05:00Z").unwrap();
        let mut running = instance_answer(
            "provisioning",
            Value::Null,
            json!([step_answer("create_vm", "succeeded", json!(1), json!(10))]),
        );
        running["id"] = json!("0190c5a4-aaaa-7000-8000-000000000003");
        running["test"] = json!(false);
        running["workspace"] = json!("docs");
        running["createdAt"] = json!("2026-11-23T03:04:55Z");
        let items = vec![running, failed_run()];
        assert_eq!(
            render_instances(&items, None, now).unwrap(),
            "ID                                     WORKSPACE   STATUS         TEST    FAILED_STEP       DURATION   AGE\n\
             0190c5a4-aaaa-7000-8000-000000000003   docs        provisioning   false   -                 -          5s\n\
             0190c5a4-aaaa-7000-8000-000000000001   web         failed         true    warm_pool_setup   2.3s       5m\n"
        );
        assert_eq!(
            render_instances(&[], None, now).unwrap(),
            "No instances found.\n"
        );
        assert_eq!(
            render_instances(&[], Some(OutputFormat::Json), now).unwrap(),
            "[]\n"
        );
        let yaml = render_instances(&items[1..], Some(OutputFormat::Yaml), now).unwrap();
        assert!(
            yaml.starts_with("- id: 0190c5a4-aaaa-7000-8000-000000000001\n  workspace: web\n"),
            "{yaml}"
        );
        // One instance: YAML of the answer, camelCase as sent.
        let yaml = render_instance(&items[1], None, now).unwrap();
        assert!(
            yaml.contains("\nsummary:\n  success: false\n  failedStep: warm_pool_setup\n"),
            "{yaml}"
        );
        assert_eq!(
            render_instance(&items[1], Some(OutputFormat::Table), now).unwrap(),
            render_instances(&items[1..], None, now).unwrap()
        );
        let e = render_instances(&[json!({"id": "x"})], None, now).unwrap_err();
        assert!(
            e.message
                .starts_with("unexpected answer to GET /v1/instances: missing field"),
            "{e}"
        );
    }

    #[test]
    fn warm_pool_settings() {
        let answer = json!({"enabled": true, "targetSize": 2, "branch": null,
                            "setupCommands": [{"name": "deps", "command": "make deps"},
                                              {"name": "warm", "command": "make warm"}],
                            "maxIdle": 2, "status": {"ready": 1, "provisioning": 1, "failed": 3}});
        assert_eq!(
            render_warm_pool(&answer, None),
            "enabled: true\ntargetSize: 2\nbranch: null\nsetupCommands:\n- name: deps\n  command: make deps\n- name: warm\n  command: make warm\nmaxIdle: 2\n\
             status:\n  ready: 1\n  provisioning: 1\n  failed: 3\n"
        );
        assert_eq!(
            serde_json::from_str::<Value>(&render_warm_pool(&answer, Some(OutputFormat::Json)))
                .unwrap(),
            answer
        );
        assert_eq!(
            render_warm_pool(&answer, Some(OutputFormat::Table)),
            "ENABLED   TARGET_SIZE   MAX_IDLE   BRANCH   SETUP_COMMANDS   READY   PROVISIONING   FAILED\n\
             true      2             2          <none>   deps,warm        1       1              3\n"
        );
        let bare = json!({"enabled": false, "targetSize": 0, "branch": "main",
                          "setupCommands": [], "maxIdle": 0,
                          "status": {"ready": 0, "provisioning": 0, "failed": 0}});
        assert_eq!(
            render_warm_pool(&bare, Some(OutputFormat::Table)),
            "ENABLED   TARGET_SIZE   MAX_IDLE   BRANCH   SETUP_COMMANDS   READY   PROVISIONING   FAILED\n\
             false     0             0          main     <none>           0       0              0\n"
        );
        assert_eq!(warm_pool_configured("web"), "warm-pool/web configured\n");
        assert_eq!(
            test_started_message("i-1"),
            "Test boot started: instance i-1\n"
        );
    }
}
