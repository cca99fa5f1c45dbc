//! Everything the CLI prints on success, as pure functions of the server's
//! answers: the wire shapes of those answers, YAML and JSON rendering, the
//! kubectl-style tables (borderless, uppercase headers) and the one-line
//! `kind/name verb` messages.

use comfy_table::{Table, presets::NOTHING};
use hearth_core::resource::{Kind, Repo};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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

/// The columns of `hearth tenant list`.
pub const TENANT_COLUMNS: &[(&str, &str)] = &[("NAME", "name"), ("CREATED", "created_at")];

/// The columns of `hearth identity list`.
pub const IDENTITY_COLUMNS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("KIND", "kind"),
    ("ROLE", "role"),
    ("CREATED", "created_at"),
];

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
}
