//! The OpenAPI document, generated from the handlers' annotations. A copy is
//! kept in the repository (`openapi.json`) and a test checks they match.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::resources::{environment, image, pool_config, workspace};
use crate::{agents, auth, builds, identities, pool, tenants, warm_pool};

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
        identities::list, identities::create, identities::remove, identities::create_token,
        tenants::list, tenants::create,
        agents::spawn, agents::list, agents::get_one, agents::kill, agents::sleep, agents::wake,
        agents::resurrect, agents::finish, agents::idle, agents::exec,
        pool::status, pool::vms, pool::flush, pool::up, pool::reset,
        builds::list, builds::retire,
        warm_pool::get_settings, warm_pool::patch_settings, warm_pool::test, warm_pool::get_workspace_instance,
        warm_pool::list_workspace_instances, warm_pool::list_instances, warm_pool::get_instance,
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
    }
}

/// The document as pretty JSON (what `/openapi.json` serves).
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
}

/// Serves the OpenAPI document.
pub async fn serve() -> Json<serde_json::Value> {
    Json(serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes"))
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
