//! Images the server makes: bake jobs (`POST /v1/images/{name}/bakes`, run
//! on the server into its image store, followed through their log) and
//! operators' prebuilt images (`POST /v1/images/{name}/prebuilt`, a folder
//! confined under the store's `prebuilt/`).
//!
//! **Invariant:** no request names a host path outside the image store: a
//! bake writes where the server chooses; a prebuilt path is relative to
//! `prebuilt/` and checked by [`hearth_reconcilers::images::confine`].

use crate::auth::Caller;
use crate::{ApiError, AppState, body};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use hearth_core::Error;
use hearth_core::rbac::Permission;
use hearth_core::resource::{Artifact, ArtifactSource, DriverKind, Image, Kind, validate_name};
use hearth_reconcilers::images::{self, NOT_BAKED};
use hearth_store::{BakeRecord, BakeState, now_millis};
use serde::{Deserialize, Serialize};

/// A bake job as the API shows it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BakeView {
    pub id: String,
    pub image: String,
    /// `queued`, `running`, `succeeded` or `failed`.
    pub state: String,
    /// Who asked for it.
    pub requested_by: String,
    /// The image's recipe when the job was made.
    #[schema(value_type = Object)]
    pub recipe: serde_json::Value,
    /// The last progress line.
    pub step: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The version folder a successful bake wrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bake: Option<i64>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// The log from `log_offset` on (only on `GET` of one job).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// Where the next read of the log starts (a byte offset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_log_offset: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BakeList {
    pub items: Vec<BakeView>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Byte offset into the log to read from (the previous answer's
    /// `next_log_offset`); default 0.
    #[param(minimum = 0)]
    pub log_offset: Option<i64>,
}

/// What an operator registers.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterPrebuilt {
    /// The folder, relative to the image store's `prebuilt/` (no `..`, no
    /// symbolic links): qemu `vmlinuz` + `initrd.img` and/or `disk.img`;
    /// sandbox `rootfs/`.
    pub path: String,
    /// The image's driver when it does not exist yet (default qemu).
    #[serde(default)]
    pub driver: Option<DriverKind>,
    /// The tenant the image is for (default: the caller's).
    #[serde(default)]
    pub tenant: Option<String>,
}

fn view(b: &BakeRecord, log_offset: Option<u64>) -> BakeView {
    let log = log_offset.map(|offset| {
        let mut start = (offset as usize).min(b.log.len());
        while !b.log.is_char_boundary(start) {
            start += 1;
        }
        (b.log[start..].to_owned(), b.log.len() as u64)
    });
    BakeView {
        id: b.id.clone(),
        image: b.image.clone(),
        state: b.state.as_str().to_owned(),
        requested_by: b.requested_by.clone(),
        recipe: b.recipe.clone(),
        step: b.step.clone(),
        error: b.error.clone(),
        bake: b.bake,
        created_at: crate::tenants::rfc3339(b.created_at),
        updated_at: crate::tenants::rfc3339(b.updated_at),
        finished_at: b.finished_at.map(crate::tenants::rfc3339),
        next_log_offset: log.as_ref().map(|(_, next)| *next),
        log: log.map(|(text, _)| text),
    }
}

async fn image_of(
    state: &AppState,
    tenant: hearth_core::ids::TenantId,
    name: &str,
) -> Result<Option<(Image, i64)>, ApiError> {
    let Some(record) = state.store.get_resource(tenant, Kind::Image, name).await? else {
        return Ok(None);
    };
    let image: Image = serde_json::from_value(record.spec)
        .map_err(|e| Error::internal(format!("stored image {name:?} is unreadable: {e}")))?;
    Ok(Some((image, record.version)))
}

fn no_image(name: &str) -> ApiError {
    Error::not_found(format!("image {name:?} not found")).into()
}

fn image_store(state: &AppState) -> Result<std::sync::Arc<images::ImageStoreConfig>, ApiError> {
    state
        .pool
        .options()
        .images
        .clone()
        .ok_or_else(|| Error::failed_precondition("this server has no image store").into())
}

/// Starts a bake of the image from its recipe, on the server; follow it
/// with `GET /v1/images/{name}/bakes/{id}`.
#[utoipa::path(post, path = "/v1/images/{name}/bakes", tag = "image", operation_id = "bake_image", security(("bearer" = [])),
    params(("name" = String, Path, description = "Image name")),
    responses((status = 202, description = "The job, queued", body = BakeView), (status = 401, body = hearth_core::Error),
              (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error),
              (status = 409, description = "A bake of this image is queued or running already, or the image is not baked (sandbox)", body = hearth_core::Error)))]
