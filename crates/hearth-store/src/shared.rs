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
//! - `const LOCK_TENANT: Option<&'static str>` — a statement (`$1`: tenant
//!   id) that serializes `insert_vm_within_cap`'s count-then-insert for one
//!   tenant, if the write transaction is not exclusive already;
//! - `const LOCK_EVENTS: Option<&'static str>` — a statement (`$1`: tenant
//!   id) held until the transaction ends that makes a tenant's event ids
//!   commit in order, if the write transaction is not exclusive already;
//! - `const SELECT_OWNER_FOR_CAP: &'static str` —
//!   [`sql::select_owner!`](crate::sql::select_owner) plus a row lock where
//!   the backend has row locks, so `create_agent`'s cap check serializes
//!   per owner;
//! - `const SELECT_PARENT_FOR_SPAWN: &'static str` —
//!   [`sql::select_agent!`](crate::sql::select_agent) plus a shared row
//!   lock where the backend has row locks, so a parent cannot end unseen
//!   while `spawn_agent` checks it;
//! - `fn reader(&self) -> &Pool<Db>` and `fn writer(&self) -> &Pool<Db>` —
//!   where reads and writes go;
//! - `async fn begin_write(&self) -> Result<WriteTx<Db>>` — starts a write
//!   transaction on the writer, counted in the store's [`WriteCount`] when
//!   it ends;
//! - `fn writes(&self) -> &WriteCount` — the count of this instance's
//!   finished writes (shared by its clones);
//! - `async fn database_mark(&self) -> Result<String>` — the database's own
//!   mark of every writer's commits (see [`Store::change_token`]);
//! - `fn secrets(&self) -> &Secrets` — the key once unlocked (shared by
//!   the store's clones), which seals and opens specs' secrets;
//! - `async fn after_sealing(&self) -> Result<()>` — what the backend does
//!   once older plaintext secrets were sealed, so no copy of them stays in
//!   its files where it can;
//! - `async fn lead_tenants(&self, &[TenantId]) -> Result<Leads>`,
//!   `async fn send_wake(&self, Option<TenantId>) -> Result<()>` and
//!   `fn listen_wakes(&self) -> UnboundedReceiver<Wake>` — the replicas'
//!   coordination ([`Store::lead`], [`Store::notify_wake`],
//!   [`Store::wakes`]).
//!
//! **Change token.** Every write is counted once it has ended, whatever
//! its outcome: a transaction by its [`WriteTx`] (when committed, rolled
//! back or dropped), a statement on `writer()` by the `let _written =
//! self.written();` that opens each method writing that way (dropped when
//! the method returns or is abandoned, after its statements). A method
//! that writes through `writer()` must open with it. The database mark
//! catches any write all the same (and every other writer's).
//!
//! [`Store::backend`]: crate::Store::backend
//! [`Store::lead`]: crate::Store::lead
//! [`Store::notify_wake`]: crate::Store::notify_wake
//! [`Store::wakes`]: crate::Store::wakes
//! [`Store::change_token`]: crate::Store::change_token

