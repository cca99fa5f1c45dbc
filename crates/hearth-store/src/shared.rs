//! The one implementation of [`Store`](crate::Store), written once and
//! expanded for each backend by [`impl_store!`].
//!
//! A macro rather than code generic over `sqlx::Database`: the method
//! bodies are identical for both backends, but spelling out the executor,
//! encode and decode bounds generically costs more than it is worth. After
//! expansion everything is concrete, so the compiler checks each backend on
//! its own.
//!
//! `impl_store!(StoreType, sqlx::DbType)` expects these inherent items on
//! `StoreType`, which is all that differs between backends:
//!
//! - `const BACKEND: &'static str` — what [`Store::backend`] answers;
//! - `const LOCK_TENANTS: Option<&'static str>` — a statement that makes
//!   `bootstrap`'s count-then-insert exclusive, if the write transaction is
//!   not exclusive already;
//! - `const SELECT_RESOURCE_FOR_WRITE: &'static str` —
//!   [`sql::SELECT_RESOURCE`](crate::sql::SELECT_RESOURCE) plus a row lock
//!   where the backend has row locks;
//! - `const CLAIM_IDLE_VM: &'static str` — the claim statement
//!   ([`sql::claim_idle_vm!`](crate::sql::claim_idle_vm));
//! - `fn reader(&self) -> &Pool<Db>` and `fn writer(&self) -> &Pool<Db>` —
//!   where reads and writes go;
//! - `async fn begin_write(&self) -> Result<Transaction<'static, Db>>` —
//!   starts a write transaction on the writer.
//!
//! [`Store::backend`]: crate::Store::backend