pub async fn bake(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<BakeView>), ApiError> {
    caller.require(Permission::ImageUpdate)?;
    let (image, _) = image_of(&state, caller.tenant(), &name)
        .await?
        .ok_or_else(|| no_image(&name))?;
    if image.driver != DriverKind::Qemu {
        return Err(Error::failed_precondition(NOT_BAKED).into());
    }
    image_store(&state)?;
    let now = now_millis();
    let mut recipe = serde_json::to_value(&image).map_err(|e| Error::internal(e.to_string()))?;
    if let Some(fields) = recipe.as_object_mut() {
        fields.remove("artifact");
    }
    let job = BakeRecord {
        id: uuid::Uuid::new_v4().to_string(),
        tenant_id: caller.tenant(),
        image: name.clone(),
        state: BakeState::Queued,
        requested_by: caller.identity.name.clone(),
        recipe,
        step: "queued".into(),
        log: String::new(),
        error: None,
        bake: None,
        created_at: now,
        updated_at: now,
        finished_at: None,
    };
    match state.store.create_bake(&job).await {
        Ok(()) => {}
        Err(hearth_store::StoreError::Conflict(what)) => {
            return Err(Error::failed_precondition(what).into());
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(tenant = %caller.tenant(), identity = %caller.identity.name, image = %name, bake = %job.id, "bake queued");
    state.pool.spawn_bake(job.clone(), image);
    Ok((StatusCode::ACCEPTED, Json(view(&job, None))))
}

/// The image's bake jobs, newest first (without their logs).
#[utoipa::path(get, path = "/v1/images/{name}/bakes", tag = "image", operation_id = "list_image_bakes", security(("bearer" = [])),
    params(("name" = String, Path, description = "Image name")),
    responses((status = 200, body = BakeList), (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<BakeList>, ApiError> {
    caller.require(Permission::ImageGet)?;
    validate_name(Kind::Image, &name)?;
    let jobs = state.store.list_bakes(caller.tenant(), &name).await?;
    Ok(Json(BakeList {
        items: jobs.iter().map(|b| view(b, None)).collect(),
    }))
}

/// One bake job, with its log from `log_offset` on.
#[utoipa::path(get, path = "/v1/images/{name}/bakes/{id}", tag = "image", operation_id = "get_image_bake", security(("bearer" = [])),
    params(("name" = String, Path, description = "Image name"), ("id" = String, Path, description = "Job id"), LogQuery),
    responses((status = 200, body = BakeView), (status = 400, body = hearth_core::Error), (status = 401, body = hearth_core::Error),
              (status = 403, body = hearth_core::Error), (status = 404, body = hearth_core::Error)))]
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    Query(query): Query<LogQuery>,
) -> Result<Json<BakeView>, ApiError> {
    caller.require(Permission::ImageGet)?;
    validate_name(Kind::Image, &name)?;
    let missing = || {
        ApiError::from(Error::not_found(format!(
            "bake {id:?} of image {name:?} not found"
        )))
    };
    let job = match state.store.get_bake(caller.tenant(), &id).await {
        Ok(job) if job.image == name => job,
        Ok(_) | Err(hearth_store::StoreError::NotFound(_)) => return Err(missing()),
        Err(e) => return Err(e.into()),
    };
    let offset = u64::try_from(query.log_offset.unwrap_or(0))
        .map_err(|_| Error::invalid("log_offset: a byte offset is 0 or more"))?;
    Ok(Json(view(&job, Some(offset))))
}

/// Registers a prebuilt image an operator put under the image store's
/// `prebuilt/` as what the image boots (creating the image if needed).
#[utoipa::path(post, path = "/v1/images/{name}/prebuilt", tag = "image", operation_id = "register_prebuilt_image", security(("bearer" = [])),
    params(("name" = String, Path, description = "Image name")),
    request_body = RegisterPrebuilt,
    responses((status = 200, body = crate::resources::ResourceView), (status = 400, body = hearth_core::Error),
              (status = 401, body = hearth_core::Error), (status = 403, body = hearth_core::Error),
              (status = 404, body = hearth_core::Error), (status = 409, body = hearth_core::Error)))]
