//! The OpenAPI document, generated from the handlers' annotations. A copy is
//! kept in the repository (`openapi.json`) and a test checks they match.

use axum::Json;
use serde_json::{Value, json};
use std::str::FromStr;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::resources::{environment, image, pool_config, workspace};
use crate::{
    agents, auth, builds, events, fleet, identities, images, nodes, pool, tenants, warm_pool,
    webhooks,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "hearth", description = "A warm VM pool for AI coding-agent sandboxes."),
    paths(
        crate::health,
        auth::whoami,
        pool_config::list, pool_config::get_one, pool_config::put, pool_config::patch, pool_config::delete,
        workspace::list, workspace::get_one, workspace::put, workspace::patch, workspace::delete,
        environment::list, environment::get_one, environment::put, environment::patch, environment::delete,
        image::list, image::get_one, image::put, image::patch, image::delete,
        images::bake, images::list, images::get_one, images::register,
        identities::list, identities::create, identities::remove, identities::create_token,
        tenants::list, tenants::create,
        agents::spawn, agents::list, agents::get_one, agents::kill, agents::sleep, agents::wake,
        agents::resurrect, agents::finish, agents::idle, agents::exec,
        pool::status, pool::vms, pool::flush, pool::up, pool::reset,
        builds::list, builds::retire,
        warm_pool::get_settings, warm_pool::patch_settings, warm_pool::test, warm_pool::get_workspace_instance,
        warm_pool::list_workspace_instances, warm_pool::list_instances, warm_pool::get_instance,
        nodes::list, nodes::get_one, nodes::cordon, nodes::uncordon, nodes::drain, nodes::artifact,
        fleet::join, fleet::heartbeat,
        // ---- dashboard (H4)
        crate::ui::sign_in, crate::ui::current, crate::ui::sign_out,

        // ---- webhooks
        webhooks::create, webhooks::list, webhooks::get_one, webhooks::remove, webhooks::deliveries,

        // ---- events (H2)
        events::list, events::stream,

        // ---- metrics (H1)
        crate::metrics::scrape,
    ),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("hth_<id>_<secret>")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "node",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("hnc_<node id>_<hmac>")
                    .build(),
            ),
        );
    }
}

/// The document as pretty JSON (what `/openapi.json` serves).
pub fn document() -> String {
    serde_json::to_string_pretty(&exact()).expect("the OpenAPI document serializes")
}

/// Serves the OpenAPI document.
pub async fn serve() -> Json<Value> {
    Json(exact())
}

/// The generated document made exact where the annotations cannot say it
/// once for all operations: the answers the edge layers and the extractors
/// give on every route, the name and value rules the handlers and
/// `hearth_core` enforce, and that no string may hold a NUL.
fn exact() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes");
    refine(&mut doc);
    doc
}

/// A resource, identity or tenant name (`hearth_core::resource::validate_name`).
const NAME: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";
/// Any string without NUL (refused everywhere, see `hearth_core::nul`).
const NO_NUL: &str = "^[^\\u0000]*$";
/// A positive duration such as `90s`, `15m`, `1h30m` or `2d`: terms of a
/// number and a unit, one of them not zero (a term's number has at most 9
/// significant digits, so no sum overflows).
const DURATION: &str = "^(0*[0-9]{1,9}[smhd])*0*[1-9][0-9]{0,8}[smhd](0*[0-9]{1,9}[smhd])*$";