macro_rules! impl_store {
    ($store:ty, $db:ty) => {
        const _: () = {
            use ::hearth_core::ids::{AgentId, IdentityId, InstanceId, TenantId, TokenId, VmId};
            use ::hearth_core::rbac::{IdentityKind, Role};
            use ::hearth_core::resource::Kind;
            use $crate::sql::{self, ViolationExt};
            use $crate::{
                AgentFilter, AgentPhase, AgentRecord, AgentUpdate, BakeRecord, BakeUpdate, Build,
                Identity, IdentityRefusal, InsertVm, InstanceFilter, InstanceRecord,
                InstanceStatus, NewAgent, NewToken, ParentProblem, PoolState, Precondition,
                PutOutcome, PutResource, Ready, ResourceRecord, Result, Store, StoreError, Tenant,
                TokenRecord, VmRecord, VmState, WarmPoolCounts, WorkspaceState, now_millis,
                NodeRecord, NodeState, NodeCapacity, NodeUsage, Artifact, ARTIFACT_CHUNK_BYTES,
            };
            use $crate::emit;
            use ::hearth_core::ids::NodeId;

            type Conn = <$db as ::sqlx::Database>::Connection;
            type Tx = $crate::shared::WriteTx<$db>;

            /// The bodies of the multi-statement writes, each run inside
            /// one transaction by the trait method of the same name.
            impl $store {
                /// Counts one write of this instance when dropped (see the
                /// module doc): held by each method that writes through
                /// `writer()`, so it counts after the method's statements.
                fn written(&self) -> $crate::shared::Written<'_> {
                    self.writes().on_drop()
                }

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

                /// Commits when the outcome is worth keeping (`keep`), rolls
                /// back otherwise: a method that answers "nothing done" must
                /// leave nothing done, even a half of it.
                async fn settle<T>(
                    tx: Tx,
                    result: Result<T>,
                    keep: impl FnOnce(&T) -> bool,
                ) -> Result<T> {
                    match result {
                        Ok(value) if keep(&value) => {
                            tx.commit().await?;
                            Ok(value)
                        }
                        Ok(value) => {
                            tx.rollback().await?;
                            Ok(value)
                        }
                        Err(e) => Self::finish(tx, Err(e)).await,
                    }
                }

                /// Binds a VM's columns as `$1`…`$15`, in [`sql::INSERT_VM`]'s
                /// order.
                fn bind_vm<'q>(
                    query: ::sqlx::query::Query<'q, $db, <$db as ::sqlx::Database>::Arguments<'q>>,
                    vm: &'q VmRecord,
                ) -> ::sqlx::query::Query<'q, $db, <$db as ::sqlx::Database>::Arguments<'q>>
                {
                    query
                        .bind(vm.id.to_string())
                        .bind(vm.tenant_id.to_string())
                        .bind(&vm.workspace)
                        .bind(vm.state.as_str())
                        .bind(vm.agent_id.map(|a| a.to_string()))
                        .bind(&vm.driver)
                        .bind(vm.env_version)
                        .bind(vm.image_version)
                        .bind(sql::store_flag(vm.stale))
                        .bind(vm.reserved_for.map(|a| a.to_string()))
                        .bind(sql::store_flag(vm.test))
                        .bind(vm.error.as_deref().map($crate::storable_text))
                        .bind(vm.created_at)
                        .bind(vm.updated_at)
                        .bind(&vm.setup_digest)
                        .bind(vm.node_id.map(|n| n.to_string()))
                        .bind(vm.cpus)
                        .bind(vm.memory_mib)
                        .bind(vm.task_owner.clone())
                }

                /// Whether node `node` has room for `vm` (its row locked
                /// first, so placements on one node serialize).
                async fn node_has_room(conn: &mut Conn, node: NodeId, vm: &VmRecord) -> Result<bool> {
                    let id = node.to_string();
                    ::sqlx::query(sql::LOCK_NODE).bind(&id).execute(&mut *conn).await?;
                    let room: Option<(String, i64, i64, i64, i64)> =
                        ::sqlx::query_as(sql::NODE_ROOM).bind(&id).fetch_optional(&mut *conn).await?;
                    let Some((state, cpus, memory_mib, vm_slots, max_boots)) = room else {
                        return Ok(false);
                    };
                    let (vms, booting, used_cpus, used_memory): (i64, i64, i64, i64) =
                        ::sqlx::query_as(sql::ONE_NODE_USAGE.as_str())
                            .bind(&id)
                            .fetch_one(&mut *conn)
                            .await?;
                    Ok(state == "ready"
                        && vms < vm_slots
                        && booting < max_boots
                        && used_cpus + vm.cpus <= cpus
                        && used_memory + vm.memory_mib <= memory_mib)
                }

                async fn insert_vm_on<'e, E>(exec: E, vm: &VmRecord) -> Result<()>
                where
                    E: ::sqlx::Executor<'e, Database = $db>,
                {
                    Self::bind_vm(::sqlx::query(sql::INSERT_VM), vm)
                        .execute(exec)
                        .await
                        .on_unique(|| StoreError::AlreadyExists(format!("VM {}", vm.id)))
                        .on_foreign_key(|| {
                            StoreError::NotFound(format!("tenant {}", vm.tenant_id))
                        })?;
                    Ok(())
                }

                /// The one-statement claim ([`sql::claim_idle_vm!`]).
                async fn claim_on<'e, E>(
                    exec: E,
                    tenant: TenantId,
                    workspace: &str,
                    agent: AgentId,
                ) -> Result<Option<VmRecord>>
                where
                    E: ::sqlx::Executor<'e, Database = $db>,
                {
                    ::sqlx::query_as::<_, sql::VmRow>(Self::CLAIM_IDLE_VM)
                        .bind(tenant.to_string())
                        .bind(workspace)
                        .bind(agent.to_string())
                        .bind(now_millis())
                        .fetch_optional(exec)
                        .await
                        // The agent already holds a VM (`vms_agent`).
                        .on_unique(|| StoreError::AlreadyExists(format!("a VM for agent {agent}")))?
                        .map(VmRecord::try_from)
                        .transpose()
                }

                /// Appends `events` to `tenant`'s log inside the caller's
                /// transaction (so they commit, or vanish, with the change
                /// they describe), holding the tenant's event lock first
                /// where the backend needs one for commit order. Call it as
                /// late in the transaction as possible: the lock is held
                /// until the transaction ends.
                async fn append_events_on(
                    conn: &mut Conn,
                    tenant: TenantId,
                    events: &[$crate::NewEvent],
                ) -> Result<()> {
                    if events.is_empty() {
                        return Ok(());
                    }
                    let tenant = tenant.to_string();
                    if let Some(lock) = Self::LOCK_EVENTS {
                        ::sqlx::query(lock).bind(&tenant).execute(&mut *conn).await?;
                    }
                    let at = now_millis();
                    for event in events {
                        ::sqlx::query(sql::INSERT_EVENT)
                            .bind(&tenant)
                            .bind(at)
                            .bind(event.kind.as_str())
                            .bind(&event.subject)
                            .bind(event.actor.as_deref())
                            .bind(event.data.to_string())
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                }

                async fn insert_vm_within_cap_tx(
                    conn: &mut Conn,
                    vm: &VmRecord,
                    max_vms: i64,
                ) -> Result<InsertVm> {
                    let tenant = vm.tenant_id.to_string();
                    if let Some(lock) = Self::LOCK_TENANT {
                        ::sqlx::query(lock)
                            .bind(&tenant)
                            .execute(&mut *conn)
                            .await?;
                    }
                    let live: i64 = ::sqlx::query_scalar(sql::COUNT_LIVE_VMS.as_str())
                        .bind(&tenant)
                        .fetch_one(&mut *conn)
                        .await?;
                    if live >= max_vms {
                        return Ok(InsertVm::AtCapacity);
                    }
                    if let Some(node) = vm.node_id
                        && !Self::node_has_room(&mut *conn, node, vm).await?
                    {
                        return Ok(InsertVm::NodeFull);
                    }
                    if let Some(agent) = vm.reserved_for {
                        let reserved = ::sqlx::query(sql::RESERVE_QUEUED_AGENT)
                            .bind(&tenant)
                            .bind(agent.to_string())
                            .bind(now_millis())
                            .execute(&mut *conn)
                            .await?;
                        if reserved.rows_affected() == 0 {
                            return Ok(InsertVm::AgentNotQueued);
                        }
                    }
                    Self::insert_vm_on(&mut *conn, vm).await?;
                    let mut events = Vec::with_capacity(2);
                    if let Some(agent) = vm.reserved_for {
                        events.push(emit::agent_phase(
                            agent,
                            &vm.workspace,
                            Some(AgentPhase::Queued),
                            AgentPhase::Provisioning,
                            Some(vm.id),
                        ));
                    }
                    events.push(emit::vm_booting(vm.id, &vm.workspace, vm.reserved_for, vm.test));
                    Self::append_events_on(conn, vm.tenant_id, &events).await?;
                    Ok(InsertVm::Inserted)
                }

                async fn assign_idle_vm_tx(
                    conn: &mut Conn,
                    tenant: TenantId,
                    workspace: &str,
                    agent: AgentId,
                ) -> Result<Option<VmRecord>> {
                    // Not queued: no VM is locked (and skipped by other
                    // claimers) for nothing, and an agent that holds a VM
                    // already is `None`, not the claim's `AlreadyExists`.
                    let queued = ::sqlx::query(sql::AGENT_IS_QUEUED)
                        .bind(tenant.to_string())
                        .bind(agent.to_string())
                        .fetch_optional(&mut *conn)
                        .await?;
                    if queued.is_none() {
                        return Ok(None);
                    }
                    let Some(vm) = Self::claim_on(&mut *conn, tenant, workspace, agent).await?
                    else {
                        return Ok(None);
                    };
                    let started = ::sqlx::query(sql::START_QUEUED_AGENT)
                        .bind(tenant.to_string())
                        .bind(agent.to_string())
                        .bind(vm.id.to_string())
                        .bind(vm.updated_at)
                        .execute(&mut *conn)
                        .await?;
                    if started.rows_affected() != 1 {
                        return Ok(None);
                    }
                    let events = [
                        emit::vm_assigned(vm.id, workspace, agent),
                        emit::agent_phase(
                            agent,
                            workspace,
                            Some(AgentPhase::Queued),
                            AgentPhase::Running,
                            Some(vm.id),
                        ),
                    ];
                    Self::append_events_on(conn, tenant, &events).await?;
                    Ok(Some(vm))
                }

                async fn vm_ready_tx(conn: &mut Conn, id: VmId) -> Result<Ready> {
                    let vm = id.to_string();
                    let booting: Option<(String, Option<String>, String)> =
                        ::sqlx::query_as(sql::SELECT_BOOTING_VM)
                            .bind(&vm)
                            .fetch_optional(&mut *conn)
                            .await?;
                    let Some((tenant, reserved_for, workspace)) = booting else {
                        return Ok(Ready::Gone);
                    };
                    let tenant_id = sql::parse::<TenantId>("tenant id", &tenant)?;
                    let now = now_millis();
                    if let Some(reserved) = reserved_for {
                        let agent = sql::parse::<AgentId>("agent id", &reserved)?;
                        // The VM first (as a claim does), then the agent; both
                        // compare-and-set, so a concurrent change of either
                        // makes this a no-op rather than a lost update.
                        let assigned = ::sqlx::query(sql::READY_VM_TO_AGENT)
                            .bind(&vm)
                            .bind(&reserved)
                            .bind(now)
                            .execute(&mut *conn)
                            .await
                            // The agent still holds another VM.
                            .on_unique(|| StoreError::Conflict(format!("VM {id}")))?;
                        if assigned.rows_affected() == 1 {
                            let started = ::sqlx::query(sql::START_PROVISIONING_AGENT)
                                .bind(&vm)
                                .bind(&reserved)
                                .bind(&tenant)
                                .bind(now)
                                .execute(&mut *conn)
                                .await?;
                            if started.rows_affected() == 1 {
                                let events = [
                                    emit::vm_ready(id, &workspace),
                                    emit::vm_assigned(id, &workspace, agent),
                                    emit::agent_phase(
                                        agent,
                                        &workspace,
                                        Some(AgentPhase::Provisioning),
                                        AgentPhase::Running,
                                        Some(id),
                                    ),
                                ];
                                Self::append_events_on(conn, tenant_id, &events).await?;
                                return Ok(Ready::Assigned(agent));
                            }
                            // The agent moved on (killed, say): the VM is
                            // warm instead. It is `assigned` now, under our
                            // lock; the statement below takes it to idle.
                            ::sqlx::query(sql::UNASSIGN_READY_VM)
                                .bind(&vm)
                                .bind(now)
                                .execute(&mut *conn)
                                .await?;
                            Self::append_events_on(conn, tenant_id, &[emit::vm_ready(id, &workspace)])
                                .await?;
                            return Ok(Ready::Idle);
                        }
                    }
                    let idle = ::sqlx::query(sql::READY_VM_TO_IDLE)
                        .bind(&vm)
                        .bind(now)
                        .execute(&mut *conn)
                        .await?;
                    if idle.rows_affected() == 1 {
                        Self::append_events_on(conn, tenant_id, &[emit::vm_ready(id, &workspace)])
                            .await?;
                        Ok(Ready::Idle)
                    } else {
                        Ok(Ready::Gone)
                    }
                }

                async fn release_vm_tx(
                    conn: &mut Conn,
                    id: VmId,
                    holder: Option<AgentId>,
                    to_idle: bool,
                ) -> Result<bool> {
                    let vm = id.to_string();
                    let agent = holder.map(|a| a.to_string());
                    let to = if to_idle {
                        VmState::Idle
                    } else {
                        VmState::Draining
                    };
                    let now = now_millis();
                    // Compare-and-set on state and holder: if the VM changed
                    // hands since the caller looked, nothing happens.
                    let released: Option<(String, String)> = ::sqlx::query_as(sql::RELEASE_VM)
                        .bind(&vm)
                        .bind(to.as_str())
                        .bind(now)
                        .bind(agent.as_deref())
                        .fetch_optional(&mut *conn)
                        .await?;
                    let Some((tenant, workspace)) = released else {
                        return Ok(false);
                    };
                    if let Some(agent) = agent {
                        ::sqlx::query(sql::FORGET_AGENT_VM.as_str())
                            .bind(&agent)
                            .bind(&vm)
                            .bind(now)
                            .execute(&mut *conn)
                            .await?;
                    }
                    let tenant = sql::parse::<TenantId>("tenant id", &tenant)?;
                    let event = emit::vm_returned(id, &workspace, holder, to);
                    Self::append_events_on(conn, tenant, &[event]).await?;
                    Ok(true)
                }

                /// The parent check of [`Store::spawn_agent`] (inside its
                /// transaction): the parent is an active agent of the
                /// same tenant and owner.
                async fn check_parent(conn: &mut Conn, agent: &NewAgent) -> Result<()> {
                    let Some(parent) = agent.parent_id else {
                        return Ok(());
                    };
                    let row = ::sqlx::query_as::<_, sql::AgentRow>(Self::SELECT_PARENT_FOR_SPAWN)
                        .bind(agent.tenant_id.to_string())
                        .bind(parent.to_string())
                        .fetch_optional(&mut *conn)
                        .await?;
                    let bad = |problem| StoreError::BadParent { parent, problem };
                    let Some(row) = row else {
                        return Err(bad(ParentProblem::NotFound));
                    };
                    let record: AgentRecord = row.try_into()?;
                    if record.owner_id != agent.owner_id {
                        return Err(bad(ParentProblem::OtherOwner(record.owner_name)));
                    }
                    if !AgentPhase::ACTIVE.contains(&record.phase) {
                        return Err(bad(ParentProblem::Terminal(record.phase)));
                    }
                    Ok(())
                }

                /// The checks and the delete of [`Store::delete_identity`]
                /// (inside its transaction).
                async fn delete_identity_tx(
                    conn: &mut Conn,
                    tenant: TenantId,
                    name: &str,
                    ceiling: Role,
                ) -> Result<Identity> {
                    let tenant_id = tenant.to_string();
                    // Serializes deletes per tenant (PostgreSQL; SQLite's
                    // write transaction is exclusive): the count below sees
                    // every delete that committed before.
                    if let Some(lock) = Self::LOCK_TENANT {
                        ::sqlx::query(lock)
                            .bind(&tenant_id)
                            .execute(&mut *conn)
                            .await?;
                    }
                    let identities: Vec<Identity> = sql::decode_all(
                        ::sqlx::query_as::<_, sql::IdentityRow>(sql::LIST_IDENTITIES)
                            .bind(&tenant_id)
                            .fetch_all(&mut *conn)
                            .await?,
                    )?;
                    let Some(identity) = identities.iter().find(|i| i.name == name).cloned() else {
                        return Err(StoreError::NotFound(format!("identity {name:?}")));
                    };
                    let refused = |refusal| StoreError::IdentityRefused {
                        name: name.to_owned(),
                        refusal,
                    };
                    if identity.role > ceiling {
                        return Err(refused(IdentityRefusal::AboveCeiling {
                            role: identity.role,
                            ceiling,
                        }));
                    }
                    let manages =
                        |r: Role| r.allows(::hearth_core::rbac::Permission::IdentityUpdate);
                    if manages(identity.role)
                        && !identities
                            .iter()
                            .any(|i| i.id != identity.id && manages(i.role))
                    {
                        return Err(refused(IdentityRefusal::LastManager));
                    }
                    ::sqlx::query(sql::DELETE_IDENTITY)
                        .bind(&tenant_id)
                        .bind(name)
                        .execute(&mut *conn)
                        .await?;
                    Ok(identity)
                }

                /// The checks and the insert of [`Store::create_token`]
                /// (inside its transaction).
                async fn create_token_tx(
                    conn: &mut Conn,
                    tenant: TenantId,
                    identity_name: &str,
                    token: &NewToken,
                    ceiling: Role,
                ) -> Result<()> {
                    let identity: Identity =
                        ::sqlx::query_as::<_, sql::IdentityRow>(sql::GET_IDENTITY)
                            .bind(tenant.to_string())
                            .bind(identity_name)
                            .fetch_optional(&mut *conn)
                            .await?
                            .ok_or_else(|| {
                                StoreError::NotFound(format!("identity {identity_name:?}"))
                            })?
                            .try_into()?;
                    if identity.role > ceiling {
                        return Err(StoreError::IdentityRefused {
                            name: identity_name.to_owned(),
                            refusal: IdentityRefusal::AboveCeiling {
                                role: identity.role,
                                ceiling,
                            },
                        });
                    }
                    ::sqlx::query(sql::INSERT_TOKEN)
                        .bind(token.id.to_string())
                        .bind(identity.id.to_string())
                        .bind(token.secret_sha256.as_slice())
                        .bind(token.expires_at)
                        .bind(now_millis())
                        .execute(&mut *conn)
                        .await
                        .on_unique(|| token_exists(token.id))
                        // Deleted meanwhile (PostgreSQL, READ COMMITTED).
                        .on_foreign_key(|| {
                            StoreError::NotFound(format!("identity {identity_name:?}"))
                        })?;
                    Ok(())
                }

                /// The developer cap check of [`Store::create_agent`]
                /// (inside its transaction).
                async fn check_developer_cap(
                    conn: &mut Conn,
                    agent: &NewAgent,
                    developer_cap: Option<i32>,
                ) -> Result<()> {
                    let tenant = agent.tenant_id.to_string();
                    let owner = agent.owner_id.to_string();
                    if let Some(cap) = developer_cap.filter(|n| *n > 0)
                        && agent.owner_kind == IdentityKind::Developer
                        && agent.parent_id.is_none()
                    {
                        // Locks the owner's row (PostgreSQL): concurrent
                        // creates for one owner count one after the other.
                        let owner_row = ::sqlx::query(Self::SELECT_OWNER_FOR_CAP)
                            .bind(&tenant)
                            .bind(&owner)
                            .fetch_optional(&mut *conn)
                            .await?;
                        if owner_row.is_none() {
                            return Err(StoreError::NotFound(format!(
                                "identity {:?}",
                                agent.owner_name
                            )));
                        }
                        let active: i64 =
                            ::sqlx::query_scalar(sql::COUNT_ACTIVE_TOP_LEVEL_AGENTS.as_str())
                                .bind(&tenant)
                                .bind(&owner)
                                .fetch_one(&mut *conn)
                                .await?;
                        if active >= i64::from(cap) {
                            return Err(StoreError::LimitReached(i64::from(cap)));
                        }
                    }
                    Ok(())
                }

                /// Inserts a new agent: `running` on `vm` when one was
                /// claimed for it in the same transaction, else `queued`.
                async fn insert_agent_tx(
                    conn: &mut Conn,
                    agent: &NewAgent,
                    vm: Option<&VmRecord>,
                ) -> Result<AgentRecord> {
                    let tenant = agent.tenant_id.to_string();
                    let owner = agent.owner_id.to_string();
                    let now = now_millis();
                    let record = AgentRecord {
                        id: agent.id,
                        tenant_id: agent.tenant_id,
                        workspace: agent.workspace.clone(),
                        owner_id: agent.owner_id,
                        owner_name: agent.owner_name.clone(),
                        owner_kind: agent.owner_kind,
                        parent_id: agent.parent_id,
                        phase: if vm.is_some() {
                            AgentPhase::Running
                        } else {
                            AgentPhase::Queued
                        },
                        vm_id: vm.map(|v| v.id),
                        on_idle: agent.on_idle,
                        command: agent.command.clone(),
                        build: agent.build.clone(),
                        exit_code: None,
                        output: String::new(),
                        error: None,
                        resurrections: 0,
                        created_at: now,
                        updated_at: now,
                        queued_at: now,
                        started_at: vm.map(|_| now),
                        finished_at: None,
                    };
                    ::sqlx::query(sql::INSERT_AGENT)
                        .bind(record.id.to_string())
                        .bind(&tenant)
                        .bind(&record.workspace)
                        .bind(&owner)
                        .bind(&record.owner_name)
                        .bind(record.owner_kind.as_str())
                        .bind(record.parent_id.map(|p| p.to_string()))
                        .bind(record.phase.as_str())
                        .bind(record.vm_id.map(|v| v.to_string()))
                        .bind(record.on_idle.as_str())
                        .bind(record.command.as_deref())
                        .bind(&record.build)
                        .bind(record.exit_code)
                        .bind(&record.output)
                        .bind(record.error.as_deref())
                        .bind(record.resurrections)
                        .bind(record.created_at)
                        .bind(record.updated_at)
                        .bind(record.queued_at)
                        .bind(record.started_at)
                        .bind(record.finished_at)
                        .execute(&mut *conn)
                        .await
                        .on_unique(|| StoreError::AlreadyExists(format!("agent {}", agent.id)))
                        .on_foreign_key(|| {
                            StoreError::NotFound(format!("tenant {}", agent.tenant_id))
                        })?;
                    Ok(record)
                }

                async fn bootstrap_tx(
                    conn: &mut Conn,
                    tenant_name: &str,
                    identity_name: &str,
                    token: &NewToken,
                    pool_config: &serde_json::Value,
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
                        pool_config,
                    )
                    .await?;
                    Ok(Some(created))
                }

                /// A tenant, its pool config, its first (developer)
                /// identity and its token.
                async fn insert_tenant_tx(
                    conn: &mut Conn,
                    name: &str,
                    identity_name: &str,
                    role: Role,
                    token: &NewToken,
                    pool_config: &serde_json::Value,
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
                    ::sqlx::query(sql::INSERT_RESOURCE)
                        .bind(tenant.id.to_string())
                        .bind(Kind::PoolConfig.as_str())
                        .bind(hearth_core::resource::POOL_CONFIG_NAME)
                        .bind(pool_config.to_string())
                        .bind(1_i64)
                        .bind(tenant.created_at)
                        .bind(tenant.created_at)
                        .execute(&mut *conn)
                        .await?;
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
                    secrets: &$crate::secrets::Secrets,
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
                            .map(|row| row.decode(secrets.key()))
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
                                .bind(secrets.seal_spec(put.kind, put.spec))
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
                                .bind(secrets.seal_spec(put.kind, put.spec))
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

                /// [`Store::unlock_secrets`]'s transaction: the key check
                /// (made now if there is none), then every plaintext secret
                /// sealed. Returns how many resources it sealed.
                async fn unlock_secrets_tx(
                    conn: &mut Conn,
                    key: &$crate::secrets::SecretsKey,
                ) -> Result<u64> {
                    ::sqlx::query(sql::INSERT_SECRETS_CHECK)
                        .bind(key.check())
                        .bind(now_millis())
                        .execute(&mut *conn)
                        .await?;
                    let check: String = ::sqlx::query_scalar(sql::SELECT_SECRETS_CHECK)
                        .fetch_one(&mut *conn)
                        .await?;
                    if !key.verifies(&check) {
                        return Err(StoreError::SecretsLocked(
                            "the store's secrets were sealed with another secrets key than the one given".into(),
                        ));
                    }
                    let rows = ::sqlx::query_as::<_, sql::ResourceRow>(sql::LIST_SECRET_RESOURCES)
                        .fetch_all(&mut *conn)
                        .await?;
                    let mut sealed = 0;
                    for row in rows {
                        let (kind, name, text) = row.stored();
                        let kind: Kind = sql::parse("kind", kind)?;
                        let mut spec: ::serde_json::Value = ::serde_json::from_str(text).map_err(|e| {
                            StoreError::Corrupt(format!("spec of {kind} {name:?}: {e}"))
                        })?;
                        // Opening checks every sealed value against the key
                        // too: one sealed with another key refuses the start.
                        if !$crate::secrets::open_with(Some(key), kind, name, &mut spec)? {
                            continue;
                        }
                        let resealed = $crate::secrets::seal_with(key, kind, &spec);
                        ::sqlx::query(sql::RESEAL_RESOURCE)
                            .bind(row.tenant())
                            .bind(kind.as_str())
                            .bind(name)
                            .bind(resealed)
                            .bind(text)
                            .execute(&mut *conn)
                            .await?;
                        sealed += 1;
                    }
                    Ok(sealed)
                }

                async fn delete_resource_tx(
                    conn: &mut Conn,
                    tenant: TenantId,
                    kind: Kind,
                    name: &str,
                    secrets: &$crate::secrets::Secrets,
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
                    let record = record.decode(secrets.key())?;

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

                async fn change_token(&self) -> Result<$crate::ChangeToken> {
                    // Either order would do: each part only ever moves
                    // after a write has ended.
                    let writes = self.writes().get();
                    let database = self.database_mark().await?;
                    Ok($crate::ChangeToken::new(writes, database))
                }

                async fn bootstrap(
                    &self,
                    tenant_name: &str,
                    identity_name: &str,
                    token: &NewToken,
                    pool_config: &serde_json::Value,
                ) -> Result<Option<(Tenant, Identity)>> {
                    let mut tx = self.begin_write().await?;
                    let result =
                        Self::bootstrap_tx(&mut tx, tenant_name, identity_name, token, pool_config)
                            .await;
                    Self::finish(tx, result).await
                }

                async fn create_tenant(
                    &self,
                    name: &str,
                    admin_name: &str,
                    token: &NewToken,
                    pool_config: &serde_json::Value,
                ) -> Result<(Tenant, Identity)> {
                    let mut tx = self.begin_write().await?;
                    let result = Self::insert_tenant_tx(
                        &mut tx,
                        name,
                        admin_name,
                        Role::Admin,
                        token,
                        pool_config,
                    )
                    .await;
                    Self::finish(tx, result).await
                }

                async fn backfill_pool_configs(
                    &self,
                    pool_config: &serde_json::Value,
                ) -> Result<u64> {
                    let _written = self.written();
                    let now = now_millis();
                    let done = ::sqlx::query(sql::BACKFILL_POOL_CONFIGS)
                        .bind(pool_config.to_string())
                        .bind(now)
                        .bind(now)
                        .execute(self.writer())
                        .await?;
                    Ok(done.rows_affected())
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

                async fn delete_identity(
                    &self,
                    tenant: TenantId,
                    name: &str,
                    ceiling: Role,
                ) -> Result<Identity> {
                    let mut tx = self.begin_write().await?;
                    let result = Self::delete_identity_tx(&mut tx, tenant, name, ceiling).await;
                    Self::finish(tx, result).await
                }

                async fn create_token(
                    &self,
                    tenant: TenantId,
                    identity_name: &str,
                    token: &NewToken,
                    ceiling: Role,
                ) -> Result<()> {
                    let mut tx = self.begin_write().await?;
                    let result =
                        Self::create_token_tx(&mut tx, tenant, identity_name, token, ceiling).await;
                    Self::finish(tx, result).await
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
                        .map(|row| row.decode(self.secrets().key()))
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
                    let key = self.secrets().key();
                    rows.into_iter().map(|row| row.decode(key)).collect()
                }

                async fn secrets_sealed(&self) -> Result<bool> {
                    let check: Option<String> = ::sqlx::query_scalar(sql::SELECT_SECRETS_CHECK)
                        .fetch_optional(self.reader())
                        .await?;
                    Ok(check.is_some())
                }

                async fn unlock_secrets(&self, key: $crate::secrets::SecretsKey) -> Result<u64> {
                    let mut tx = self.begin_write().await?;
                    let result = Self::unlock_secrets_tx(&mut tx, &key).await;
                    let sealed = Self::finish(tx, result).await?;
                    self.secrets().install(key);
                    if sealed > 0 {
                        self.after_sealing().await?;
                    }
                    Ok(sealed)
                }

                async fn put_resource(&self, put: PutResource<'_>) -> Result<PutOutcome> {
                    let mut tx = self.begin_write().await?;
                    let result = async {
                        let outcome = Self::put_resource_tx(&mut tx, &put, self.secrets()).await?;
                        if outcome.changed {
                            let event = emit::resource_written(
                                put.kind,
                                put.name,
                                outcome.record.version,
                                outcome.created,
                                put.actor,
                            );
                            Self::append_events_on(&mut tx, put.tenant, &[event]).await?;
                        }
                        Ok(outcome)
                    }
                    .await;
                    Self::finish(tx, result).await
                }

                async fn delete_resource(
                    &self,
                    tenant: TenantId,
                    kind: Kind,
                    name: &str,
                    actor: Option<&str>,
                ) -> Result<ResourceRecord> {
                    let mut tx = self.begin_write().await?;
                    let result = async {
                        let record =
                            Self::delete_resource_tx(&mut tx, tenant, kind, name, self.secrets()).await?;
                        let event = emit::resource_deleted(kind, name, record.version, actor);
                        Self::append_events_on(&mut tx, tenant, &[event]).await?;
                        Ok(record)
                    }
                    .await;
                    Self::finish(tx, result).await
                }

                async fn join_node(&self, node: &NodeRecord) -> Result<NodeRecord> {
                    let _written = self.written();
                    let row: sql::NodeRow = ::sqlx::query_as(sql::JOIN_NODE)
                        .bind(node.id.to_string())
                        .bind(&node.name)
                        .bind(&node.address)
                        .bind(&node.ca_pem)
                        .bind(&node.credential_hash)
                        .bind(node.state.as_str())
                        .bind(node.capacity.drivers.join(","))
                        .bind(node.capacity.cpus)
                        .bind(node.capacity.memory_mib)
                        .bind(node.capacity.disk_mib)
                        .bind(node.capacity.vm_slots)
                        .bind(node.capacity.max_boots)
                        .bind(node.joined_at)
                        .bind(node.last_heartbeat)
                        .bind(node.updated_at)
                        .fetch_one(self.writer())
                        .await?;
                    row.try_into()
                }

                async fn get_node(&self, id: NodeId) -> Result<NodeRecord> {
                    let row: Option<sql::NodeRow> = ::sqlx::query_as(sql::GET_NODE)
                        .bind(id.to_string())
                        .fetch_optional(self.reader())
                        .await?;
                    row.ok_or_else(|| StoreError::NotFound(format!("node {id}")))?
                        .try_into()
                }

                async fn list_nodes(&self) -> Result<Vec<NodeRecord>> {
                    let rows: Vec<sql::NodeRow> = ::sqlx::query_as(sql::LIST_NODES)
                        .fetch_all(self.reader())
                        .await?;
                    rows.into_iter().map(NodeRecord::try_from).collect()
                }

                async fn node_heartbeat(
                    &self,
                    id: NodeId,
                    capacity: &NodeCapacity,
                ) -> Result<NodeRecord> {
                    let _written = self.written();
                    let row: Option<sql::NodeRow> = ::sqlx::query_as(sql::NODE_HEARTBEAT)
                        .bind(id.to_string())
                        .bind(now_millis())
                        .bind(capacity.drivers.join(","))
                        .bind(capacity.cpus)
                        .bind(capacity.memory_mib)
                        .bind(capacity.disk_mib)
                        .bind(capacity.vm_slots)
                        .bind(capacity.max_boots)
                        .fetch_optional(self.writer())
                        .await?;
                    row.ok_or_else(|| StoreError::NotFound(format!("node {id}")))?
                        .try_into()
                }

                async fn set_node_state(&self, name: &str, state: NodeState) -> Result<NodeRecord> {
                    let _written = self.written();
                    let row: Option<sql::NodeRow> = ::sqlx::query_as(sql::SET_NODE_STATE)
                        .bind(name)
                        .bind(state.as_str())
                        .bind(now_millis())
                        .fetch_optional(self.writer())
                        .await?;
                    row.ok_or_else(|| StoreError::NotFound(format!("node {name:?}")))?
                        .try_into()
                }

                async fn node_usage(&self) -> Result<Vec<NodeUsage>> {
                    let rows: Vec<(Option<String>, i64, i64, i64, i64)> =
                        ::sqlx::query_as(sql::NODE_USAGE.as_str())
                            .fetch_all(self.reader())
                            .await?;
                    rows.into_iter()
                        .map(|(node, vms, booting, cpus, memory_mib)| {
                            Ok(NodeUsage {
                                node: sql::parse_opt::<NodeId>("node id", node.as_deref())?,
                                vms,
                                booting,
                                cpus,
                                memory_mib,
                            })
                        })
                        .collect()
                }

                async fn list_node_vms(&self, node: NodeId) -> Result<Vec<VmRecord>> {
                    let rows: Vec<sql::VmRow> = ::sqlx::query_as(sql::LIST_NODE_VMS.as_str())
                        .bind(node.to_string())
                        .fetch_all(self.reader())
                        .await?;
                    rows.into_iter().map(VmRecord::try_from).collect()
                }

                async fn put_artifact(
                    &self,
                    digest: &str,
                    data: &mut (dyn ::tokio::io::AsyncRead + Send + Unpin),
                ) -> Result<Artifact> {
                    use ::sha2::Digest as _;
                    use ::tokio::io::AsyncReadExt as _;
                    if !$crate::is_artifact_digest(digest) {
                        return Err(StoreError::InvalidArtifact(format!(
                            "artifact digest {digest:?} is not a SHA-256 (64 lower-case hex characters)"
                        )));
                    }
                    if let Some(artifact) = self.get_artifact(digest).await? {
                        return Ok(artifact);
                    }
                    let _written = self.written();
                    let mut hasher = ::sha2::Sha256::new();
                    let mut chunk = vec![0u8; ARTIFACT_CHUNK_BYTES];
                    let (mut seq, mut size) = (0i64, 0i64);
                    loop {
                        let mut filled = 0;
                        while filled < chunk.len() {
                            let n = data.read(&mut chunk[filled..]).await.map_err(|e| {
                                StoreError::InvalidArtifact(format!(
                                    "artifact {digest}: cannot read its bytes: {e}"
                                ))
                            })?;
                            if n == 0 {
                                break;
                            }
                            filled += n;
                        }
                        if filled == 0 {
                            break;
                        }
                        hasher.update(&chunk[..filled]);
                        ::sqlx::query(sql::PUT_ARTIFACT_CHUNK)
                            .bind(digest)
                            .bind(seq)
                            .bind(&chunk[..filled])
                            .execute(self.writer())
                            .await?;
                        seq += 1;
                        size += filled as i64;
                        if filled < chunk.len() {
                            break;
                        }
                    }
                    let actual = ::hex::encode(hasher.finalize());
                    if actual != digest {
                        ::sqlx::query(sql::DROP_UNFINISHED_ARTIFACT)
                            .bind(digest)
                            .execute(self.writer())
                            .await?;
                        return Err(StoreError::InvalidArtifact(format!(
                            "artifact {digest}: its bytes hash to {actual}, not to the digest given"
                        )));
                    }
                    let mut tx = self.begin_write().await?;
                    let result = async {
                        ::sqlx::query(sql::DROP_ARTIFACT_TAIL)
                            .bind(digest)
                            .bind(seq)
                            .execute(&mut *tx)
                            .await?;
                        ::sqlx::query(sql::FINISH_ARTIFACT)
                            .bind(digest)
                            .bind(size)
                            .bind(seq)
                            .bind(now_millis())
                            .execute(&mut *tx)
                            .await?;
                        Ok(())
                    }
                    .await;
                    Self::finish(tx, result).await?;
                    self.get_artifact(digest).await?.ok_or_else(|| {
                        StoreError::Corrupt(format!("artifact {digest} vanished once written"))
                    })
                }

                async fn get_artifact(&self, digest: &str) -> Result<Option<Artifact>> {
                    let row: Option<(String, i64, i64, i64)> = ::sqlx::query_as(sql::GET_ARTIFACT)
                        .bind(digest)
                        .fetch_optional(self.reader())
                        .await?;
                    Ok(row.map(|(digest, size, chunks, created_at)| Artifact {
                        digest,
                        size,
                        chunks,
                        created_at,
                    }))
                }

                async fn read_artifact_chunk(&self, digest: &str, seq: i64) -> Result<Vec<u8>> {
                    let data: Option<Vec<u8>> = ::sqlx::query_scalar(sql::READ_ARTIFACT_CHUNK)
                        .bind(digest)
                        .bind(seq)
                        .fetch_optional(self.reader())
                        .await?;
                    data.ok_or_else(|| StoreError::NotFound(format!("chunk {seq} of artifact {digest}")))
                }

                async fn append_events(
                    &self,
                    tenant: TenantId,
                    events: &[$crate::NewEvent],
                ) -> Result<()> {
                    if events.is_empty() {
                        return Ok(());
                    }
                    let mut tx = self.begin_write().await?;
                    let result = Self::append_events_on(&mut tx, tenant, events).await;
                    Self::finish(tx, result).await
                }

                async fn list_events(
                    &self,
                    tenant: TenantId,
                    filter: &$crate::EventFilter,
                ) -> Result<Vec<$crate::EventRecord>> {
                    let limit = match filter.limit {
                        n if n <= 0 => $crate::EVENT_PAGE_MAX,
                        n => n.min($crate::EVENT_PAGE_MAX),
                    };
                    let mut query = sql::LIST_EVENTS.to_owned();
                    if !filter.kinds.is_empty() {
                        // Placeholders $4.. for the kinds, before ORDER BY.
                        let list: Vec<String> =
                            (0..filter.kinds.len()).map(|i| format!("${}", i + 4)).collect();
                        query = query.replace(
                            " ORDER BY",
                            &format!(" AND kind IN ({}) ORDER BY", list.join(", ")),
                        );
                    }
                    let mut q = ::sqlx::query_as::<_, sql::EventRow>(&query)
                        .bind(tenant.to_string())
                        .bind(filter.after.unwrap_or(0))
                        .bind(limit);
                    for kind in &filter.kinds {
                        q = q.bind(kind.as_str());
                    }
                    sql::decode_all(q.fetch_all(self.reader()).await?)
                }

                async fn prune_events(&self, before: $crate::Millis) -> Result<u64> {
                    let _written = self.written();
                    let done = ::sqlx::query(sql::PRUNE_EVENTS)
                        .bind(before)
                        .execute(self.writer())
                        .await?;
                    Ok(done.rows_affected())
                }

                fn name_replica(&self, replica: &str) {
                    self.set_replica_name(replica);
                }

                async fn lead(&self, tenants: &[TenantId]) -> Result<$crate::Leads> {
                    self.lead_tenants(tenants).await
                }

                async fn notify_wake(&self, tenant: Option<TenantId>) -> Result<()> {
                    self.send_wake(tenant).await
                }

                fn wakes(&self) -> ::tokio::sync::mpsc::UnboundedReceiver<$crate::Wake> {
                    self.listen_wakes()
                }

                async fn set_vm_task_owner(
                    &self,
                    id: VmId,
                    from: Option<&str>,
                    to: Option<&str>,
                ) -> Result<bool> {
                    let _written = self.written();
                    // Owners are never empty (replica ids), so '' stands
                    // for none on both sides of the comparison.
                    let done = ::sqlx::query(
                        "UPDATE vms SET task_owner = $1 \
                         WHERE id = $2 AND COALESCE(task_owner, '') = COALESCE($3, '')",
                    )
                    .bind(to)
                    .bind(id.to_string())
                    .bind(from)
                    .execute(self.writer())
                    .await?;
                    Ok(done.rows_affected() == 1)
                }

                async fn insert_vm(&self, vm: &VmRecord) -> Result<()> {
                    if vm.state != VmState::Booting {
                        let _written = self.written();
                        return Self::insert_vm_on(self.writer(), vm).await;
                    }
                    let mut tx = self.begin_write().await?;
                    let result = async {
                        Self::insert_vm_on(&mut *tx, vm).await?;
                        let event = emit::vm_booting(vm.id, &vm.workspace, vm.reserved_for, vm.test);
                        Self::append_events_on(&mut tx, vm.tenant_id, &[event]).await
                    }
                    .await;
                    Self::finish(tx, result).await
                }

                async fn insert_vm_within_cap(
                    &self,
                    vm: &VmRecord,
                    max_vms: i64,
                ) -> Result<InsertVm> {
                    let mut tx = self.begin_write().await?;
                    if Self::LOCK_TENANT.is_none() && vm.reserved_for.is_none() && vm.node_id.is_none() {
                        // Every write is exclusive here: the count and the
                        // insert go as one statement, then its event.
                        // (`reserved_for` is None here.)
                        let result = async {
                            let done =
                                Self::bind_vm(::sqlx::query(sql::INSERT_VM_WITHIN_CAP.as_str()), vm)
                                    .bind(max_vms)
                                    .execute(&mut *tx)
                                    .await
                                    .on_unique(|| StoreError::AlreadyExists(format!("VM {}", vm.id)))
                                    .on_foreign_key(|| {
                                        StoreError::NotFound(format!("tenant {}", vm.tenant_id))
                                    })?;
                            if done.rows_affected() != 1 {
                                return Ok(InsertVm::AtCapacity);
                            }
                            let event = emit::vm_booting(vm.id, &vm.workspace, None, vm.test);
                            Self::append_events_on(&mut tx, vm.tenant_id, &[event]).await?;
                            Ok(InsertVm::Inserted)
                        }
                        .await;
                        return Self::settle(tx, result, |r| *r == InsertVm::Inserted).await;
                    }
                    let result = Self::insert_vm_within_cap_tx(&mut tx, vm, max_vms).await;
                    Self::settle(tx, result, |r| *r == InsertVm::Inserted).await
                }

                async fn claim_idle_vm(
                    &self,
                    tenant: TenantId,
                    workspace: &str,
                    agent: AgentId,
                ) -> Result<Option<VmRecord>> {
                    let mut tx = self.begin_write().await?;
                    let result = async {
                        let Some(vm) = Self::claim_on(&mut *tx, tenant, workspace, agent).await? else {
                            return Ok(None);
                        };
                        let event = emit::vm_assigned(vm.id, workspace, agent);
                        Self::append_events_on(&mut tx, tenant, &[event]).await?;
                        Ok(Some(vm))
                    }
                    .await;
                    Self::settle(tx, result, Option::is_some).await
                }

                async fn assign_idle_vm(
                    &self,
                    tenant: TenantId,
                    workspace: &str,
                    agent: AgentId,
                ) -> Result<Option<VmRecord>> {
                    let mut tx = self.begin_write().await?;
                    let result = Self::assign_idle_vm_tx(&mut tx, tenant, workspace, agent).await;
                    Self::settle(tx, result, Option::is_some).await
                }

                async fn get_vm(&self, id: VmId) -> Result<VmRecord> {
                    ::sqlx::query_as::<_, sql::VmRow>(sql::GET_VM)
                        .bind(id.to_string())
                        .fetch_optional(self.reader())
                        .await?
                        .ok_or_else(|| StoreError::NotFound(format!("VM {id}")))?
                        .try_into()
                }

                async fn list_vms(
                    &self,
                    tenant: TenantId,
                    include_dead: bool,
                ) -> Result<Vec<VmRecord>> {
                    let statement = if include_dead {
                        sql::LIST_VMS
                    } else {
                        sql::LIST_LIVE_VMS_OF_TENANT.as_str()
                    };
                    let rows = ::sqlx::query_as::<_, sql::VmRow>(statement)
                        .bind(tenant.to_string())
                        .fetch_all(self.reader())
                        .await?;
                    sql::decode_all(rows)
                }

                async fn list_live_vms(&self) -> Result<Vec<VmRecord>> {
                    let rows = ::sqlx::query_as::<_, sql::VmRow>(sql::LIST_LIVE_VMS.as_str())
                        .fetch_all(self.reader())
                        .await?;
                    sql::decode_all(rows)
                }

                async fn set_vm_state(
                    &self,
                    id: VmId,
                    from: &[VmState],
                    to: VmState,
                    error: Option<&str>,
                ) -> Result<bool> {
                    if from.is_empty() {
                        return Ok(false);
                    }
                    if !emit::vm_state_has_event(to) {
                        let _written = self.written();
                        let statement = sql::set_vm_state(from, to);
                        let done = ::sqlx::query(&statement)
                            .bind(id.to_string())
                            .bind(to.as_str())
                            .bind(now_millis())
                            .bind(error.map($crate::storable_text))
                            .execute(self.writer())
                            .await?;
                        return Ok(done.rows_affected() == 1);
                    }
                    let mut tx = self.begin_write().await?;
                    let result = async {
                        let statement = sql::set_vm_state_returning(from, to);
                        let changed: Option<(String, String)> = ::sqlx::query_as(&statement)
                            .bind(id.to_string())
                            .bind(to.as_str())
                            .bind(now_millis())
                            .bind(error.map($crate::storable_text))
                            .fetch_optional(&mut *tx)
                            .await?;
                        let Some((tenant, workspace)) = changed else {
                            return Ok(false);
                        };
                        let tenant = sql::parse::<TenantId>("tenant id", &tenant)?;
                        if let Some(event) = emit::vm_state(id, &workspace, to, error) {
                            Self::append_events_on(&mut tx, tenant, &[event]).await?;
                        }
                        Ok(true)
                    }
                    .await;
                    Self::settle(tx, result, |changed| *changed).await
                }

                async fn vm_ready(&self, id: VmId) -> Result<Ready> {
                    let mut tx = self.begin_write().await?;
                    let result = async {
                        // Most booted VMs were reserved for no agent: one
                        // statement and its event. Else (or gone) the rest
                        // of the transaction decides.
                        let idle: Option<(String, String)> =
                            ::sqlx::query_as(sql::READY_UNRESERVED_VM_TO_IDLE)
                                .bind(id.to_string())
                                .bind(now_millis())
                                .fetch_optional(&mut *tx)
                                .await?;
                        if let Some((tenant, workspace)) = idle {
                            let tenant = sql::parse::<TenantId>("tenant id", &tenant)?;
                            Self::append_events_on(&mut tx, tenant, &[emit::vm_ready(id, &workspace)])
                                .await?;
                            return Ok(Ready::Idle);
                        }
                        Self::vm_ready_tx(&mut tx, id).await
                    }
                    .await;
                    Self::settle(tx, result, |r| *r != Ready::Gone).await
                }

                async fn release_vm(
                    &self,
                    id: VmId,
                    holder: Option<AgentId>,
                    to_idle: bool,
                ) -> Result<bool> {
                    let mut tx = self.begin_write().await?;
                    let result = Self::release_vm_tx(&mut tx, id, holder, to_idle).await;
                    Self::settle(tx, result, |changed| *changed).await
                }

                async fn mark_stale(
                    &self,
                    tenant: TenantId,
                    workspace: &str,
                    env_version: i64,
                    image_version: i64,
                    setup_digest: &str,
                ) -> Result<u64> {
                    let _written = self.written();
                    let done = ::sqlx::query(sql::MARK_STALE.as_str())
                        .bind(tenant.to_string())
                        .bind(workspace)
                        .bind(env_version)
                        .bind(image_version)
                        .bind(setup_digest)
                        .execute(self.writer())
                        .await?;
                    Ok(done.rows_affected())
                }

                async fn create_agent(
                    &self,
                    agent: &NewAgent,
                    developer_cap: Option<i32>,
                ) -> Result<AgentRecord> {
                    let mut tx = self.begin_write().await?;
                    let result =
                        match Self::check_developer_cap(&mut tx, agent, developer_cap).await {
                            Ok(()) => Self::insert_agent_tx(&mut tx, agent, None).await,
                            Err(e) => Err(e),
                        };
                    let result = match result {
                        Ok(record) => {
                            let event = emit::agent_phase(
                                record.id,
                                &record.workspace,
                                None,
                                AgentPhase::Queued,
                                None,
                            );
                            Self::append_events_on(&mut tx, record.tenant_id, &[event])
                                .await
                                .map(|()| record)
                        }
                        Err(e) => Err(e),
                    };
                    Self::finish(tx, result).await
                }

                async fn spawn_agent(
                    &self,
                    agent: &NewAgent,
                    developer_cap: Option<i32>,
                ) -> Result<AgentRecord> {
                    let mut tx = self.begin_write().await?;
                    let result = async {
                        Self::check_parent(&mut tx, agent).await?;
                        Self::check_developer_cap(&mut tx, agent, developer_cap).await?;
                        // The VM first: the agent row is then written once,
                        // already `running` on it (or `queued`).
                        let vm =
                            Self::claim_on(&mut *tx, agent.tenant_id, &agent.workspace, agent.id)
                                .await?;
                        let record = Self::insert_agent_tx(&mut tx, agent, vm.as_ref()).await?;
                        let mut events = Vec::with_capacity(2);
                        if let Some(vm) = &vm {
                            events.push(emit::vm_assigned(vm.id, &agent.workspace, agent.id));
                        }
                        events.push(emit::agent_phase(
                            agent.id,
                            &agent.workspace,
                            None,
                            record.phase,
                            record.vm_id,
                        ));
                        Self::append_events_on(&mut tx, agent.tenant_id, &events).await?;
                        Ok(record)
                    }
                    .await;
                    Self::finish(tx, result).await
                }

                async fn get_agent(&self, tenant: TenantId, id: AgentId) -> Result<AgentRecord> {
                    ::sqlx::query_as::<_, sql::AgentRow>(sql::GET_AGENT)
                        .bind(tenant.to_string())
                        .bind(id.to_string())
                        .fetch_optional(self.reader())
                        .await?
                        .ok_or_else(|| StoreError::NotFound(format!("agent {id}")))?
                        .try_into()
                }

                async fn list_agents(
                    &self,
                    tenant: TenantId,
                    filter: &AgentFilter,
                ) -> Result<Vec<AgentRecord>> {
                    let statement = sql::list_agents(&filter.phases);
                    let rows = ::sqlx::query_as::<_, sql::AgentRow>(&statement)
                        .bind(tenant.to_string())
                        .bind(filter.workspace.as_deref())
                        .bind(filter.owner_id.map(|o| o.to_string()))
                        .fetch_all(self.reader())
                        .await?;
                    sql::decode_all(rows)
                }

                async fn list_queued_agents(&self, tenant: TenantId) -> Result<Vec<AgentRecord>> {
                    let rows = ::sqlx::query_as::<_, sql::AgentRow>(sql::LIST_QUEUED_AGENTS)
                        .bind(tenant.to_string())
                        .fetch_all(self.reader())
                        .await?;
                    sql::decode_all(rows)
                }

                async fn transition_agent(
                    &self,
                    tenant: TenantId,
                    id: AgentId,
                    from: &[AgentPhase],
                    to: AgentPhase,
                    update: &AgentUpdate,
                ) -> Result<AgentRecord> {
                    if !from.is_empty() {
                        let mut tx = self.begin_write().await?;
                        let result: Result<Option<AgentRecord>> = async {
                            // The phase it leaves, for the event (locked, so
                            // the compare-and-set below sees the same one).
                            let select = format!("{}{}", sql::SELECT_AGENT_PHASE, Self::ROW_LOCK);
                            let before: Option<(String, String)> = ::sqlx::query_as(&select)
                                .bind(tenant.to_string())
                                .bind(id.to_string())
                                .fetch_optional(&mut *tx)
                                .await?;
                            let Some((old, _)) = before else {
                                return Ok(None);
                            };
                            let old: AgentPhase = sql::parse("agent phase", &old)?;
                            if !from.contains(&old) {
                                return Ok(None);
                            }
                            let statement = sql::transition_agent(from, to);
                            let changed = ::sqlx::query_as::<_, sql::AgentRow>(&statement)
                                .bind(tenant.to_string())
                                .bind(id.to_string())
                                .bind(now_millis())
                                .bind(update.exit_code)
                                .bind(update.output.as_deref().map($crate::storable_text))
                                .bind(update.error.as_deref().map($crate::storable_text))
                                .fetch_optional(&mut *tx)
                                .await?;
                            let Some(row) = changed else {
                                return Ok(None);
                            };
                            let record: AgentRecord = row.try_into()?;
                            let event = emit::with_outcome(
                                emit::agent_phase(id, &record.workspace, Some(old), to, record.vm_id),
                                record.exit_code.filter(|_| to.is_terminal()),
                                record.error.as_deref().filter(|_| to.is_terminal()),
                            );
                            Self::append_events_on(&mut tx, tenant, &[event]).await?;
                            Ok(Some(record))
                        }
                        .await;
                        if let Some(record) = Self::settle(tx, result, Option::is_some).await? {
                            return Ok(record);
                        }
                    }
                    // Nothing changed: a missing agent is `NotFound`, one in
                    // another phase a `Conflict`. This read decides only
                    // which error to answer; it writes nothing.
                    self.get_agent(tenant, id).await?;
                    Err(StoreError::Conflict(format!("agent {id}")))
                }

                async fn get_pool_state(&self, tenant: TenantId) -> Result<PoolState> {
                    let stopped: Option<i64> = ::sqlx::query_scalar(sql::GET_POOL_STATE)
                        .bind(tenant.to_string())
                        .fetch_optional(self.reader())
                        .await?;
                    Ok(match stopped {
                        Some(stopped) => PoolState {
                            stopped: sql::flag("pool stopped flag", stopped)?,
                        },
                        None => PoolState::default(),
                    })
                }

                async fn set_pool_stopped(&self, tenant: TenantId, stopped: bool) -> Result<()> {
                    let _written = self.written();
                    ::sqlx::query(sql::PUT_POOL_STATE)
                        .bind(tenant.to_string())
                        .bind(sql::store_flag(stopped))
                        .bind(now_millis())
                        .execute(self.writer())
                        .await
                        .on_foreign_key(|| StoreError::NotFound(format!("tenant {tenant}")))?;
                    Ok(())
                }

                async fn list_workspace_states(
                    &self,
                    tenant: TenantId,
                ) -> Result<Vec<WorkspaceState>> {
                    let rows =
                        ::sqlx::query_as::<_, sql::WorkspaceStateRow>(sql::LIST_WORKSPACE_STATES)
                            .bind(tenant.to_string())
                            .fetch_all(self.reader())
                            .await?;
                    sql::decode_all(rows)
                }

                async fn get_workspace_state(
                    &self,
                    tenant: TenantId,
                    workspace: &str,
                ) -> Result<Option<WorkspaceState>> {
                    ::sqlx::query_as::<_, sql::WorkspaceStateRow>(sql::GET_WORKSPACE_STATE)
                        .bind(tenant.to_string())
                        .bind(workspace)
                        .fetch_optional(self.reader())
                        .await?
                        .map(WorkspaceState::try_from)
                        .transpose()
                }

                async fn put_workspace_state(
                    &self,
                    tenant: TenantId,
                    state: &WorkspaceState,
                ) -> Result<()> {
                    let mut tx = self.begin_write().await?;
                    let result = async {
                        let select = format!("{}{}", sql::GET_WORKSPACE_STATE, Self::ROW_LOCK);
                        let old = ::sqlx::query_as::<_, sql::WorkspaceStateRow>(&select)
                            .bind(tenant.to_string())
                            .bind(&state.workspace)
                            .fetch_optional(&mut *tx)
                            .await?
                            .map(WorkspaceState::try_from)
                            .transpose()?;
                        ::sqlx::query(sql::PUT_WORKSPACE_STATE)
                            .bind(tenant.to_string())
                            .bind(&state.workspace)
                            .bind(state.consecutive_failures)
                            .bind(state.backoff_until)
                            .bind(sql::store_flag(state.hard_limited))
                            .bind(state.last_error.as_deref().map($crate::storable_text))
                            .bind(&state.config_fingerprint)
                            .execute(&mut *tx)
                            .await
                            .on_foreign_key(|| StoreError::NotFound(format!("tenant {tenant}")))?;
                        if let Some(event) = emit::workspace_state(old.as_ref(), state) {
                            Self::append_events_on(&mut tx, tenant, &[event]).await?;
                        }
                        Ok(())
                    }
                    .await;
                    Self::finish(tx, result).await
                }

                async fn register_build(&self, id: &str) -> Result<Build> {
                    let _written = self.written();
                    ::sqlx::query(sql::INSERT_BUILD)
                        .bind(id)
                        .bind(now_millis())
                        .execute(self.writer())
                        .await?;
                    // Builds are never deleted: the row is there now.
                    ::sqlx::query_as::<_, sql::BuildRow>(sql::GET_BUILD)
                        .bind(id)
                        .fetch_one(self.writer())
                        .await?
                        .try_into()
                }

                async fn retire_build(&self, id: &str) -> Result<Build> {
                    let _written = self.written();
                    ::sqlx::query_as::<_, sql::BuildRow>(sql::RETIRE_BUILD)
                        .bind(id)
                        .bind(now_millis())
                        .fetch_optional(self.writer())
                        .await?
                        .ok_or_else(|| StoreError::NotFound(format!("build {id:?}")))?
                        .try_into()
                }

                async fn list_builds(&self) -> Result<Vec<Build>> {
                    let rows = ::sqlx::query_as::<_, sql::BuildRow>(sql::LIST_BUILDS)
                        .fetch_all(self.reader())
                        .await?;
                    sql::decode_all(rows)
                }

                async fn create_instance(&self, instance: &InstanceRecord) -> Result<()> {
                    let _written = self.written();
                    ::sqlx::query(sql::INSERT_INSTANCE)
                        .bind(instance.id.to_string())
                        .bind(instance.tenant_id.to_string())
                        .bind(&instance.workspace)
                        .bind(instance.vm_id.to_string())
                        .bind(sql::store_flag(instance.test))
                        .bind(instance.status.as_str())
                        .bind(instance.summary.as_ref().map(|s| s.to_string()))
                        .bind(instance.steps.to_string())
                        .bind(instance.created_at)
                        .bind(instance.updated_at)
                        .bind(instance.finished_at)
                        .execute(self.writer())
                        .await
                        .on_unique(|| {
                            StoreError::AlreadyExists(format!("instance {}", instance.id))
                        })
                        .on_foreign_key(|| {
                            StoreError::NotFound(format!("tenant {}", instance.tenant_id))
                        })?;
                    Ok(())
                }

                async fn update_instance(
                    &self,
                    id: InstanceId,
                    status: InstanceStatus,
                    steps: &::serde_json::Value,
                    summary: Option<&::serde_json::Value>,
                ) -> Result<()> {
                    let mut tx = self.begin_write().await?;
                    let result = async {
                        let gone = || StoreError::NotFound(format!("instance {id}"));
                        let select = format!("{}{}", sql::SELECT_INSTANCE_BEFORE, Self::ROW_LOCK);
                        let before: Option<(String, String, String, String, String)> =
                            ::sqlx::query_as(&select)
                                .bind(id.to_string())
                                .fetch_optional(&mut *tx)
                                .await?;
                        let (tenant, workspace, vm, old_status, old_steps) =
                            before.ok_or_else(gone)?;
                        let now = now_millis();
                        let finished_at = (status != InstanceStatus::Provisioning).then_some(now);
                        let done = ::sqlx::query(sql::UPDATE_INSTANCE)
                            .bind(id.to_string())
                            .bind(status.as_str())
                            .bind(steps.to_string())
                            .bind(summary.map(|s| s.to_string()))
                            .bind(now)
                            .bind(finished_at)
                            .execute(&mut *tx)
                            .await?;
                        if done.rows_affected() == 0 {
                            return Err(gone());
                        }
                        let old_steps: ::serde_json::Value =
                            ::serde_json::from_str(&old_steps).unwrap_or_default();
                        let before = emit::RunBefore {
                            id,
                            workspace: &workspace,
                            vm: &vm,
                            status: sql::parse("instance status", &old_status)?,
                            steps: &old_steps,
                        };
                        let events = emit::instance_update(&before, status, steps, summary);
                        let tenant = sql::parse::<TenantId>("tenant id", &tenant)?;
                        Self::append_events_on(&mut tx, tenant, &events).await
                    }
                    .await;
                    Self::finish(tx, result).await
                }

                async fn get_instance(
                    &self,
                    tenant: TenantId,
                    id: InstanceId,
                ) -> Result<InstanceRecord> {
                    ::sqlx::query_as::<_, sql::InstanceRow>(sql::GET_INSTANCE)
                        .bind(tenant.to_string())
                        .bind(id.to_string())
                        .fetch_optional(self.reader())
                        .await?
                        .ok_or_else(|| StoreError::NotFound(format!("instance {id}")))?
                        .try_into()
                }

                async fn warm_pool_counts(
                    &self,
                    tenant: TenantId,
                    workspace: &str,
                    failed_since: $crate::Millis,
                ) -> Result<WarmPoolCounts> {
                    let (ready, provisioning, failed): (i64, i64, i64) =
                        ::sqlx::query_as(sql::WARM_POOL_COUNTS)
                            .bind(tenant.to_string())
                            .bind(workspace)
                            .bind(failed_since)
                            .fetch_one(self.reader())
                            .await?;
                    Ok(WarmPoolCounts {
                        ready,
                        provisioning,
                        failed,
                    })
                }

                async fn list_instances(
                    &self,
                    tenant: TenantId,
                    filter: &InstanceFilter,
                ) -> Result<Vec<InstanceRecord>> {
                    let rows = ::sqlx::query_as::<_, sql::InstanceRow>(sql::LIST_INSTANCES)
                        .bind(tenant.to_string())
                        .bind(filter.workspace.as_deref())
                        .bind(filter.status.map(InstanceStatus::as_str))
                        .bind(filter.test.map(sql::store_flag))
                        .bind(filter.vm.map(|v| v.to_string()))
                        .bind(sql::instance_limit(filter))
                        .fetch_all(self.reader())
                        .await?;
                    sql::decode_all(rows)
                }

                async fn create_bake(&self, bake: &BakeRecord) -> Result<()> {
                    let _written = self.written();
                    ::sqlx::query(sql::INSERT_BAKE)
                        .bind(&bake.id)
                        .bind(bake.tenant_id.to_string())
                        .bind(&bake.image)
                        .bind(bake.state.as_str())
                        .bind(&bake.requested_by)
                        .bind(bake.recipe.to_string())
                        .bind($crate::storable_text(&bake.step))
                        .bind($crate::storable_text(&bake.log))
                        .bind(bake.error.as_deref().map($crate::storable_text))
                        .bind(bake.bake)
                        .bind(bake.created_at)
                        .bind(bake.updated_at)
                        .bind(bake.finished_at)
                        .execute(self.writer())
                        .await
                        .on_unique(|| {
                            StoreError::Conflict(format!(
                                "a bake of image {:?} is queued or running already",
                                bake.image
                            ))
                        })
                        .on_foreign_key(|| {
                            StoreError::NotFound(format!("tenant {}", bake.tenant_id))
                        })?;
                    Ok(())
                }

                async fn update_bake(&self, id: &str, update: BakeUpdate<'_>) -> Result<()> {
                    let _written = self.written();
                    let done = ::sqlx::query(sql::UPDATE_BAKE)
                        .bind(id)
                        .bind(update.state.as_str())
                        .bind($crate::storable_text(update.step))
                        .bind($crate::storable_text(update.append_log))
                        .bind(update.error.map($crate::storable_text))
                        .bind(update.bake)
                        .bind(now_millis())
                        .execute(self.writer())
                        .await?;
                    if done.rows_affected() == 0 {
                        return Err(StoreError::NotFound(format!("running bake {id}")));
                    }
                    Ok(())
                }

                async fn get_bake(&self, tenant: TenantId, id: &str) -> Result<BakeRecord> {
                    ::sqlx::query_as::<_, sql::BakeRow>(sql::GET_BAKE)
                        .bind(tenant.to_string())
                        .bind(id)
                        .fetch_optional(self.reader())
                        .await?
                        .ok_or_else(|| StoreError::NotFound(format!("bake {id:?}")))?
                        .try_into()
                }

                async fn list_bakes(
                    &self,
                    tenant: TenantId,
                    image: &str,
                ) -> Result<Vec<BakeRecord>> {
                    let rows = ::sqlx::query_as::<_, sql::BakeRow>(sql::LIST_BAKES)
                        .bind(tenant.to_string())
                        .bind(image)
                        .fetch_all(self.reader())
                        .await?;
                    sql::decode_all(rows)
                }

                async fn fail_active_bakes(&self, reason: &str) -> Result<u64> {
                    let _written = self.written();
                    let done = ::sqlx::query(sql::FAIL_ACTIVE_BAKES)
                        .bind(reason)
                        .bind(now_millis())
                        .bind(format!("{reason}\n"))
                        .execute(self.writer())
                        .await?;
                    Ok(done.rows_affected())
                }

                // ---- pass status (reconcile passes)

                async fn put_reconcile_pass(
                    &self,
                    pass: &$crate::ReconcilePassRecord,
                ) -> Result<()> {
                    let _written = self.written();
                    ::sqlx::query(sql::PUT_RECONCILE_PASS)
                        .bind(pass.tenant_id.to_string())
                        .bind(&pass.replica)
                        .bind(pass.iteration)
                        .bind(pass.started_at)
                        .bind(pass.status.to_string())
                        .execute(self.writer())
                        .await?;
                    Ok(())
                }

                async fn get_reconcile_pass(
                    &self,
                    tenant: TenantId,
                ) -> Result<Option<$crate::ReconcilePassRecord>> {
                    ::sqlx::query_as::<_, sql::ReconcilePassRow>(sql::GET_RECONCILE_PASS)
                        .bind(tenant.to_string())
                        .fetch_optional(self.reader())
                        .await?
                        .map(TryInto::try_into)
                        .transpose()
                }

                // ---- dashboard sessions (H4)

                async fn create_ui_session(
                    &self,
                    session: &$crate::NewUiSession,
                ) -> Result<()> {
                    let _written = self.written();
                    let now = now_millis();
                    ::sqlx::query(sql::PRUNE_UI_SESSIONS)
                        .bind(now)
                        .execute(self.writer())
                        .await?;
                    let done = ::sqlx::query(sql::INSERT_UI_SESSION)
                        .bind(session.id_sha256.as_slice())
                        .bind(session.token.to_string())
                        .bind(now)
                        .bind(session.expires_at)
                        .bind(session.csrf_token.as_str())
                        .execute(self.writer())
                        .await?;
                    if done.rows_affected() == 0 {
                        return Err(StoreError::NotFound("token".into()));
                    }
                    Ok(())
                }

                async fn find_ui_session(
                    &self,
                    id_sha256: &[u8],
                ) -> Result<Option<$crate::UiSession>> {
                    ::sqlx::query_as::<_, sql::UiSessionRow>(sql::FIND_UI_SESSION)
                        .bind(id_sha256)
                        .bind(now_millis())
                        .fetch_optional(self.reader())
                        .await?
                        .map($crate::UiSession::try_from)
                        .transpose()
                }

                async fn delete_ui_session(&self, id_sha256: &[u8]) -> Result<bool> {
                    let _written = self.written();
                    let done = ::sqlx::query(sql::DELETE_UI_SESSION)
                        .bind(id_sha256)
                        .execute(self.writer())
                        .await?;
                    Ok(done.rows_affected() > 0)
                }

                // ---- webhooks

                async fn create_webhook(
                    &self,
                    webhook: &$crate::NewWebhook,
                ) -> Result<$crate::WebhookRecord> {
                    let _written = self.written();
                    let secret = match self.secrets().key() {
                        Some(key) => key.seal(&webhook.secret),
                        None => webhook.secret.clone(),
                    };
                    let row = ::sqlx::query_as::<_, sql::WebhookRow>(sql::INSERT_WEBHOOK)
                        .bind(::uuid::Uuid::new_v4().simple().to_string())
                        .bind(webhook.tenant_id.to_string())
                        .bind(&webhook.name)
                        .bind(&webhook.url)
                        .bind(secret)
                        .bind(sql::kinds_text(&webhook.kinds))
                        .bind(now_millis())
                        .fetch_one(self.writer())
                        .await
                        .on_unique(|| {
                            StoreError::AlreadyExists(format!("webhook {:?}", webhook.name))
                        })?;
                    row.decode(self.secrets().key())
                }

                async fn list_webhooks(&self, tenant: TenantId) -> Result<Vec<$crate::WebhookRecord>> {
                    let rows = ::sqlx::query_as::<_, sql::WebhookRow>(sql::LIST_WEBHOOKS)
                        .bind(tenant.to_string())
                        .fetch_all(self.reader())
                        .await?;
                    rows.into_iter().map(|r| r.decode(self.secrets().key())).collect()
                }

                async fn get_webhook(
                    &self,
                    tenant: TenantId,
                    name: &str,
                ) -> Result<Option<$crate::WebhookRecord>> {
                    ::sqlx::query_as::<_, sql::WebhookRow>(sql::GET_WEBHOOK)
                        .bind(tenant.to_string())
                        .bind(name)
                        .fetch_optional(self.reader())
                        .await?
                        .map(|r| r.decode(self.secrets().key()))
                        .transpose()
                }

                async fn delete_webhook(&self, tenant: TenantId, name: &str) -> Result<bool> {
                    let mut tx = self.begin_write().await?;
                    let result: Result<bool> = async {
                        let id: Option<(String,)> = ::sqlx::query_as(sql::DELETE_WEBHOOK)
                            .bind(tenant.to_string())
                            .bind(name)
                            .fetch_optional(&mut *tx)
                            .await?;
                        let Some((id,)) = id else { return Ok(false) };
                        ::sqlx::query(sql::DELETE_WEBHOOK_DELIVERIES)
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                        Ok(true)
                    }
                    .await;
                    Self::finish(tx, result).await
                }

                async fn lease_webhooks(
                    &self,
                    owner: &str,
                    lease_ms: i64,
                ) -> Result<Vec<$crate::WebhookRecord>> {
                    let _written = self.written();
                    let now = now_millis();
                    let rows = ::sqlx::query_as::<_, sql::WebhookRow>(sql::LEASE_WEBHOOKS)
                        .bind(owner)
                        .bind(now + lease_ms)
                        .bind(now)
                        .fetch_all(self.writer())
                        .await?;
                    rows.into_iter().map(|r| r.decode(self.secrets().key())).collect()
                }

                async fn release_webhooks(&self, owner: &str) -> Result<()> {
                    let _written = self.written();
                    ::sqlx::query(sql::RELEASE_WEBHOOKS)
                        .bind(owner)
                        .execute(self.writer())
                        .await?;
                    Ok(())
                }

                async fn record_delivery(
                    &self,
                    owner: &str,
                    webhook: &str,
                    attempt: &$crate::DeliveryAttempt,
                ) -> Result<bool> {
                    use $crate::DeliveryOutcome;
                    let mut tx = self.begin_write().await?;
                    let result: Result<bool> = async {
                        let done = match attempt.outcome {
                            DeliveryOutcome::Retrying => ::sqlx::query(sql::RECORD_WEBHOOK_RETRY)
                                .bind(webhook)
                                .bind(owner)
                                .bind(attempt.event_id)
                                .bind(attempt.attempt)
                                .bind(attempt.next_retry_at.unwrap_or(0)),
                            DeliveryOutcome::Delivered | DeliveryOutcome::Failed => {
                                ::sqlx::query(sql::RECORD_WEBHOOK_DONE)
                                    .bind(webhook)
                                    .bind(owner)
                                    .bind(attempt.event_id)
                            }
                        }
                        .execute(&mut *tx)
                        .await?;
                        if done.rows_affected() == 0 {
                            return Ok(false);
                        }
                        ::sqlx::query(sql::INSERT_DELIVERY)
                            .bind(webhook)
                            .bind(attempt.event_id)
                            .bind(attempt.kind.as_str())
                            .bind(attempt.attempt)
                            .bind(attempt.started_at)
                            .bind(attempt.finished_at)
                            .bind(attempt.status)
                            .bind(attempt.error.as_deref())
                            .bind(attempt.outcome.as_str())
                            .bind(attempt.next_retry_at)
                            .execute(&mut *tx)
                            .await?;
                        Ok(true)
                    }
                    .await;
                    Self::finish(tx, result).await
                }

                async fn list_webhook_deliveries(
                    &self,
                    webhook: &str,
                    limit: i64,
                ) -> Result<Vec<$crate::DeliveryRecord>> {
                    let limit = match limit {
                        n if n <= 0 => $crate::DELIVERY_PAGE_MAX,
                        n => n.min($crate::DELIVERY_PAGE_MAX),
                    };
                    let rows = ::sqlx::query_as::<_, sql::DeliveryRow>(sql::LIST_DELIVERIES)
                        .bind(webhook)
                        .bind(limit)
                        .fetch_all(self.reader())
                        .await?;
                    sql::decode_all(rows)
                }

                async fn prune_webhook_deliveries(&self, before: $crate::Millis) -> Result<u64> {
                    let _written = self.written();
                    let done = ::sqlx::query(sql::PRUNE_DELIVERIES)
                        .bind(before)
                        .execute(self.writer())
                        .await?;
                    Ok(done.rows_affected())
                }
            }
        };
    };
}
pub(crate) use impl_store;