pub async fn register(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<crate::resources::ResourceView>, ApiError> {
    caller.require(Permission::ImageRegister)?;
    validate_name(Kind::Image, &name)?;
    let input: RegisterPrebuilt = body::json(body)?;
    let tenant = match &input.tenant {
        None => caller.tenant(),
        Some(wanted) => state
            .store
            .list_tenants()
            .await?
            .into_iter()
            .find(|t| &t.name == wanted)
            .map(|t| t.id)
            .ok_or_else(|| {
                ApiError::from(Error::not_found(format!("tenant {wanted:?} not found")))
            })?,
    };
    let store_config = image_store(&state)?;
    let existing = image_of(&state, tenant, &name).await?;
    let driver = match (&existing, input.driver) {
        (Some((image, _)), Some(driver)) if image.driver != driver => {
            // The stored image's driver: a state, not bad input.
            return Err(Error::failed_precondition(format!(
                "driver: image {name:?} is a {} image",
                if image.driver == DriverKind::Qemu {
                    "qemu"
                } else {
                    "sandbox"
                }
            ))
            .into());
        }
        (Some((image, _)), _) => image.driver,
        (None, driver) => driver.unwrap_or(DriverKind::Qemu),
    };
    if driver == DriverKind::Fake && input.driver == Some(DriverKind::Fake) {
        return Err(Error::invalid("driver: a prebuilt image is for qemu or sandbox").into());
    }
    if driver == DriverKind::Fake {
        // The stored image's driver, not the request's: a state, not bad input.
        return Err(Error::failed_precondition(format!(
            "image {name:?} is a fake image; a prebuilt image is for qemu or sandbox"
        ))
        .into());
    }
    let root = store_config.prebuilt_dir();
    let path = input.path.clone();
    let checked = tokio::task::spawn_blocking(move || {
        // A plain relative path to nothing is a folder not found (a state
        // of the store); every other refusal is the path's own fault.
        let plain =
            !std::path::Path::new(&path).is_absolute() && !path.split('/').any(|c| c == "..");
        if plain
            && std::fs::symlink_metadata(root.join(&path))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
        {
            return Err(Error::not_found(format!(
                "path: {path:?}: no such folder under the image store's prebuilt/"
            )));
        }
        let (_, spec) = images::confine(&root, &path, driver)
            .map_err(|e| Error::invalid(format!("path: {e}")))?;
        let digest = images::digest(&spec)
            .map_err(|e| Error::invalid(format!("path: reading the image: {e}")))?;
        Ok((spec, digest))
    })
    .await
    .map_err(|e| Error::internal(e.to_string()))?;
    let (spec, digest) = checked?;
    // Into the store by digest, so every node can fetch the image.
    let files =
        hearth_reconcilers::publish::publish(state.store.as_ref(), &store_config, &spec, None)
            .await
            .map_err(|e| ApiError::from(Error::failed_precondition(format!("path: {e}"))))?;
    if existing.is_none() {
        let spec = serde_json::json!({"driver": driver, "description": format!("prebuilt {}", input.path)});
        let put = hearth_store::PutResource {
            actor: Some(&caller.identity.name),
            tenant,
            kind: Kind::Image,
            name: &name,
            spec: &spec,
            references: &[],
            precondition: hearth_store::Precondition::None,
        };
        match state.store.put_resource(put).await {
            Ok(_) | Err(hearth_store::StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    images::set_artifact(
        state.store.as_ref(),
        tenant,
        &name,
        Artifact {
            source: ArtifactSource::Prebuilt,
            bake: None,
            job: None,
            prebuilt: Some(input.path.clone()),
            digest,
            created_at: images::now_rfc3339(),
            files,
        },
    )
    .await
    .map_err(|e| ApiError::from(Error::failed_precondition(e)))?;
    tracing::warn!(tenant = %tenant, identity = %caller.identity.name, image = %name, path = %input.path, "prebuilt image registered");
    state.pool.wake();
    let record = state
        .store
        .get_resource(tenant, Kind::Image, &name)
        .await?
        .ok_or_else(|| no_image(&name))?;
    crate::resources::view_image(&record).map(Json)
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/images/{name}/bakes", get(list).post(bake))
        .route("/v1/images/{name}/bakes/{id}", get(get_one))
        .route("/v1/images/{name}/prebuilt", post(register))
}