macro_rules! impl_store {
    ($store:ty, $db:ty) => {
        const _: () = {
            use ::hearth_core::ids::{AgentId, IdentityId, TenantId, TokenId};
            use ::hearth_core::rbac::{IdentityKind, Role};
            use ::hearth_core::resource::Kind;
            use $crate::sql::{self, ViolationExt};
            use $crate::{
                Identity, NewToken, Precondition, PutOutcome, PutResource, ResourceRecord, Result,
                Store, StoreError, Tenant, TokenRecord, VmRecord, now_millis,
            };

            type Conn = <$db as ::sqlx::Database>::Connection;
            type Tx = ::sqlx::Transaction<'static, $db>;

            /// The bodies of the multi-statement writes, each run inside
            /// one transaction by the trait method of the same name.
            impl $store {
                /// Commits on success, rolls back on failure (at once, so
                /// locks are not held until the connection is reused).
                async fn finish<T>(tx: Tx, result: Result<T>) -> Result<T> {
                    match result {
                        Ok(value) => {
                            tx.commit().await?;
                            Ok(value)
                        }
                        Err(e) => {
                            // The original error says more than a failed
                            // rollback would; the pool drops a broken
                            // connection anyway.
                            let _ = tx.rollback().await;
                            Err(e)
                        }
                    }
                }

                async fn bootstrap_tx(
                    conn: &mut Conn,
                    tenant_name: &str,
                    identity_name: &str,
                    token: &NewToken,
                ) -> Result<Option<(Tenant, Identity)>> {
                    if let Some(lock) = Self::LOCK_TENANTS {
                        ::sqlx::query(lock).execute(&mut *conn).await?;
                    }
                    let tenants: i64 = ::sqlx::query_scalar(sql::COUNT_TENANTS)
                        .fetch_one(&mut *conn)
                        .await?;
                    if tenants > 0 {
                        return Ok(None);
                    }
                    let created = Self::insert_tenant_tx(
                        conn,
                        tenant_name,
                        identity_name,
                        Role::Operator,
                        token,
                    )
                    .await?;
                    Ok(Some(created))
                }

                /// A tenant, its first (developer) identity and its token.
                async fn insert_tenant_tx(
                    conn: &mut Conn,
                    name: &str,
                    identity_name: &str,
                    role: Role,
                    token: &NewToken,
                ) -> Result<(Tenant, Identity)> {
                    let tenant = Tenant {
                        id: TenantId::new(),
                        name: name.to_owned(),
                        created_at: now_millis(),
                    };
                    ::sqlx::query(sql::INSERT_TENANT)
                        .bind(tenant.id.to_string())
                        .bind(name)
                        .bind(tenant.created_at)
                        .execute(&mut *conn)
                        .await
                        .on_unique(|| StoreError::AlreadyExists(format!("tenant {name:?}")))?;
                    let identity = Self::insert_identity_tx(
                        conn,
                        tenant.id,
                        identity_name,
                        IdentityKind::Developer,
                        role,
                        Some(token),
                    )
                    .await?;
                    Ok((tenant, identity))
                }

                async fn insert_identity_tx(
                    conn: &mut Conn,
                    tenant: TenantId,
                    name: &str,
                    kind: IdentityKind,
                    role: Role,
                    token: Option<&NewToken>,
                ) -> Result<Identity> {
                    let identity = Identity {
                        id: IdentityId::new(),
                        tenant_id: tenant,
                        name: name.to_owned(),
                        kind,
                        role,
                        created_at: now_millis(),
                    };
                    ::sqlx::query(sql::INSERT_IDENTITY)
                        .bind(identity.id.to_string())
                        .bind(tenant.to_string())
                        .bind(name)
                        .bind(kind.as_str())
                        .bind(role.as_str())
                        .bind(identity.created_at)
                        .execute(&mut *conn)
                        .await
                        .on_unique(|| StoreError::AlreadyExists(format!("identity {name:?}")))
                        .on_foreign_key(|| StoreError::NotFound(format!("tenant {tenant}")))?;
                    if let Some(token) = token {
                        ::sqlx::query(sql::INSERT_TOKEN)
                            .bind(token.id.to_string())
                            .bind(identity.id.to_string())
                            .bind(token.secret_sha256.as_slice())
                            .bind(token.expires_at)
                            .bind(identity.created_at)
                            .execute(&mut *conn)
                            .await
                            .on_unique(|| token_exists(token.id))?;
                    }
                    Ok(identity)
                }

                async fn put_resource_tx(
                    conn: &mut Conn,
                    put: &PutResource<'_>,
                ) -> Result<PutOutcome> {
                    let tenant = put.tenant.to_string();
                    let kind = put.kind.as_str();
                    let conflict = || StoreError::Conflict(format!("{} {:?}", put.kind, put.name));

                    let current =
                        ::sqlx::query_as::<_, sql::ResourceRow>(Self::SELECT_RESOURCE_FOR_WRITE)
                            .bind(&tenant)
                            .bind(kind)
                            .bind(put.name)
                            .fetch_optional(&mut *conn)
                            .await?
                            .map(ResourceRecord::try_from)
                            .transpose()?;
                    if let Precondition::Version(expected) = put.precondition
                        && current.as_ref().map(|c| c.version) != Some(expected)
                    {
                        return Err(conflict());
                    }
                    for target in put.references {
                        let found = ::sqlx::query(sql::RESOURCE_EXISTS)
                            .bind(&tenant)
                            .bind(target.kind.as_str())
                            .bind(&target.name)
                            .fetch_optional(&mut *conn)
                            .await?;
                        if found.is_none() {
                            return Err(missing(target.kind, &target.name));
                        }
                    }

                    let now = now_millis();
                    let outcome = match current {
                        None => {
                            ::sqlx::query(sql::INSERT_RESOURCE)
                                .bind(&tenant)
                                .bind(kind)
                                .bind(put.name)
                                .bind(put.spec.to_string())
                                .bind(1_i64)
                                .bind(now)
                                .bind(now)
                                .execute(&mut *conn)
                                .await
                                // Created concurrently (PostgreSQL: nothing
                                // to lock yet); a retry sees the row.
                                .on_unique(conflict)?;
                            let record = ResourceRecord {
                                tenant_id: put.tenant,
                                kind: put.kind,
                                name: put.name.to_owned(),
                                spec: put.spec.clone(),
                                version: 1,
                                created_at: now,
                                updated_at: now,
                            };
                            PutOutcome {
                                record,
                                created: true,
                                changed: true,
                            }
                        }
                        Some(record) if record.spec == *put.spec => PutOutcome {
                            record,
                            created: false,
                            changed: false,
                        },
                        Some(old) => {
                            let record = ResourceRecord {
                                spec: put.spec.clone(),
                                version: old.version + 1,
                                updated_at: now,
                                ..old
                            };
                            ::sqlx::query(sql::UPDATE_RESOURCE)
                                .bind(&tenant)
                                .bind(kind)
                                .bind(put.name)
                                .bind(put.spec.to_string())
                                .bind(record.version)
                                .bind(now)
                                .execute(&mut *conn)
                                .await?;
                            PutOutcome {
                                record,
                                created: false,
                                changed: true,
                            }
                        }
                    };

                    ::sqlx::query(sql::DELETE_REFS_FROM)
                        .bind(&tenant)
                        .bind(kind)
                        .bind(put.name)
                        .execute(&mut *conn)
                        .await?;
                    for target in put.references {
                        ::sqlx::query(sql::INSERT_REF)
                            .bind(&tenant)
                            .bind(kind)
                            .bind(put.name)
                            .bind(target.kind.as_str())
                            .bind(&target.name)
                            .execute(&mut *conn)
                            .await
                            // The foreign key backs the check above up.
                            .on_foreign_key(|| missing(target.kind, &target.name))?;
                    }
                    Ok(outcome)
                }

                async fn delete_resource_tx(
                    conn: &mut Conn,
                    tenant: TenantId,
                    kind: Kind,
                    name: &str,
                ) -> Result<ResourceRecord> {
                    let tenant = tenant.to_string();
                    let record =
                        ::sqlx::query_as::<_, sql::ResourceRow>(Self::SELECT_RESOURCE_FOR_WRITE)
                            .bind(&tenant)
                            .bind(kind.as_str())
                            .bind(name)
                            .fetch_optional(&mut *conn)
                            .await?
                            .ok_or_else(|| StoreError::NotFound(format!("{kind} {name:?}")))?;
                    let record = ResourceRecord::try_from(record)?;

                    let referrer: Option<(String, String)> = ::sqlx::query_as(sql::FIRST_REFERRER)
                        .bind(&tenant)
                        .bind(kind.as_str())
                        .bind(name)
                        .fetch_optional(&mut *conn)
                        .await?;
                    if let Some((by_kind, by_name)) = referrer {
                        return Err(StoreError::InUse {
                            kind,
                            name: name.to_owned(),
                            by_kind: sql::parse("kind", &by_kind)?,
                            by_name,
                        });
                    }

                    ::sqlx::query(sql::DELETE_REFS_FROM)
                        .bind(&tenant)
                        .bind(kind.as_str())
                        .bind(name)
                        .execute(&mut *conn)
                        .await?;
                    ::sqlx::query(sql::DELETE_RESOURCE)
                        .bind(&tenant)
                        .bind(kind.as_str())
                        .bind(name)
                        .execute(&mut *conn)
                        .await
                        // A referrer appeared after the check: cannot happen
                        // under the row lock, but the foreign key says so.
                        .on_foreign_key(|| StoreError::Conflict(format!("{kind} {name:?}")))?;
                    Ok(record)
                }
            }

            fn missing(kind: Kind, name: &str) -> StoreError {
                StoreError::MissingReference {
                    kind,
                    name: name.to_owned(),
                }
            }

            fn token_exists(id: TokenId) -> StoreError {
                StoreError::AlreadyExists(format!("token {id}"))
            }

            #[::async_trait::async_trait]
            impl Store for $store {
                fn backend(&self) -> &'static str {
                    Self::BACKEND
                }

                async fn ping(&self) -> Result<()> {
                    ::sqlx::query("SELECT 1").execute(self.reader()).await?;
                    ::sqlx::query("SELECT 1").execute(self.writer()).await?;
                    Ok(())
                }

                async fn bootstrap(
                    &self,
                    tenant_name: &str,
                    identity_name: &str,
                    token: &NewToken,
                ) -> Result<Option<(Tenant, Identity)>> {
                    let mut tx = self.begin_write().await?;
                    let result =
                        Self::bootstrap_tx(&mut tx, tenant_name, identity_name, token).await;
                    Self::finish(tx, result).await
                }

                async fn create_tenant(
                    &self,
                    name: &str,
                    admin_name: &str,
                    token: &NewToken,
                ) -> Result<(Tenant, Identity)> {
                    let mut tx = self.begin_write().await?;
                    let result =
                        Self::insert_tenant_tx(&mut tx, name, admin_name, Role::Admin, token).await;
                    Self::finish(tx, result).await
                }

                async fn list_tenants(&self) -> Result<Vec<Tenant>> {
                    let rows = ::sqlx::query_as::<_, sql::TenantRow>(sql::LIST_TENANTS)
                        .fetch_all(self.reader())
                        .await?;
                    sql::decode_all(rows)
                }

                async fn create_identity(
                    &self,
                    tenant: TenantId,
                    name: &str,
                    kind: IdentityKind,
                    role: Role,
                    token: Option<&NewToken>,
                ) -> Result<Identity> {
                    let mut tx = self.begin_write().await?;
                    let result =
                        Self::insert_identity_tx(&mut tx, tenant, name, kind, role, token).await;
                    Self::finish(tx, result).await
                }

                async fn get_identity(&self, tenant: TenantId, name: &str) -> Result<Identity> {
                    ::sqlx::query_as::<_, sql::IdentityRow>(sql::GET_IDENTITY)
                        .bind(tenant.to_string())
                        .bind(name)
                        .fetch_optional(self.reader())
                        .await?
                        .ok_or_else(|| StoreError::NotFound(format!("identity {name:?}")))?
                        .try_into()
                }

                async fn list_identities(&self, tenant: TenantId) -> Result<Vec<Identity>> {
                    let rows = ::sqlx::query_as::<_, sql::IdentityRow>(sql::LIST_IDENTITIES)
                        .bind(tenant.to_string())
                        .fetch_all(self.reader())
                        .await?;
                    sql::decode_all(rows)
                }

                async fn delete_identity(&self, tenant: TenantId, name: &str) -> Result<()> {
                    let done = ::sqlx::query(sql::DELETE_IDENTITY)
                        .bind(tenant.to_string())
                        .bind(name)
                        .execute(self.writer())
                        .await?;
                    if done.rows_affected() == 0 {
                        return Err(StoreError::NotFound(format!("identity {name:?}")));
                    }
                    Ok(())
                }

                async fn create_token(
                    &self,
                    tenant: TenantId,
                    identity_name: &str,
                    token: &NewToken,
                ) -> Result<()> {
                    let done = ::sqlx::query(sql::INSERT_TOKEN_BY_IDENTITY_NAME)
                        .bind(token.id.to_string())
                        .bind(token.secret_sha256.as_slice())
                        .bind(token.expires_at)
                        .bind(now_millis())
                        .bind(tenant.to_string())
                        .bind(identity_name)
                        .execute(self.writer())
                        .await
                        .on_unique(|| token_exists(token.id))?;
                    if done.rows_affected() == 0 {
                        return Err(StoreError::NotFound(format!("identity {identity_name:?}")));
                    }
                    Ok(())
                }

                async fn find_token(&self, id: TokenId) -> Result<Option<TokenRecord>> {
                    ::sqlx::query_as::<_, sql::TokenRow>(sql::FIND_TOKEN)
                        .bind(id.to_string())
                        .fetch_optional(self.reader())
                        .await?
                        .map(TokenRecord::try_from)
                        .transpose()
                }

                async fn get_resource(
                    &self,
                    tenant: TenantId,
                    kind: Kind,
                    name: &str,
                ) -> Result<Option<ResourceRecord>> {
                    ::sqlx::query_as::<_, sql::ResourceRow>(sql::SELECT_RESOURCE)
                        .bind(tenant.to_string())
                        .bind(kind.as_str())
                        .bind(name)
                        .fetch_optional(self.reader())
                        .await?
                        .map(ResourceRecord::try_from)
                        .transpose()
                }

                async fn list_resources(
                    &self,
                    tenant: TenantId,
                    kind: Kind,
                ) -> Result<Vec<ResourceRecord>> {
                    let rows = ::sqlx::query_as::<_, sql::ResourceRow>(sql::LIST_RESOURCES)
                        .bind(tenant.to_string())
                        .bind(kind.as_str())
                        .fetch_all(self.reader())
                        .await?;
                    sql::decode_all(rows)
                }

                async fn put_resource(&self, put: PutResource<'_>) -> Result<PutOutcome> {
                    let mut tx = self.begin_write().await?;
                    let result = Self::put_resource_tx(&mut tx, &put).await;
                    Self::finish(tx, result).await
                }

                async fn delete_resource(
                    &self,
                    tenant: TenantId,
                    kind: Kind,
                    name: &str,
                ) -> Result<ResourceRecord> {
                    let mut tx = self.begin_write().await?;
                    let result = Self::delete_resource_tx(&mut tx, tenant, kind, name).await;
                    Self::finish(tx, result).await
                }

                async fn insert_vm(&self, vm: &VmRecord) -> Result<()> {
                    ::sqlx::query(sql::INSERT_VM)
                        .bind(vm.id.to_string())
                        .bind(vm.tenant_id.to_string())
                        .bind(&vm.workspace)
                        .bind(vm.state.as_str())
                        .bind(vm.agent_id.map(|a| a.to_string()))
                        .bind(vm.created_at)
                        .bind(vm.updated_at)
                        .execute(self.writer())
                        .await
                        .on_unique(|| StoreError::AlreadyExists(format!("VM {}", vm.id)))
                        .on_foreign_key(|| {
                            StoreError::NotFound(format!("tenant {}", vm.tenant_id))
                        })?;
                    Ok(())
                }

                async fn claim_idle_vm(
                    &self,
                    tenant: TenantId,
                    workspace: &str,
                    agent: AgentId,
                ) -> Result<Option<VmRecord>> {
                    ::sqlx::query_as::<_, sql::VmRow>(Self::CLAIM_IDLE_VM)
                        .bind(tenant.to_string())
                        .bind(workspace)
                        .bind(agent.to_string())
                        .bind(now_millis())
                        .fetch_optional(self.writer())
                        .await
                        .on_unique(|| StoreError::AlreadyExists(format!("a VM for agent {agent}")))?
                        .map(VmRecord::try_from)
                        .transpose()
                }

                async fn list_vms(&self, tenant: TenantId) -> Result<Vec<VmRecord>> {
                    let rows = ::sqlx::query_as::<_, sql::VmRow>(sql::LIST_VMS)
                        .bind(tenant.to_string())
                        .fetch_all(self.reader())
                        .await?;
                    sql::decode_all(rows)
                }
            }
        };
    };
}
pub(crate) use impl_store;