use sqlx::{Database, Transaction};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The writes one store instance has finished (its clones share it), the
/// in-process half of [`Store::change_token`](crate::Store::change_token).
#[derive(Debug, Default)]
pub(crate) struct WriteCount(AtomicU64);

impl WriteCount {
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    fn add_one(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// A guard that counts one write when dropped.
    pub(crate) fn on_drop(&self) -> Written<'_> {
        Written(self)
    }
}

/// Counts one write when dropped (see [`WriteCount::on_drop`]).
#[must_use = "it counts the write when dropped: keep it until the write is done"]
pub(crate) struct Written<'a>(&'a WriteCount);

impl Drop for Written<'_> {
    fn drop(&mut self) {
        self.0.add_one();
    }
}

/// A write transaction that counts itself in its store's [`WriteCount`]
/// once it has ended: committed, rolled back, or dropped unfinished (which
/// rolls it back). Used as the connection it runs on, as a
/// [`Transaction`] is.
pub(crate) struct WriteTx<DB: Database> {
    tx: Option<Transaction<'static, DB>>,
    writes: Arc<WriteCount>,
}

impl<DB: Database> WriteTx<DB> {
    pub(crate) fn new(tx: Transaction<'static, DB>, writes: Arc<WriteCount>) -> Self {
        WriteTx {
            tx: Some(tx),
            writes,
        }
    }

    /// Commits; counted when `self` drops, right after.
    pub(crate) async fn commit(mut self) -> Result<(), sqlx::Error> {
        match self.tx.take() {
            Some(tx) => tx.commit().await,
            None => Ok(()),
        }
    }

    /// Rolls back; counted when `self` drops, right after.
    pub(crate) async fn rollback(mut self) -> Result<(), sqlx::Error> {
        match self.tx.take() {
            Some(tx) => tx.rollback().await,
            None => Ok(()),
        }
    }
}

impl<DB: Database> Drop for WriteTx<DB> {
    fn drop(&mut self) {
        self.writes.add_one();
    }
}

impl<DB: Database> Deref for WriteTx<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        self.tx
            .as_deref()
            .expect("a write transaction is not used once ended")
    }
}

impl<DB: Database> DerefMut for WriteTx<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        self.tx
            .as_deref_mut()
            .expect("a write transaction is not used once ended")
    }
}