fn error_answer(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

/// Sets `key` of the object at `pointer` (which must exist).
fn set(doc: &mut Value, pointer: &str, key: &str, value: Value) {
    let target = doc
        .pointer_mut(pointer)
        .unwrap_or_else(|| panic!("the OpenAPI document has no {pointer}"));
    target[key] = value;
}

fn refine(doc: &mut Value) {
    // The answers every operation can give.
    let paths = doc["paths"].as_object_mut().expect("paths");
    for (path, item) in paths.iter_mut() {
        for op in item.as_object_mut().expect("path item").values_mut() {
            let secured = op.get("security").is_some();
            let has_body = op.get("requestBody").is_some();
            let has_params = path.contains('{') || op.get("parameters").is_some();
            let responses = op["responses"].as_object_mut().expect("responses");
            let mut add = |status: &str, description: &str| {
                responses
                    .entry(status)
                    .or_insert_with(|| error_answer(description));
            };
            if has_params || has_body {
                add(
                    "400",
                    "Malformed input: a bad path, query or body, or a NUL character",
                );
            }
            if secured {
                add("401", "No token, or an unknown or expired one");
                add("403", "The caller's role lacks the permission");
            }
            if path.contains('{') {
                add("404", "Not found");
            }
            if has_body {
                add("413", "The body exceeds 1 MiB");
            }
            // Identity changes can be refused for the state they meet (the
            // last identity that can manage identities, a role above the
            // caller's).
            if path.starts_with("/v1/identities/") {
                add("409", "Refused for the state it meets");
            }
            add("500", "Internal error (the cause is in the server log)");
            // Path and query strings: names follow the name rule; no NUL.
            if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
                for param in params {
                    let name = param["name"].as_str().unwrap_or_default().to_owned();
                    let in_path = param["in"] == "path";
                    let schema = &mut param["schema"];
                    if in_path && (name == "name" || name == "ws") {
                        if path.starts_with("/v1/pool-config/") {
                            *schema = json!({"type": "string", "enum": [hearth_core::resource::POOL_CONFIG_NAME]});
                        } else {
                            schema["pattern"] = json!(NAME);
                        }
                    }
                }
            }
        }
    }
    let agent_phases = json!([
        "queued",
        "provisioning",
        "running",
        "idle",
        "sleeping",
        "completed",
        "failed",
        "killed"
    ]);
    set(
        doc,
        "/paths/~1v1~1agents/get/parameters/1",
        "schema",
        json!({"type": ["string", "null"], "enum": agent_phases}),
    );
    for path in [
        "/paths/~1v1~1instances/get",
        "/paths/~1v1~1workspaces~1{name}~1warm-pool~1instances/get",
    ] {
        let params = doc
            .pointer_mut(&format!("{path}/parameters"))
            .and_then(Value::as_array_mut)
            .expect("instance query");
        for param in params {
            if param["name"] == "status" {
                param["schema"] = json!({"type": ["string", "null"], "enum": ["provisioning", "ready", "failed"]});
            }
            // `limit` stays any number: the store clamps it to 1..=1000.
        }
    }
    // A header is text: `Last-Event-ID` is an id or absent, never `null`.
    let stream_params = doc
        .pointer_mut("/paths/~1v1~1events~1stream/get/parameters")
        .and_then(Value::as_array_mut)
        .expect("event stream parameters");
    for param in stream_params {
        if param["name"] == "Last-Event-ID" {
            param["schema"] = json!({"type": "integer", "format": "int64", "minimum": 0});
        }
    }
    let schemas = "/components/schemas";
    // Names.
    for (schema, field) in [
        ("CreateIdentity", "name"),
        ("CreateTenant", "name"),
        ("CreateTenant", "admin"),
        ("Workspace", "environment"),
    ] {
        set(
            doc,
            &format!("{schemas}/{schema}/properties/{field}"),
            "pattern",
            json!(NAME),
        );
    }
    set(
        doc,
        &format!("{schemas}/Environment/properties/image"),
        "pattern",
        json!(NAME),
    );
    // Enums.
    set(
        doc,
        &format!("{schemas}/SpawnRequest/properties/on_idle"),
        "enum",
        json!(["sleep", "terminate", "keep-alive", null]),
    );
    set(
        doc,
        &format!("{schemas}/FinishRequest/properties/status"),
        "enum",
        json!(["completed", "failed"]),
    );
    // Ranges and formats.
    set(
        doc,
        &format!("{schemas}/PoolConfig/properties/max_vms"),
        "minimum",
        json!(1),
    );
    set(
        doc,
        &format!("{schemas}/PoolConfig/properties/max_agents_per_developer"),
        "minimum",
        json!(0),
    );
    set(
        doc,
        &format!("{schemas}/Environment/properties/cpus"),
        "minimum",
        json!(1),
    );
    set(
        doc,
        &format!("{schemas}/Environment/properties/cpus"),
        "maximum",
        json!(64),
    );
    set(
        doc,
        &format!("{schemas}/Environment/properties/disk"),
        "pattern",
        json!(
            "^(0*(6[4-9]|[7-9][0-9]|[1-9][0-9]{2,6}|1[0-5][0-9]{6}|16[0-6][0-9]{5}|167[0-6][0-9]{4}|1677[0-6][0-9]{3}|16777[01][0-9]{2}|1677720[0-9]|1677721[0-6])Mi|0*([1-9][0-9]{0,3}|1[0-5][0-9]{3}|16[0-2][0-9]{2}|163[0-7][0-9]|1638[0-4])Gi)$"
        ),
    );
    set(
        doc,
        &format!("{schemas}/Environment/properties/memory"),
        "pattern",
        json!(
            "^(0*(6[4-9]|[7-9][0-9]|[1-9][0-9]{2,5}|10[0-3][0-9]{4}|104[0-7][0-9]{3}|1048[0-4][0-9]{2}|10485[0-6][0-9]|1048576)Mi|0*([1-9]|[1-9][0-9]|[1-9][0-9]{2}|10[01][0-9]|102[0-4])Gi)$"
        ),
    );
    set(
        doc,
        &format!("{schemas}/Environment/properties/idle_timeout"),
        "pattern",
        json!(DURATION),
    );
    set(
        doc,
        &format!("{schemas}/Environment/properties/env"),
        "propertyNames",
        json!({"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}),
    );
    set(
        doc,
        &format!("{schemas}/Workspace/properties/min_idle"),
        "minimum",
        json!(0),
    );
    set(
        doc,
        &format!("{schemas}/WarmPoolPatch/properties/targetSize"),
        "minimum",
        json!(0),
    );
    // A Debian package name (`hearth_core::resource::valid_package_name`).
    set(
        doc,
        &format!("{schemas}/Image/properties/kernel_package"),
        "pattern",
        json!("^[a-z0-9][a-z0-9+.-]{1,99}$"),
    );
    // A folder under the image store's prebuilt/ (`images::confine`).
    set(
        doc,
        &format!("{schemas}/RegisterPrebuilt/properties/path"),
        "pattern",
        json!("^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$"),
    );
    set(
        doc,
        &format!("{schemas}/RegisterPrebuilt/properties/tenant"),
        "pattern",
        json!(NAME),
    );
    for schema in ["CreateIdentity", "CreateToken"] {
        set(
            doc,
            &format!("{schemas}/{schema}/properties/expires_in"),
            "pattern",
            json!(DURATION),
        );
    }
    set(
        doc,
        &format!("{schemas}/ExecBody/properties/timeout"),
        "pattern",
        json!(DURATION),
    );
    // Texts that must hold more than blanks.
    // Rust's `trim` drops Unicode White_Space; spelled out, since `\\s`
    // differs between regex dialects (ECMA's lacks U+0085).
    const WS: &str = "\\t\\n\\u000B\\f\\r \\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000";
    let not_blank = json!(format!("^[^\\u0000]*[^{WS}\\u0000][^\\u0000]*$"));
    for (schema, field) in [
        ("Repo", "url"),
        ("Repo", "branch"),
        ("SetupCommand", "name"),
        ("SetupCommand", "command"),
        ("WarmPool", "branch"),
        ("WarmPoolPatch", "branch"),
    ] {
        set(
            doc,
            &format!("{schemas}/{schema}/properties/{field}"),
            "pattern",
            not_blank.clone(),
        );
    }
    // A repo's folder: letters, digits, '.', '_', '-', but not `.` or `..`.
    set(
        doc,
        &format!("{schemas}/Repo/properties/name"),
        "pattern",
        json!(
            "^([A-Za-z0-9_-][A-Za-z0-9._-]*|\\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\\.\\.[A-Za-z0-9._-]+)$"
        ),
    );
    // `nuke` acts on the whole tenant: not with a workspace.
    set(doc, schemas, "FlushRequest", {
        let mut flush = doc["components"]["schemas"]["FlushRequest"].clone();
        flush["not"] = json!({"required": ["workspace", "nuke"],
            "properties": {"nuke": {"const": true}, "workspace": {"type": "string"}}});
        flush
    });
    // Only qemu images are baked: a sandbox image has no rootfs recipe.
    set(
        doc,
        &format!("{schemas}/Image"),
        "allOf",
        json!([
            {"if": {"properties": {"driver": {"const": "sandbox"}}},
             "then": {"properties": {"rootfs": {"enum": ["minimal", null]}}}}
        ]),
    );
    set(
        doc,
        &format!("{schemas}/Workspace/properties/max_idle"),
        "minimum",
        json!(0),
    );
    {
        let mut merge = doc["components"]["schemas"]["WarmPool"].clone();
        for property in merge["properties"]
            .as_object_mut()
            .expect("WarmPool")
            .values_mut()
        {
            *property = json!({"anyOf": [property.clone(), {"type": "null"}]});
        }
        merge["additionalProperties"] = json!({"type": "null"});
        merge["propertyNames"] = json!({"pattern": NO_NUL});
        doc["components"]["schemas"]["WarmPoolMerge"] = merge;
    }
    // An environment's or image's `version` is shown on output and ignored
    // on input (an integer, or null), so a document read back can be
    // written back as it is.
    // An image's `artifact` is the server's: shown on output, ignored on
    // input whatever mapping it holds (a document read back can be written
    // back).
    doc["components"]["schemas"]["Image"]["properties"]["artifact"] = json!({
        "type": ["object", "null"],
        "description": "Server-owned: where the image's files come from (shown on output, ignored on input)."
    });
    // A prebuilt image is for qemu or sandbox (absent: the stored image's
    // driver, or qemu).
    doc["components"]["schemas"]["RegisterPrebuilt"]["properties"]["driver"] = json!({
        "enum": ["qemu", "sandbox", null],
        "description": "The image's driver when it does not exist yet (default qemu)."
    });
    // `null` is the default, as for every optional field.
    for field in ["kernel_package", "rootfs"] {
        let schema = doc["components"]["schemas"]["Image"]["properties"][field].clone();
        doc["components"]["schemas"]["Image"]["properties"][field] =
            json!({"anyOf": [schema, {"type": "null"}]});
    }
    // Allowed host ports are TCP ports, each once, at most 64, and only with
    // `network: egress` (absent = egress).
    doc["components"]["schemas"]["Environment"]["properties"]["allow_host_ports"] = json!({
        "type": ["array", "null"],
        "items": {"type": "integer", "minimum": 1, "maximum": 65535},
        "uniqueItems": true,
        "maxItems": hearth_core::resource::MAX_ALLOWED_HOST_PORTS,
        "description": "Host TCP ports the VM may reach through its gateway (network: egress only; operators only)."
    });
    // A qemu guest never gets the host's network.
    doc["components"]["schemas"]["Environment"]["allOf"] = json!([
        {"if": {"required": ["network"], "properties": {"network": {"enum": ["none", "isolated", "host"]}}},
         "then": {"properties": {"allow_host_ports": {"anyOf": [{"type": "null"}, {"maxItems": 0}]}}}},
        {"if": {"required": ["driver"], "properties": {"driver": {"const": "qemu"}}},
         "then": {"properties": {"network": {"not": {"const": "host"}}}}}
    ]);

    for schema in ["Environment", "Image"] {
        doc["components"]["schemas"][schema]["properties"]["version"] = json!({
            "type": ["integer", "null"],
            "format": "int64",
            "description": "Shown on output, ignored on input."
        });
    }
    // Merge patches: the kind's fields, each optional; `null` removes an
    // optional field (back to its default), never a required one.
    for (tag, schema) in [
        ("pool-config", "PoolConfig"),
        ("workspace", "Workspace"),
        ("environment", "Environment"),
        ("image", "Image"),
    ] {
        let full = doc["components"]["schemas"][schema].clone();
        let required: Vec<Value> = full
            .get("required")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut properties = full["properties"].clone();
        for (field, property) in properties.as_object_mut().expect("properties") {
            // Nested objects are merged too: `null` removes one of their keys.
            if field == "env" {
                property["additionalProperties"] =
                    json!({"type": ["string", "null"], "pattern": NO_NUL});
            }
            if field == "warm_pool" {
                *property = json!({"$ref": "#/components/schemas/WarmPoolMerge"});
            }
            if !required.contains(&json!(field)) {
                *property = json!({"anyOf": [property.clone(), {"type": "null"}]});
            }
        }
        // An unknown field is refused, unless it is `null` (removing what
        // is not there changes nothing).
        let mut patch = json!({"type": "object", "properties": properties, "additionalProperties": {"type": "null"},
            "propertyNames": {"pattern": NO_NUL}});
        // A sandbox image has no rootfs recipe, as far as a patch alone
        // shows it (the merged image mostly takes its driver from the
        // stored one, so only a patch that names the driver is bound).
        if schema == "Image" {
            patch["allOf"] = json!([
                {"if": {"required": ["driver"], "properties": {"driver": {"const": "sandbox"}}},
                 "then": {"properties": {"rootfs": {"enum": ["minimal", null]}}}}
            ]);
        }
        let name = format!("{schema}Patch");
        doc["components"]["schemas"][&name] = patch;
        let path = format!(
            "/v1/{}/{{name}}",
            hearth_core::resource::Kind::from_str(tag)
                .expect("kind")
                .path_segment()
        );
        let body = &mut doc["paths"][&path]["patch"]["requestBody"];
        body["required"] = json!(false);
        body["content"]["application/merge-patch+json"]["schema"] =
            json!({"$ref": format!("#/components/schemas/{name}")});
    }
    // Bodies with no required field may be left out (an empty body is `{}`).
    let paths = doc["paths"].as_object_mut().expect("paths");
    for item in paths.values_mut() {
        for op in item.as_object_mut().expect("path item").values_mut() {
            if let Some(body) = op.get_mut("requestBody")
                && let Some(reference) = body
                    .pointer("/content/application~1json/schema/$ref")
                    .and_then(Value::as_str)
                && ["FlushRequest", "CreateToken", "WarmPoolPatch"]
                    .iter()
                    .any(|s| reference.ends_with(s))
            {
                body["required"] = json!(false);
            }
        }
    }
    // Links, so that a client (and the fuzzer's stateful phase) can follow
    // a new agent or instance to the operations on it.
    let mut links = serde_json::Map::new();
    for op in [
        "get_one_agent",
        "exec_agent",
        "finish_agent",
        "idle_agent",
        "kill_agent",
        "resurrect_agent",
        "sleep_agent",
        "wake_agent",
    ] {
        links.insert(
            op.into(),
            json!({"operationId": op, "parameters": {"id": "$response.body#/id"}}),
        );
    }
    set(
        doc,
        "/paths/~1v1~1agents/post/responses/201",
        "links",
        Value::Object(links),
    );
    set(
        doc,
        "/paths/~1v1~1workspaces~1{name}~1warm-pool~1test/post/responses/201",
        "links",
        json!({
            "get_instance": {"operationId": "get_instance", "parameters": {"id": "$response.body#/id"}}
        }),
    );
    // The pool status (`hearth_reconcilers::status::PoolStatus`, which has
    // no schema derive of its own): its keys, open to additions.
    let count = json!({"type": "integer", "minimum": 0});
    let counts = |keys: &[&str]| -> Value {
        let properties: serde_json::Map<String, Value> = keys
            .iter()
            .map(|k| ((*k).to_owned(), count.clone()))
            .collect();
        json!({"type": "object", "required": keys, "properties": properties})
    };
    let mut workspace = counts(&[
        "idle", "booting", "active", "stale", "queued", "min_idle", "max_idle",
    ]);
    for (key, schema) in [
        ("name", json!({"type": "string"})),
        (
            "status",
            json!({"type": "string", "enum": ["healthy", "backing_off", "hard_limited", "disabled"]}),
        ),
        ("idle_timeout", json!({"type": "string"})),
        ("consecutive_failures", json!({"type": "integer"})),
        ("backoff_until", json!({"type": ["string", "null"]})),
        ("last_error", json!({"type": ["string", "null"]})),
    ] {
        workspace["properties"][key] = schema;
    }
    doc["components"]["schemas"]["PoolStatus"] = json!({
        "type": "object",
        "description": "The pool's counts, configuration and workspaces (`hearth pool status`).",
        "required": ["pool", "status", "vms", "queued", "configuration", "workspaces", "reaper"],
        "properties": {
            "pool": {"type": "string"},
            "status": {
                "type": "string",
                "enum": ["healthy", "degraded", "over_cap", "stopped", "unconfigured"],
                "description": "`over_cap`: more VMs live than `max_vms` (after it was lowered) while idle ones are destroyed"
            },
            "vms": counts(&["total", "active", "idle", "booting", "draining", "stale"]),
            "queued": count,
            "configuration": {"type": "object", "properties": {
                "max_vms": {"type": ["integer", "null"]},
                "min_idle": {"type": "integer", "minimum": 0},
                "max_idle": {"type": "integer", "minimum": 0},
                "idle_timeout": {"type": "string"},
                "boot_timeout": {"type": "string"}
            }},
            "workspaces": {"type": "array", "items": workspace},
            "reaper": {"type": "object", "required": ["mode", "stranded"], "properties": {
                "mode": {"type": "string"}, "stranded": {"type": "integer", "minimum": 0}
            }}
        }
    });
    // ---- pass status (the tenant's last reconcile pass)
    {
        let wakes: Vec<&str> = hearth_reconcilers::pass::Wake::ALL
            .iter()
            .map(|w| w.as_str())
            .collect();
        let actions = counts(&hearth_reconcilers::pass::ACTION_KINDS);
        doc["components"]["schemas"]["PoolStatus"]["properties"]["pass"] = json!({
            "description": "The tenant's last reconcile pass (`null` before the first): the answering replica's own when it leads the tenant (`source: live`), else the last one the leader kept in the store, which it does for passes that acted, failed or took the lead over (`source: stored`).",
            "oneOf": [{"type": "null"}, {
                "type": "object",
                "required": ["replica", "iteration", "woken_by", "started_at", "duration_ms", "reused_snapshot", "actions", "errors", "last_error", "totals", "source"],
                "properties": {
                    "replica": {"type": "string", "description": "The replica that ran it"},
                    "iteration": {"type": "integer", "minimum": 1, "description": "Its number among that replica's passes of the tenant"},
                    "woken_by": {"type": "string", "enum": wakes},
                    "started_at": {"type": "string", "format": "date-time"},
                    "duration_ms": {"type": "number", "minimum": 0},
                    "reused_snapshot": {"type": "boolean"},
                    "actions": actions,
                    "errors": count,
                    "last_error": {"oneOf": [{"type": "null"}, {"type": "object", "required": ["iteration", "at", "message"], "properties": {
                        "iteration": {"type": "integer"}, "at": {"type": "string", "format": "date-time"}, "message": {"type": "string"}
                    }}]},
                    "totals": {"type": "object", "required": ["actions", "errors", "wakes"], "properties": {
                        "actions": actions, "errors": count, "wakes": counts(&wakes)
                    }},
                    "source": {"type": "string", "enum": ["live", "stored"]}
                }
            }]
        });
    }
    // A parent is an agent id in one of the forms `uuid` parses.
    {
        let h = "[0-9a-fA-F]";
        let hyphenated = format!("{h}{{8}}-{h}{{4}}-{h}{{4}}-{h}{{4}}-{h}{{12}}");
        let uuid = format!("^({h}{{32}}|{hyphenated}|\\{{{hyphenated}\\}}|urn:uuid:{hyphenated})$");
        doc["components"]["schemas"]["SpawnRequest"]["properties"]["parent"]["pattern"] =
            json!(uuid);
        // The VMs a node reports are VM ids.
        for schema in ["JoinRequest", "HeartbeatRequest"] {
            doc["components"]["schemas"][schema]["properties"]["vms"]["items"] =
                json!({"type": "string", "pattern": uuid});
        }
    }
    // The reaper field's older name is read too (never with the new one).
    for schema in ["PoolConfig", "PoolConfigPatch"] {
        let new =
            doc["components"]["schemas"][schema]["properties"]["reap_stranded_workflows"].clone();
        let mut old = if schema == "PoolConfigPatch" {
            new
        } else {
            json!({"type": ["string", "null"], "pattern": "^[^\\u0000]*$"})
        };
        old["deprecated"] = json!(true);
        old["writeOnly"] = json!(true);
        doc["components"]["schemas"][schema]["properties"]["reap_stranded_agents"] = old;
        doc["components"]["schemas"][schema]["not"] = json!({
            "required": ["reap_stranded_workflows", "reap_stranded_agents"],
            "properties": {
                "reap_stranded_workflows": {"type": "string"},
                "reap_stranded_agents": {"type": "string"}
            }
        });
    }
    set(
        doc,
        "/paths/~1v1~1pool~1status/get/responses/200/content/application~1json",
        "schema",
        json!({"$ref": "#/components/schemas/PoolStatus"}),
    );
    // Every other string of a request: no NUL.
    no_nul(doc.pointer_mut(schemas).expect("schemas"));
    let paths = doc["paths"].as_object_mut().expect("paths");
    for item in paths.values_mut() {
        for op in item.as_object_mut().expect("path item").values_mut() {
            if let Some(params) = op.get_mut("parameters") {
                no_nul(params);
            }
        }
    }
}

/// Adds the no-NUL pattern to every string schema under `value` that has
/// no pattern or enum of its own.
fn no_nul(value: &mut Value) {
    match value {
        Value::Object(map) => {
            let is_string = match map.get("type") {
                Some(Value::String(t)) => t == "string",
                Some(Value::Array(ts)) => ts.iter().any(|t| t == "string"),
                _ => false,
            };
            if is_string
                && !map.contains_key("pattern")
                && !map.contains_key("enum")
                && !map.contains_key("format")
            {
                map.insert("pattern".into(), json!(NO_NUL));
            }
            for v in map.values_mut() {
                no_nul(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(no_nul),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    /// The checked-in copy matches the code; regenerate it with
    /// `UPDATE_OPENAPI=1 cargo test -p hearth-api openapi`.
    #[test]
    fn openapi_json_in_the_repository_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi.json");
        let generated = super::document() + "\n";
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let stored = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            stored == generated,
            "openapi.json is stale: run UPDATE_OPENAPI=1 cargo test -p hearth-api openapi"
        );
    }

    #[test]
    fn operation_ids_are_unique() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        let mut ids: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|p| {
                p.as_object()
                    .unwrap()
                    .values()
                    .map(|op| op["operationId"].as_str().unwrap())
            })
            .collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
    }
}
