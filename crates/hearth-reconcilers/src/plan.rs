//! The pool's arithmetic: a pure function from a snapshot of one tenant's
//! state to the actions that bring it closer to what is asked.
//!
//! **Invariants** (property-tested below):
//! - the live VMs plus the boots planned never exceed `max_vms`;
//! - an `assigned` VM is never destroyed; only its return is planned, and
//!   only when its agent has let go of it;
//! - a VM with work in flight (boot, destroy, return) is never touched;
//! - boots in flight never exceed the concurrent-boot bound;
//! - when the cap binds, capacity goes to the workspace furthest below its
//!   `min_idle` (in proportion), so no workspace starves another;
//! - queued agents are served first-in, first-out across the tenant;
//! - at the cap, idle VMs above their workspace's `min_idle` give way to
//!   queued agents and to backfill below `min_idle` ([`Reason::GiveWay`]);
//! - over the cap (a lowered `max_vms`), idle VMs are destroyed until the
//!   tenant is within it ([`Reason::OverCap`]), and once within it stays so;
//! - nodes ([`Snapshot::nodes`]): a VM on an *unreachable* node (no
//!   heartbeat for `node_timeout_ms`) is given up ([`Action::GiveUp`]: its
//!   record closed, no driver call, the node fences it when it returns)
//!   unless an agent holds it; a held one is lost ([`Action::Lose`]) once
//!   the node has been silent for `lost_after_ms`. Given-up and lost VMs no
//!   longer count toward `min_idle` nor the cap, so the pool backfills at
//!   once. A *draining* node's idle VMs are destroyed
//!   ([`Reason::NodeDraining`]) and do not count toward `min_idle`, its
//!   boots do not either, and its returned VMs are destroyed, not reused.
//!   These are the only actions on a VM in flight (its task's driver calls
//!   to an unreachable node cannot finish it).
//!
//! [`plan_with_deadline`] says when the clock alone changes the plan, so the
//! runner passes again then rather than at the resync.

use hearth_core::ids::{AgentId, NodeId, VmId};
use hearth_store::{AgentPhase, AgentRecord, Millis, NodeState, VmRecord, VmState, WorkspaceState};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

/// Knobs of the pool that are the server's, not the tenant's.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A VM still booting after this long is destroyed and counts as a failure.
    pub boot_timeout_ms: Millis,
    /// At most this many VMs of a tenant boot at once.
    pub max_concurrent_boots: usize,
    /// At most this many stale idle VMs of a workspace are destroyed per pass.
    pub stale_batch: usize,
    /// First back-off after a failed boot; doubles with each further failure.
    pub backoff_base_ms: Millis,
    pub backoff_max_ms: Millis,
    /// After this many consecutive failed boots a workspace is hard-limited.
    pub hard_limit_failures: i64,
    /// A node silent for longer is unreachable (the fleet's `node_timeout`).
    pub node_timeout_ms: Millis,
    /// An unreachable node's assigned VMs are lost once it has been silent
    /// for longer (the fleet's `lost_after`).
    pub lost_after_ms: Millis,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            boot_timeout_ms: 5 * 60 * 1000,
            max_concurrent_boots: 8,
            stale_batch: 2,
            backoff_base_ms: 5_000,
            backoff_max_ms: 5 * 60 * 1000,
            hard_limit_failures: 5,
            node_timeout_ms: 10_000,
            lost_after_ms: 60_000,
        }
    }
}

/// One workspace as the planner sees it.
#[derive(Debug, Clone)]
pub struct WorkspaceView {
    pub name: String,
    pub min_idle: usize,
    pub max_idle: usize,
    /// Warm pool on (`warm_pool.enabled`); off means `min_idle` counts as 0.
    pub warm: bool,
    pub env_version: i64,
    pub image_version: i64,
    /// Digest of the workspace's provisioning inputs
    /// (`hearth_core::fingerprint::setup_digest`).
    pub setup_digest: String,
    pub idle_timeout_ms: Millis,
    pub state: WorkspaceState,
}

/// One node as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub state: NodeState,
    /// Its last heartbeat, by the store's clock.
    pub last_heartbeat: Millis,
}

/// Everything the planner needs of one tenant, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// `None`: no pool config, so no capacity at all.
    pub max_vms: Option<i64>,
    /// Stopped by `pool flush --nuke` until `pool up`.
    pub stopped: bool,
    pub workspaces: Vec<WorkspaceView>,
    /// Live VMs only.
    pub vms: Vec<VmRecord>,
    /// Queued agents, FIFO.
    pub queued: Vec<AgentRecord>,
    /// Phase (and current VM) of every agent an assigned VM names.
    pub holders: HashMap<AgentId, (AgentPhase, Option<VmId>)>,
    /// VMs a task of this server is working on right now.
    pub in_flight: HashSet<VmId>,
    /// The nodes VMs run on. A VM whose node is not here (none recorded,
    /// or a pool of this process's own drivers) is planned as always
    /// reachable on a ready node.
    pub nodes: HashMap<NodeId, NodeView>,
}

/// Why a VM is destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// More idle than `max_idle`.
    Excess,
    /// Idle past the environment's `idle_timeout`, beyond `min_idle`.
    IdleTimeout,
    /// Built from an older environment or image version, or another setup.
    Stale,
    /// Booting for longer than the boot timeout.
    BootTimeout,
    /// The pool is stopped.
    PoolStopped,
    /// Its workspace no longer exists.
    WorkspaceGone,
    /// Already `draining` (flushed, or left so by a crash).
    Draining,
    /// Idle above its workspace's `min_idle` while the cap binds: it gives
    /// way to a queued agent or to another workspace's backfill.
    GiveWay,
    /// The tenant has more live VMs than `max_vms` (it was lowered).
    OverCap,
    /// Idle on a node that is draining: replaced elsewhere.
    NodeDraining,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Boot a VM for a workspace, for a queued agent when given.
    Boot {
        workspace: String,
        reserved_for: Option<AgentId>,
    },
    /// Hand an idle VM of the workspace to a queued agent.
    Assign { agent: AgentId, workspace: String },
    /// Destroy a VM (compare-and-set from `from`, so a VM claimed meanwhile is kept).
    Destroy {
        vm: VmId,
        from: VmState,
        reason: Reason,
    },
    /// Take an assigned VM back from an agent that let go of it.
    Return { vm: VmId, to_idle: bool },
    /// Record that a VM is stale (so claims prefer fresh ones).
    MarkStale { workspace: String },
    /// A queued agent that cannot be served (its workspace is gone or hard-limited).
    FailAgent { agent: AgentId, error: String },
    /// Close the record of a VM on an unreachable node (compare-and-set
    /// from `from`) as `destroyed` with `error`, without a driver call: the
    /// node destroys it when it reports again (fencing). An agent it was
    /// booting for waits again.
    GiveUp {
        vm: VmId,
        from: VmState,
        error: String,
    },
    /// An assigned VM whose node has been silent past `lost_after_ms`: its
    /// record closed with `error`, its agent failed with `agent_error`.
    Lose {
        vm: VmId,
        agent: Option<AgentId>,
        error: String,
        agent_error: String,
    },
}

/// What a given-up VM's record says.
pub fn unreachable_error(node: &str) -> String {
    format!("node {node} is unreachable")
}

/// What a lost VM's record says, and what its agent's says.
pub fn lost_errors(node: &str) -> (String, String) {
    (
        format!("lost: node {node} stopped answering"),
        format!("its VM was lost: node {node} stopped answering"),
    )
}

/// Whether a VM was built from another environment or image version, or
/// another setup (repos, branches, setup commands, environment), than its
/// workspace's current. An empty recorded digest (a VM from before digests
/// existed) differs from every current one, so such a VM is stale.
pub(crate) fn is_stale(vm: &VmRecord, ws: &WorkspaceView) -> bool {
    vm.env_version != ws.env_version
        || vm.image_version != ws.image_version
        || vm.setup_digest != ws.setup_digest
}

/// Whether a workspace may boot now (not hard-limited, not backing off).
pub fn may_boot(ws: &WorkspaceView, now: Millis) -> bool {
    !ws.state.hard_limited && ws.state.backoff_until.is_none_or(|t| t <= now)
}

/// Stands for a VM being returned, counted as idle, in a list of idle VMs
/// (an index into `snap.vms` otherwise).
const RETURNING: usize = usize::MAX;

/// Lists of VM indices per workspace, all in one allocation: those of
/// workspace `w` are `items[start[w]..start[w + 1]]`, in the order given.
struct Grouped {
    start: Vec<usize>,
    items: Vec<usize>,
}

impl Grouped {
    /// Groups `(workspace, item)` pairs by workspace (a counting sort: the
    /// order within a workspace is kept).
    fn new(workspaces: usize, pairs: &[(usize, usize)]) -> Grouped {
        let mut start = vec![0; workspaces + 1];
        for &(w, _) in pairs {
            start[w + 1] += 1;
        }
        for w in 0..workspaces {
            start[w + 1] += start[w];
        }
        let mut next = start[..workspaces].to_vec();
        let mut items = vec![0; pairs.len()];
        for &(w, item) in pairs {
            items[next[w]] = item;
            next[w] += 1;
        }
        Grouped { start, items }
    }

    fn of(&self, w: usize) -> &[usize] {
        &self.items[self.start[w]..self.start[w + 1]]
    }
}

/// A workspace's fresh idle VMs: those counted in snapshot order, then
/// `returning` VMs planned back warm (all [`RETURNING`]); taken off the end.
struct Fresh<'a> {
    head: &'a [usize],
    returning: usize,
}

impl Fresh<'_> {
    fn len(&self) -> usize {
        self.head.len() + self.returning
    }

    fn pop(&mut self) -> Option<usize> {
        if self.returning > 0 {
            self.returning -= 1;
            return Some(RETURNING);
        }
        let (&last, rest) = self.head.split_last()?;
        self.head = rest;
        Some(last)
    }
}

/// Plans one pass.
pub fn plan(snap: &Snapshot, now: Millis, settings: &Settings) -> Vec<Action> {
    plan_with_in_flight(snap, &snap.in_flight, now, settings)
}

/// [`plan`] with the VMs in flight given apart from the snapshot, so that a
/// snapshot kept between passes is planned with each pass's own set
/// (`snap.in_flight` is not read).
///
/// Linear in the snapshot (but for sorting a workspace's idle VMs by age
/// when some may time out): every VM and queued agent is looked up once by
/// its workspace's name; everything per workspace is then indexed by the
/// workspace's position in `snap.workspaces`.
pub fn plan_with_in_flight(
    snap: &Snapshot,
    in_flight: &HashSet<VmId>,
    now: Millis,
    settings: &Settings,
) -> Vec<Action> {
    plan_with_deadline(snap, in_flight, now, settings).0
}

/// [`plan_with_in_flight`], and the earliest moment after `now` at which
/// the clock alone changes what it decides for this snapshot: an idle VM
/// passing its `idle_timeout`, a boot no task runs passing the boot
/// timeout, a back-off ending (`None`: nothing is due; only a write or the
/// resync can change the plan then). Deadlines already past are left out:
/// what they allowed is planned now, or is held back by something else
/// (`min_idle`) that only a write changes, so a runner sleeping until the
/// deadline never spins. VMs in flight have none (their task wakes the
/// pool when it ends). Found in the planner's own walk of the VMs.
pub fn plan_with_deadline(
    snap: &Snapshot,
    in_flight: &HashSet<VmId>,
    now: Millis,
    settings: &Settings,
) -> (Vec<Action>, Option<Millis>) {
    plan_with_nodes(snap, in_flight, &snap.nodes, now, settings)
}

/// [`plan_with_deadline`] with the nodes given apart from the snapshot (a
/// snapshot kept between passes is planned with each pass's fresh read of
/// the nodes: their heartbeats move on while the tenant's rows do not;
/// `snap.nodes` is not read). A node's `last_heartbeat + node_timeout_ms`
/// and `+ lost_after_ms` are deadlines.
pub fn plan_with_nodes(
    snap: &Snapshot,
    in_flight: &HashSet<VmId>,
    nodes: &HashMap<NodeId, NodeView>,
    now: Millis,
    settings: &Settings,
) -> (Vec<Action>, Option<Millis>) {
    let (mut actions, room, deadline) = plan_base(snap, in_flight, nodes, now, settings);
    if let Some(room) = room {
        make_room(snap, &mut actions, room);
    }
    (actions, deadline)
}

/// The deadline of [`plan_with_deadline`] alone.
pub fn next_deadline(
    snap: &Snapshot,
    in_flight: &HashSet<VmId>,
    now: Millis,
    settings: &Settings,
) -> Option<Millis> {
    plan_base(snap, in_flight, &snap.nodes, now, settings).2
}

/// Keeps in `next` the earliest of the moments after `now` it is given.
fn earliest(next: &mut Option<Millis>, at: Millis, now: Millis) {
    if at > now && next.is_none_or(|n| at < n) {
        *next = Some(at);
    }
}

/// What [`make_room`] needs of a pass: per workspace (indexed as
/// `snap.workspaces`), the idle VMs it keeps and how warm it stays, and
/// the demand the cap refused.
struct Room {
    /// Idle VMs (indices into `snap.vms`) that could be destroyed, in the
    /// order they would go: stale ones first, then the newest fresh ones.
    candidates: Vec<Vec<usize>>,
    /// Next candidate to take, per workspace.
    next: Vec<usize>,
    /// Warm after this pass: idle kept (counting returns and in-flight
    /// idle VMs) plus boots no agent waits for.
    warm: Vec<usize>,
    /// Effective `min_idle` (0 when the warm pool is off).
    min_idle: Vec<usize>,
    /// Warm VMs above `min_idle` that may give way (0 for a workspace
    /// whose fresh VMs do not cover its `min_idle`).
    surplus: Vec<usize>,
    /// Workspaces in name order (ties go to the first).
    order: Vec<usize>,
    /// Queued agents that need a boot and got none this pass.
    waiting: usize,
    /// Workspaces the backfill left short this pass: (workspace, fresh
    /// VMs it has counting the boots planned, how many it wants).
    deficits: Vec<(usize, usize, usize)>,
    /// Boots planned this pass.
    boots: i64,
    /// VMs given up or lost this pass (no longer live), and how many of
    /// them were `draining`.
    gone: i64,
    gone_draining: i64,
}

/// The cap's rules on top of [`plan_base`]: a tenant over `max_vms`
/// destroys idle VMs (surplus first, then from the warmest workspace) and
/// returns VMs cold until it is within the cap; then, when queued agents
/// or a backfill wait for a slot the cap refuses, idle VMs above their
/// workspace's `min_idle` give way (the workspace with most surplus first),
/// and a backfill of a workspace with nothing warm is also given way by one
/// that would still be at least as full (in proportion to its `min_idle`):
/// no workspace starves another, whichever was configured first. VMs already
/// on their way out (draining, destroyed or returned cold this pass) count
/// as slots coming, handed out as the next pass will (queued agents first,
/// then the workspace furthest below its `min_idle`), so a later pass never
/// destroys twice for one need.
fn make_room(snap: &Snapshot, actions: &mut Vec<Action>, mut room: Room) {
    let Some(max_vms) = snap.max_vms else {
        return;
    };
    let draining = snap
        .vms
        .iter()
        .filter(|v| v.state == VmState::Draining)
        .count() as i64
        - room.gone_draining;
    let mut leaving = draining
        + actions
            .iter()
            .filter(|a| {
                matches!(a, Action::Destroy { from, .. } if *from != VmState::Draining)
                    || matches!(a, Action::Return { to_idle: false, .. })
            })
            .count() as i64;
    let live = snap.vms.len() as i64 - room.gone;
    let boots = room.boots;
    let over = |leaving: i64| live - leaving + boots - max_vms;
    // Over the cap, a VM let go of is not kept warm.
    for action in actions.iter_mut() {
        if over(leaving) <= 0 {
            break;
        }
        if let Action::Return { to_idle, .. } = action
            && *to_idle
        {
            *to_idle = false;
            leaving += 1;
        }
    }
    let destroy = |room: &mut Room, actions: &mut Vec<Action>, w: usize, reason: Reason| {
        let index = room.candidates[w][room.next[w]];
        room.next[w] += 1;
        room.warm[w] -= 1;
        room.surplus[w] = room.surplus[w].saturating_sub(1);
        actions.push(Action::Destroy {
            vm: snap.vms[index].id,
            from: VmState::Idle,
            reason,
        });
    };
    let mut position = vec![0usize; room.order.len().max(snap.workspaces.len())];
    for (i, &w) in room.order.iter().enumerate() {
        position[w] = i;
    }
    let has_candidate = |room: &Room, w: usize| room.next[w] < room.candidates[w].len();
    // The workspace with most surplus (that has a VM to give).
    let mut most_surplus = Picker::new(&room.order, |room: &Room, w| {
        (room.surplus[w] > 0 && has_candidate(room, w)).then(|| Ratio::new(room.surplus[w], 1))
    });
    // The warmest workspace in proportion to its min_idle (one with a
    // min_idle of 0 first), for VMs that are not surplus.
    let mut warmest = Picker::new(&room.order, |room: &Room, w| {
        has_candidate(room, w).then(|| Ratio::new(room.warm[w], room.min_idle[w]))
    });
    // The workspace fullest after giving one VM, in proportion to its
    // min_idle (one whose min_idle is 0 has only surplus to give).
    let mut fullest_after = Picker::new(&room.order, |room: &Room, w| {
        (room.min_idle[w] > 0 && has_candidate(room, w))
            .then(|| Ratio::new(room.warm[w] - 1, room.min_idle[w]))
    });
    while over(leaving) > 0 {
        let Some(w) = most_surplus
            .pick(&room, &position)
            .or_else(|| warmest.pick(&room, &position))
        else {
            break;
        };
        destroy(&mut room, actions, w, Reason::OverCap);
        leaving += 1;
    }
    // Slots that will be free once what leaves is gone, against what waits:
    // queued agents first.
    let mut free = (-over(leaving)).max(0) as usize;
    let served = free.min(room.waiting);
    free -= served;
    for _ in served..room.waiting {
        let Some(w) = most_surplus.pick(&room, &position) else {
            break;
        };
        destroy(&mut room, actions, w, Reason::GiveWay);
    }
    // Then the backfill, the furthest below its min_idle (in proportion)
    // first (ties in name order), as the backfill hands slots out.
    let mut deficits: BinaryHeap<Reverse<(Ratio, usize, usize, usize)>> = room
        .deficits
        .iter()
        .map(|&(w, have, want)| Reverse((Ratio::new(have, want), position[w], w, want)))
        .collect();
    let fill = |deficits: &mut BinaryHeap<_>, (w, have, want): (usize, usize, usize)| {
        if have + 1 < want {
            deficits.push(Reverse((Ratio::new(have + 1, want), position[w], w, want)));
        }
    };
    while free > 0
        && let Some(Reverse((ratio, _, w, want))) = deficits.pop()
    {
        fill(&mut deficits, (w, ratio.num, want));
        free -= 1;
    }
    while let Some(Reverse((ratio, _, w, want))) = deficits.pop() {
        let have = ratio.num;
        // Surplus first; else, for a workspace with nothing warm at all, a
        // workspace still at least as full as `w` after giving one VM:
        // (warm_v - 1) / min_v >= 1 / min_w. Only starvation is undone so:
        // evening out smaller gaps would trade one boot for nothing.
        let donor = most_surplus.pick_other(&room, &position, w).or_else(|| {
            fullest_after.pick_other(&room, &position, w).filter(|&v| {
                have == 0
                    && Ratio::new(room.warm[v] - 1, room.min_idle[v])
                        >= Ratio::new(have + 1, room.min_idle[w])
            })
        });
        // Nothing gives way to it: a workspace further up may still be
        // given one.
        if let Some(v) = donor {
            destroy(&mut room, actions, v, Reason::GiveWay);
            fill(&mut deficits, (w, have, want));
        }
    }
}

/// `num / den` compared exactly; a `den` of 0 is infinite (infinities
/// compare by `num`).
#[derive(Debug, Clone, Copy)]
struct Ratio {
    num: usize,
    den: usize,
}

impl Ratio {
    fn new(num: usize, den: usize) -> Ratio {
        Ratio { num, den }
    }
}

impl Ord for Ratio {
    fn cmp(&self, other: &Ratio) -> std::cmp::Ordering {
        use std::cmp::Ordering::{Greater, Less};
        match (self.den, other.den) {
            (0, 0) => self.num.cmp(&other.num),
            (0, _) => Greater,
            (_, 0) => Less,
            (a, b) => (self.num * b).cmp(&(other.num * a)),
        }
    }
}

impl PartialOrd for Ratio {
    fn partial_cmp(&self, other: &Ratio) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ratio {
    fn eq(&self, other: &Ratio) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Ratio {}

/// Picks the workspace with the greatest key (ties: the first in name
/// order), where a key only ever falls, and only for a workspace picked:
/// a max-heap whose out-of-date entries are put back with their current
/// key when they come up, so each pick costs a few heap operations rather
/// than a walk of every workspace.
struct Picker<F> {
    heap: BinaryHeap<(Ratio, Reverse<usize>, usize)>,
    key: F,
}

impl<F: Fn(&Room, usize) -> Option<Ratio>> Picker<F> {
    fn new(order: &[usize], key: F) -> Picker<F> {
        // Every workspace starts above any real key: its key is taken when
        // it first comes up (most never do).
        let top = Ratio::new(usize::MAX, 0);
        let heap = order
            .iter()
            .enumerate()
            .map(|(i, &w)| (top, Reverse(i), w))
            .collect();
        Picker { heap, key }
    }

    fn pick(&mut self, room: &Room, position: &[usize]) -> Option<usize> {
        loop {
            let &(stored, _, w) = self.heap.peek()?;
            match (self.key)(room, w) {
                Some(current) if current == stored => return Some(w),
                current => {
                    self.heap.pop();
                    if let Some(current) = current {
                        self.heap.push((current, Reverse(position[w]), w));
                    }
                }
            }
        }
    }

    /// [`Picker::pick`] but never `not`.
    fn pick_other(&mut self, room: &Room, position: &[usize], not: usize) -> Option<usize> {
        let first = self.pick(room, position)?;
        if first != not {
            return Some(first);
        }
        let held = self.heap.pop().expect("just picked");
        let other = self.pick(room, position);
        self.heap.push(held);
        other
    }
}

/// The planner but for the cap's rules ([`make_room`]); `None` for a
/// stopped pool (which destroys every idle VM anyway).
fn plan_base(
    snap: &Snapshot,
    in_flight: &HashSet<VmId>,
    nodes: &HashMap<NodeId, NodeView>,
    now: Millis,
    settings: &Settings,
) -> (Vec<Action>, Option<Room>, Option<Millis>) {
    let mut actions = Vec::new();
    let mut deadline: Option<Millis> = None;
    // Workspaces by name (of two with one name, the later one counts, as
    // in a map) and, in name order, the order capacity is handed out in.
    let mut by_name: HashMap<&str, usize> = HashMap::with_capacity(snap.workspaces.len());
    for (w, ws) in snap.workspaces.iter().enumerate() {
        by_name.insert(ws.name.as_str(), w);
    }
    let mut order: Vec<usize> = if by_name.len() == snap.workspaces.len() {
        (0..snap.workspaces.len()).collect()
    } else {
        by_name.values().copied().collect()
    };
    let name = |w: &usize| snap.workspaces[*w].name.as_str();
    if !order.is_sorted_by_key(name) {
        order.sort_unstable_by_key(name);
    }
    let workspace = |name: &str| by_name.get(name).copied();
    let n = snap.workspaces.len();

    // Whether an agent still holds a VM (running or idle on it).
    let held = |vm: &VmRecord| {
        let holder = vm.agent_id.and_then(|a| snap.holders.get(&a));
        matches!(holder, Some((phase, Some(on))) if *on == vm.id
            && matches!(phase, AgentPhase::Running | AgentPhase::Idle))
    };
    let (on, gone, gone_draining) = on_nodes(
        snap,
        nodes,
        &held,
        now,
        settings,
        &mut actions,
        &mut deadline,
    );
    let on_node = |i: usize| on.get(i).copied().unwrap_or(OnNode::Here);

    let live = snap.vms.len() as i64 - gone;
    let mut capacity = snap.max_vms.map_or(0, |m| (m - live).max(0));
    let mut booting = 0;
    // Boots under way per workspace: a workspace whose boots fail probes
    // with one at a time.
    let mut booting_in = vec![0usize; n];
    for (i, vm) in snap.vms.iter().enumerate() {
        if matches!(vm.state, VmState::Booting | VmState::Provisioning)
            && on_node(i) != OnNode::Gone
        {
            booting += 1;
            if let Some(w) = workspace(&vm.workspace) {
                booting_in[w] += 1;
            }
        }
    }
    let probing = |w: usize, booting_in: &[usize]| {
        snap.workspaces[w].state.consecutive_failures > 0 && booting_in[w] > 0
    };
    let is_in_flight = |vm: &VmRecord| !in_flight.is_empty() && in_flight.contains(&vm.id);

    // Per workspace: idle VMs (fresh, stale) as (workspace, index) pairs
    // in snapshot order, grouped below; boots under way no agent waits for.
    let mut fresh_pairs: Vec<(usize, usize)> = Vec::new();
    let mut stale_pairs: Vec<(usize, usize)> = Vec::new();
    let mut booting_free = vec![0usize; n];
    // Idle VMs of workspaces that no longer exist.
    let mut orphans: Vec<usize> = Vec::new();
    let mut stale_marked = vec![false; n];
    let mut stale_marks = Vec::new();
    for (i, vm) in snap.vms.iter().enumerate() {
        let w = workspace(&vm.workspace);
        let here = match on_node(i) {
            OnNode::Gone => continue,
            OnNode::Here => true,
            // What a draining node runs is not counted as warm.
            OnNode::Draining => false,
        };
        if is_in_flight(vm) {
            if let Some(w) = w
                && here
            {
                if matches!(vm.state, VmState::Booting | VmState::Provisioning)
                    && vm.reserved_for.is_none()
                    && !vm.test
                {
                    booting_free[w] += 1;
                }
                if (vm.state == VmState::Assigned && !held(vm))
                    || (vm.state == VmState::Idle && !vm.test)
                {
                    // Being returned: it may come back warm, so it counts
                    // against max_idle until its return is done. Idle
                    // already (a boot or return whose task is finishing):
                    // it counts as warm, untouched, so no twin is booted.
                    fresh_pairs.push((w, RETURNING));
                }
            }
            continue;
        }
        match vm.state {
            VmState::Draining => actions.push(Action::Destroy {
                vm: vm.id,
                from: VmState::Draining,
                reason: Reason::Draining,
            }),
            VmState::Booting | VmState::Provisioning => {
                // A boot no task of this server runs: left by a crash or by
                // another server; past the timeout it is given up.
                if now - vm.updated_at > settings.boot_timeout_ms {
                    actions.push(Action::Destroy {
                        vm: vm.id,
                        from: vm.state,
                        reason: Reason::BootTimeout,
                    });
                } else {
                    let at = vm.updated_at.saturating_add(settings.boot_timeout_ms) + 1;
                    earliest(&mut deadline, at, now);
                    if vm.reserved_for.is_none()
                        && !vm.test
                        && here
                        && let Some(w) = w
                    {
                        booting_free[w] += 1;
                    }
                }
            }
            // Held, or returned below once every idle VM is counted.
            VmState::Assigned => {}
            VmState::Idle => {
                if vm.test {
                    continue;
                }
                if !here {
                    actions.push(Action::Destroy {
                        vm: vm.id,
                        from: VmState::Idle,
                        reason: Reason::NodeDraining,
                    });
                    continue;
                }
                if let Some(w) = w {
                    // Destroyed once `now - updated_at > idle_timeout`.
                    let timeout = snap.workspaces[w].idle_timeout_ms;
                    earliest(
                        &mut deadline,
                        vm.updated_at.saturating_add(timeout) + 1,
                        now,
                    );
                }
                match w {
                    Some(w) if is_stale(vm, &snap.workspaces[w]) => {
                        stale_pairs.push((w, i));
                        if !vm.stale && !stale_marked[w] {
                            stale_marked[w] = true;
                            stale_marks.push(w);
                        }
                    }
                    Some(w) => fresh_pairs.push((w, i)),
                    None => orphans.push(i),
                }
            }
            VmState::Destroyed | VmState::Failed => {}
        }
    }
    for ws in &snap.workspaces {
        if !ws.state.hard_limited
            && let Some(until) = ws.state.backoff_until
        {
            earliest(&mut deadline, until, now);
        }
    }
    for w in stale_marks {
        actions.push(Action::MarkStale {
            workspace: snap.workspaces[w].name.clone(),
        });
    }
    let fresh_idle = Grouped::new(n, &fresh_pairs);
    let stale_idle = Grouped::new(n, &stale_pairs);
    drop((fresh_pairs, stale_pairs));
    // Returned VMs going back warm, per workspace (after its fresh ones).
    let mut returning = vec![0usize; n];
    let idle_in = |w: usize, returning: &[usize]| {
        fresh_idle.of(w).len() + returning[w] + stale_idle.of(w).len()
    };

    // Returns: an assigned VM whose agent let go goes back warm while its
    // workspace is under max_idle, else it is destroyed.
    for (i, vm) in snap.vms.iter().enumerate() {
        if vm.state != VmState::Assigned
            || is_in_flight(vm)
            || held(vm)
            || on_node(i) == OnNode::Gone
        {
            continue;
        }
        let to_idle = match workspace(&vm.workspace) {
            Some(w)
                if !snap.stopped
                    && on_node(i) == OnNode::Here
                    && !is_stale(vm, &snap.workspaces[w])
                    && idle_in(w, &returning) < snap.workspaces[w].max_idle =>
            {
                // Counted as idle from now on.
                returning[w] += 1;
                true
            }
            _ => false,
        };
        actions.push(Action::Return { vm: vm.id, to_idle });
    }

    let destroy_idle = |actions: &mut Vec<Action>, index: usize, reason: Reason| {
        if index != RETURNING {
            actions.push(Action::Destroy {
                vm: snap.vms[index].id,
                from: VmState::Idle,
                reason,
            });
        }
    };

    if snap.stopped {
        for w in 0..n {
            for &i in fresh_idle.of(w).iter().chain(stale_idle.of(w)) {
                destroy_idle(&mut actions, i, Reason::PoolStopped);
            }
        }
        for &i in &orphans {
            destroy_idle(&mut actions, i, Reason::PoolStopped);
        }
        return (actions, None, deadline);
    }

    // Idle VMs of workspaces that no longer exist.
    for &i in &orphans {
        destroy_idle(&mut actions, i, Reason::WorkspaceGone);
    }

    // Queued agents, first in first out: an idle VM when there is one, else
    // a cold boot while capacity lasts.
    let mut spare_idle: Vec<usize> = (0..n).map(|w| idle_in(w, &returning)).collect();
    let mut queued_in = vec![0usize; n];
    let mut boots_planned: i64 = 0;
    let mut boots_blocked = false;
    // Agents that need a boot and get none this pass (the cap or the
    // concurrent-boot bound refused it).
    let mut waiting = 0usize;
    for agent in &snap.queued {
        let Some(w) = workspace(&agent.workspace) else {
            actions.push(Action::FailAgent {
                agent: agent.id,
                error: format!("workspace {:?} no longer exists", agent.workspace),
            });
            continue;
        };
        let ws = &snap.workspaces[w];
        queued_in[w] += 1;
        if spare_idle[w] > 0 {
            spare_idle[w] -= 1;
            actions.push(Action::Assign {
                agent: agent.id,
                workspace: ws.name.clone(),
            });
            continue;
        }
        if ws.state.hard_limited {
            actions.push(Action::FailAgent {
                agent: agent.id,
                error: format!(
                    "workspace {:?} stopped booting VMs after {} consecutive failures: {}",
                    ws.name,
                    ws.state.consecutive_failures,
                    ws.state.last_error.as_deref().unwrap_or("unknown error")
                ),
            });
            continue;
        }
        if !may_boot(ws, now) || probing(w, &booting_in) {
            continue;
        }
        if boots_blocked {
            waiting += 1;
            continue;
        }
        if capacity > 0 && booting < settings.max_concurrent_boots {
            capacity -= 1;
            booting += 1;
            booting_in[w] += 1;
            boots_planned += 1;
            actions.push(Action::Boot {
                workspace: ws.name.clone(),
                reserved_for: Some(agent.id),
            });
        } else {
            // FIFO: no later agent jumps ahead for a boot.
            boots_blocked = true;
            waiting += 1;
        }
    }

    // Scale down: stale first, then past max_idle, then past idle_timeout
    // beyond min_idle. Agents about to be assigned take fresh VMs first (as
    // the claim does), so those are left out (the newest: taken off the end).
    let mut ready = vec![0usize; n];
    let mut room_made: i64 = 0;
    let mut candidates: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut warm_after = vec![0usize; n];
    let mut min_idle_of = vec![0usize; n];
    for &w in &order {
        let ws = &snap.workspaces[w];
        let mut fresh = Fresh {
            head: fresh_idle.of(w),
            returning: returning[w],
        };
        let mut stale: &[usize] = stale_idle.of(w);
        for _ in 0..queued_in[w] {
            if fresh.pop().is_none() {
                match stale.split_last() {
                    Some((_, rest)) => stale = rest,
                    None => break,
                }
            }
        }
        let min_idle = if ws.warm { ws.min_idle } else { 0 };
        let fresh_ready = fresh.len() + booting_free[w];
        let mut stale_destroyed = 0;
        if !stale.is_empty() {
            // Replace stale VMs once fresh ones cover min_idle; at the cap,
            // make room for the replacements a few at a time.
            let room_needed = fresh_ready < min_idle && capacity == 0;
            if fresh_ready >= min_idle || room_needed {
                stale_destroyed = stale.len().min(settings.stale_batch);
                for &i in &stale[..stale_destroyed] {
                    destroy_idle(&mut actions, i, Reason::Stale);
                }
                if room_needed {
                    // The slots freed count only once the tenant is back
                    // under its cap.
                    room_made += stale_destroyed as i64;
                    capacity = snap
                        .max_vms
                        .map_or(0, |m| (m - (live - room_made) - boots_planned).max(0));
                }
            }
        }
        let stale_left = &stale[stale_destroyed..];
        let warm = fresh.len() + stale_left.len();
        let mut stale_kept = stale_left;
        if warm > ws.max_idle {
            let excess = warm - ws.max_idle;
            for &i in stale_left.iter().take(excess) {
                destroy_idle(&mut actions, i, Reason::Excess);
            }
            stale_kept = &stale_left[excess.min(stale_left.len())..];
            for _ in 0..excess.saturating_sub(stale_left.len()) {
                if let Some(i) = fresh.pop() {
                    destroy_idle(&mut actions, i, Reason::Excess);
                }
            }
        }
        let mut keep = fresh.len();
        let mut timed_out: HashSet<usize> = HashSet::new();
        if keep > min_idle {
            // Oldest first (a stable sort: ties keep the snapshot order).
            let mut by_age: Vec<usize> = fresh
                .head
                .iter()
                .copied()
                .filter(|&i| i != RETURNING)
                .collect();
            by_age.sort_by_key(|&i| snap.vms[i].updated_at);
            for i in by_age {
                if keep <= min_idle {
                    break;
                }
                if now - snap.vms[i].updated_at > ws.idle_timeout_ms {
                    destroy_idle(&mut actions, i, Reason::IdleTimeout);
                    timed_out.insert(i);
                    keep -= 1;
                }
            }
        }
        ready[w] = keep + booting_free[w];
        // What may still give way to the cap: stale first, then the newest
        // fresh ones (the oldest stay, as claims take them first).
        let mine = &mut candidates[w];
        mine.extend_from_slice(stale_kept);
        mine.extend(
            fresh
                .head
                .iter()
                .rev()
                .copied()
                .filter(|&i| i != RETURNING && !timed_out.contains(&i)),
        );
        warm_after[w] = ready[w] + stale_kept.len();
        min_idle_of[w] = min_idle;
    }

    // Backfill: bring each workspace's fresh idle + booting up to min_idle,
    // one VM at a time to whichever is furthest below it (in proportion).
    let mut deficits: Vec<(usize, usize, usize)> = order
        .iter()
        .copied()
        .filter(|&w| {
            let ws = &snap.workspaces[w];
            ws.warm && ws.min_idle > 0 && may_boot(ws, now) && !probing(w, &booting_in)
        })
        .filter_map(|w| {
            let ws = &snap.workspaces[w];
            let have = ready[w];
            // After a failure, one probe boot at a time.
            let want = if ws.state.consecutive_failures > 0 {
                ws.min_idle.min(have + 1)
            } else {
                ws.min_idle
            };
            (have < want).then_some((w, have, want))
        })
        .collect();
    while capacity > 0 && booting < settings.max_concurrent_boots && !deficits.is_empty() {
        // Lowest fill ratio first; ties by name (the order above).
        let (pos, _) = deficits
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| (a.1 * b.2).cmp(&(b.1 * a.2)))
            .expect("not empty");
        let entry = &mut deficits[pos];
        actions.push(Action::Boot {
            workspace: snap.workspaces[entry.0].name.clone(),
            reserved_for: None,
        });
        entry.1 += 1;
        capacity -= 1;
        booting += 1;
        boots_planned += 1;
        if entry.1 >= entry.2 {
            deficits.remove(pos);
        }
    }
    // A workspace whose fresh VMs do not cover its min_idle keeps all it has.
    let surplus = (0..n)
        .map(|w| {
            if ready[w] >= min_idle_of[w] {
                warm_after[w] - min_idle_of[w]
            } else {
                0
            }
        })
        .collect();
    let room = Room {
        next: vec![0; n],
        candidates,
        warm: warm_after,
        min_idle: min_idle_of,
        surplus,
        order,
        waiting,
        deficits,
        boots: boots_planned,
        gone,
        gone_draining,
    };
    (actions, Some(room), deadline)
}

/// Where a VM runs, as far as the plan goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnNode {
    /// A node that is reachable and not draining (or none known).
    Here,
    /// A reachable node that is draining.
    Draining,
    /// Given up or lost this pass: no longer live.
    Gone,
}

/// Per VM (as `snap.vms`), where it runs; plans the give-ups and losses of
/// VMs on unreachable nodes and takes the nodes' deadlines. Returns the
/// fates (empty when no node is known: every VM is [`OnNode::Here`]), how
/// many VMs are gone and how many of those were `draining`.
fn on_nodes(
    snap: &Snapshot,
    nodes: &HashMap<NodeId, NodeView>,
    held: &dyn Fn(&VmRecord) -> bool,
    now: Millis,
    settings: &Settings,
    actions: &mut Vec<Action>,
    deadline: &mut Option<Millis>,
) -> (Vec<OnNode>, i64, i64) {
    if nodes.is_empty() {
        return (Vec::new(), 0, 0);
    }
    let (mut gone, mut gone_draining) = (0, 0);
    let mut on = Vec::with_capacity(snap.vms.len());
    for vm in &snap.vms {
        let Some(node) = vm.node_id.and_then(|id| nodes.get(&id)) else {
            on.push(OnNode::Here);
            continue;
        };
        let live = VmState::LIVE.contains(&vm.state);
        let silent = now - node.last_heartbeat;
        let fate = if silent <= settings.node_timeout_ms {
            if live {
                earliest(
                    deadline,
                    node.last_heartbeat
                        .saturating_add(settings.node_timeout_ms)
                        .saturating_add(1),
                    now,
                );
            }
            match node.state {
                NodeState::Draining => OnNode::Draining,
                NodeState::Ready | NodeState::Cordoned => OnNode::Here,
            }
        } else if !live {
            OnNode::Here
        } else if vm.state == VmState::Assigned && held(vm) {
            if silent > settings.lost_after_ms {
                let (error, agent_error) = lost_errors(&node.name);
                actions.push(Action::Lose {
                    vm: vm.id,
                    agent: vm.agent_id,
                    error,
                    agent_error,
                });
                OnNode::Gone
            } else {
                earliest(
                    deadline,
                    node.last_heartbeat
                        .saturating_add(settings.lost_after_ms)
                        .saturating_add(1),
                    now,
                );
                OnNode::Here
            }
        } else {
            actions.push(Action::GiveUp {
                vm: vm.id,
                from: vm.state,
                error: unreachable_error(&node.name),
            });
            OnNode::Gone
        };
        if fate == OnNode::Gone {
            gone += 1;
            if vm.state == VmState::Draining {
                gone_draining += 1;
            }
        }
        on.push(fate);
    }
    (on, gone, gone_draining)
}
/// The back-off state after one more failed boot.
pub fn after_failure(
    state: &WorkspaceState,
    error: &str,
    now: Millis,
    settings: &Settings,
) -> WorkspaceState {
    let failures = state.consecutive_failures + 1;
    let shift = (failures - 1).clamp(0, 20) as u32;
    let delay = settings
        .backoff_base_ms
        .saturating_mul(1i64 << shift)
        .min(settings.backoff_max_ms);
    WorkspaceState {
        workspace: state.workspace.clone(),
        consecutive_failures: failures,
        backoff_until: Some(now + delay),
        hard_limited: failures >= settings.hard_limit_failures,
        last_error: Some(error.to_owned()),
        config_fingerprint: state.config_fingerprint.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_core::ids::{IdentityId, TenantId};
    use hearth_core::rbac::IdentityKind;
    use hearth_store::OnIdle;
    use proptest::prelude::*;

    const NOW: Millis = 1_000_000_000;
    /// The setup digest of every workspace of [`ws`] and VM of [`vm`].
    const SETUP: &str = "setup-1";

    fn ws(name: &str, min_idle: usize, max_idle: usize) -> WorkspaceView {
        WorkspaceView {
            name: name.into(),
            min_idle,
            max_idle,
            warm: true,
            env_version: 1,
            image_version: 0,
            setup_digest: SETUP.into(),
            idle_timeout_ms: 15 * 60 * 1000,
            state: WorkspaceState {
                workspace: name.into(),
                ..Default::default()
            },
        }
    }

    fn vm(workspace: &str, state: VmState) -> VmRecord {
        let mut v = VmRecord::booting(VmId::new(), TenantId::new(), workspace, "fake", 1, 0);
        v.setup_digest = SETUP.into();
        v.state = state;
        v.created_at = NOW - 1000;
        v.updated_at = NOW - 1000;
        v
    }

    fn agent(workspace: &str) -> AgentRecord {
        AgentRecord {
            id: AgentId::new(),
            tenant_id: TenantId::new(),
            workspace: workspace.into(),
            owner_id: IdentityId::new(),
            owner_name: "dev".into(),
            owner_kind: IdentityKind::Developer,
            parent_id: None,
            phase: AgentPhase::Queued,
            vm_id: None,
            on_idle: OnIdle::Sleep,
            command: None,
            build: "b".into(),
            exit_code: None,
            output: String::new(),
            error: None,
            resurrections: 0,
            created_at: NOW,
            updated_at: NOW,
            queued_at: NOW,
            started_at: None,
            finished_at: None,
        }
    }

    fn snap(max_vms: i64, workspaces: Vec<WorkspaceView>, vms: Vec<VmRecord>) -> Snapshot {
        Snapshot {
            max_vms: Some(max_vms),
            workspaces,
            vms,
            ..Default::default()
        }
    }

    fn boots(actions: &[Action], workspace: &str) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Boot { workspace: w, .. } if w == workspace))
            .count()
    }

    fn destroys(actions: &[Action]) -> Vec<(VmId, Reason)> {
        actions
            .iter()
            .filter_map(|a| {
                if let Action::Destroy { vm, reason, .. } = a {
                    Some((*vm, *reason))
                } else {
                    None
                }
            })
            .collect()
    }

    #[test]
    fn backfill_counts_idle_and_booting() {
        let s = snap(
            10,
            vec![ws("web", 3, 5)],
            vec![vm("web", VmState::Idle), vm("web", VmState::Booting)],
        );
        assert_eq!(boots(&plan(&s, NOW, &Settings::default()), "web"), 1);
        let s = snap(
            10,
            vec![ws("web", 2, 5)],
            vec![vm("web", VmState::Idle), vm("web", VmState::Booting)],
        );
        assert!(plan(&s, NOW, &Settings::default()).is_empty());
    }

    #[test]
    fn an_idle_vm_still_in_flight_counts_as_warm_and_is_left_alone() {
        // Its boot (or return) recorded it idle; the task has not let go
        // of it yet. No twin is booted for it, and it is not destroyed.
        let ready = vm("web", VmState::Idle);
        let mut s = snap(
            10,
            vec![ws("web", 2, 2)],
            vec![ready.clone(), vm("web", VmState::Idle)],
        );
        s.in_flight.insert(ready.id);
        assert!(plan(&s, NOW, &Settings::default()).is_empty());
        // Over max_idle, the excess destroyed is one the pass may touch.
        let mut s = snap(
            10,
            vec![ws("web", 1, 1)],
            vec![ready.clone(), vm("web", VmState::Idle)],
        );
        s.in_flight.insert(ready.id);
        let gone = destroys(&plan(&s, NOW, &Settings::default()));
        assert_eq!(gone, vec![(s.vms[1].id, Reason::Excess)]);
    }

    #[test]
    fn no_config_means_no_capacity() {
        let s = Snapshot {
            max_vms: None,
            workspaces: vec![ws("web", 3, 5)],
            ..Default::default()
        };
        assert_eq!(boots(&plan(&s, NOW, &Settings::default()), "web"), 0);
    }

    #[test]
    fn cap_is_shared_fairly() {
        let s = snap(
            6,
            vec![ws("a", 10, 10), ws("b", 10, 10), ws("c", 2, 2)],
            vec![],
        );
        let a = plan(&s, NOW, &Settings::default());
        // Proportional fill: c (2 wanted) gets 1 or 2, a and b get the rest evenly.
        assert_eq!(a.len(), 6);
        let (na, nb, nc) = (boots(&a, "a"), boots(&a, "b"), boots(&a, "c"));
        assert!(na.abs_diff(nb) <= 1 && nc >= 1, "{na} {nb} {nc}");
        // A workspace that already has some never starves one that has none.
        let s = snap(
            3,
            vec![ws("a", 5, 5), ws("b", 5, 5)],
            vec![vm("a", VmState::Idle), vm("a", VmState::Idle)],
        );
        let a = plan(&s, NOW, &Settings::default());
        assert_eq!(boots(&a, "b"), 1);
        assert_eq!(boots(&a, "a"), 0);
    }

    #[test]
    fn concurrent_boots_are_bounded() {
        let settings = Settings {
            max_concurrent_boots: 3,
            ..Default::default()
        };
        let s = snap(
            100,
            vec![ws("web", 10, 10)],
            vec![vm("web", VmState::Booting)],
        );
        assert_eq!(boots(&plan(&s, NOW, &settings), "web"), 2);
    }

    #[test]
    fn excess_idle_is_destroyed() {
        let vms: Vec<_> = (0..5).map(|_| vm("web", VmState::Idle)).collect();
        let s = snap(10, vec![ws("web", 1, 3)], vms);
        let d = destroys(&plan(&s, NOW, &Settings::default()));
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|(_, r)| *r == Reason::Excess));
    }

    #[test]
    fn idle_timeout_keeps_min_idle() {
        let mut vms: Vec<_> = (0..4).map(|_| vm("web", VmState::Idle)).collect();
        for v in &mut vms {
            v.updated_at = NOW - 16 * 60 * 1000;
        }
        let s = snap(10, vec![ws("web", 1, 5)], vms);
        let d = destroys(&plan(&s, NOW, &Settings::default()));
        assert_eq!(d.len(), 3);
        assert!(d.iter().all(|(_, r)| *r == Reason::IdleTimeout));
    }

    #[test]
    fn stale_vms_are_replaced_without_dropping_below_min_idle() {
        let mut old: Vec<_> = (0..3).map(|_| vm("web", VmState::Idle)).collect();
        for v in &mut old {
            v.env_version = 0;
        }
        let settings = Settings::default();
        // Capacity allows: boot fresh ones first, destroy nothing yet.
        let s = snap(10, vec![ws("web", 3, 3)], old.clone());
        let a = plan(&s, NOW, &settings);
        assert_eq!(boots(&a, "web"), 3);
        assert!(destroys(&a).is_empty());
        assert!(a.contains(&Action::MarkStale {
            workspace: "web".into()
        }));
        // Fresh ones ready: stale ones go, a few at a time.
        let mut vms = old.clone();
        vms.extend((0..3).map(|_| vm("web", VmState::Idle)));
        let s = snap(10, vec![ws("web", 3, 6)], vms);
        let d = destroys(&plan(&s, NOW, &settings));
        assert_eq!(d.len(), settings.stale_batch);
        assert!(d.iter().all(|(_, r)| *r == Reason::Stale));
        // At the cap: make room a few at a time.
        let s = snap(3, vec![ws("web", 3, 3)], old);
        let a = plan(&s, NOW, &settings);
        assert_eq!(destroys(&a).len(), settings.stale_batch);
        assert_eq!(boots(&a, "web"), settings.stale_batch);
    }

    /// A workspace whose provisioning inputs changed: its view carries
    /// another setup digest than the VMs built before.
    fn changed_setup(mut w: WorkspaceView) -> WorkspaceView {
        w.setup_digest = "setup-2".into();
        w
    }

    #[test]
    fn a_setup_digest_change_makes_vms_stale_like_an_environment_change() {
        let settings = Settings::default();
        let old: Vec<_> = (0..3).map(|_| vm("web", VmState::Idle)).collect();
        // Fresh ones boot first; nothing is destroyed yet.
        let s = snap(10, vec![changed_setup(ws("web", 3, 3))], old.clone());
        let a = plan(&s, NOW, &settings);
        assert!(a.contains(&Action::MarkStale {
            workspace: "web".into()
        }));
        assert_eq!(boots(&a, "web"), 3);
        assert!(destroys(&a).is_empty());
        // Fresh ones ready: the old ones go, a few at a time.
        let mut vms = old.clone();
        vms.extend((0..3).map(|_| {
            let mut v = vm("web", VmState::Idle);
            v.setup_digest = "setup-2".into();
            v
        }));
        let s = snap(10, vec![changed_setup(ws("web", 3, 6))], vms);
        let d = destroys(&plan(&s, NOW, &settings));
        assert_eq!(d.len(), settings.stale_batch);
        assert!(
            d.iter()
                .all(|(id, r)| *r == Reason::Stale && old.iter().any(|v| v.id == *id))
        );
        // An assigned VM of the old setup is left alone while held, and
        // when its agent lets go it is destroyed, not kept warm.
        let mut a = agent("web");
        let mut held = vm("web", VmState::Assigned);
        held.agent_id = Some(a.id);
        let mut s = snap(10, vec![changed_setup(ws("web", 0, 1))], vec![held.clone()]);
        s.holders.insert(a.id, (AgentPhase::Running, Some(held.id)));
        let actions = plan(&s, NOW, &settings);
        assert!(destroys(&actions).is_empty());
        assert!(!actions.iter().any(|x| matches!(x, Action::Return { .. })));
        a.phase = AgentPhase::Completed;
        s.holders.insert(a.id, (a.phase, Some(held.id)));
        assert!(plan(&s, NOW, &settings).contains(&Action::Return {
            vm: held.id,
            to_idle: false
        }));
    }

    #[test]
    fn sizing_changes_do_not_make_vms_stale() {
        let settings = Settings::default();
        let vms: Vec<_> = (0..3).map(|_| vm("web", VmState::Idle)).collect();
        // min_idle, max_idle and warm_pool.enabled changed; the setup did not.
        for view in [ws("web", 1, 3), ws("web", 3, 5), {
            let mut w = ws("web", 0, 3);
            w.warm = false;
            w
        }] {
            let s = snap(10, vec![view.clone()], vms.clone());
            let a = plan(&s, NOW, &settings);
            assert!(
                !a.iter().any(|x| matches!(x, Action::MarkStale { .. })),
                "{view:?}: {a:?}"
            );
            assert!(
                !destroys(&a).iter().any(|(_, r)| *r == Reason::Stale),
                "{view:?}: {a:?}"
            );
        }
    }

    #[test]
    fn vms_recorded_before_setup_digests_existed_are_stale() {
        let mut legacy = vm("web", VmState::Idle);
        legacy.setup_digest = String::new();
        let s = snap(10, vec![ws("web", 1, 1)], vec![legacy]);
        let a = plan(&s, NOW, &Settings::default());
        assert!(a.contains(&Action::MarkStale {
            workspace: "web".into()
        }));
        assert_eq!(boots(&a, "web"), 1, "a fresh one boots before it goes");
        assert!(destroys(&a).is_empty());
    }

    #[test]
    fn queued_agents_are_served_fifo() {
        let first = agent("web");
        let second = agent("web");
        let s = Snapshot {
            queued: vec![first.clone(), second.clone()],
            ..snap(1, vec![ws("web", 0, 2)], vec![])
        };
        let a = plan(&s, NOW, &Settings::default());
        assert_eq!(
            a,
            vec![Action::Boot {
                workspace: "web".into(),
                reserved_for: Some(first.id)
            }]
        );
        // An idle VM goes to the first in line.
        let s = Snapshot {
            queued: vec![first.clone(), second],
            ..snap(1, vec![ws("web", 0, 2)], vec![vm("web", VmState::Idle)])
        };
        let a = plan(&s, NOW, &Settings::default());
        assert_eq!(
            a,
            vec![Action::Assign {
                agent: first.id,
                workspace: "web".into()
            }]
        );
    }

    #[test]
    fn returns_follow_max_idle() {
        let mut a = agent("web");
        a.phase = AgentPhase::Completed;
        let mut held = vm("web", VmState::Assigned);
        held.agent_id = Some(a.id);
        let mut s = snap(10, vec![ws("web", 0, 1)], vec![held.clone()]);
        s.holders
            .insert(a.id, (AgentPhase::Completed, Some(held.id)));
        assert_eq!(
            plan(&s, NOW, &Settings::default()),
            vec![Action::Return {
                vm: held.id,
                to_idle: true
            }]
        );
        s.vms.push(vm("web", VmState::Idle));
        assert_eq!(
            plan(&s, NOW, &Settings::default()),
            vec![Action::Return {
                vm: held.id,
                to_idle: false
            }]
        );
        // A running agent keeps its VM.
        s.holders.insert(a.id, (AgentPhase::Running, Some(held.id)));
        assert!(plan(&s, NOW, &Settings::default()).is_empty());
    }

    #[test]
    fn stopped_pool_destroys_idle_and_boots_nothing() {
        let mut s = snap(10, vec![ws("web", 3, 3)], vec![vm("web", VmState::Idle)]);
        s.stopped = true;
        let a = plan(&s, NOW, &Settings::default());
        assert_eq!(destroys(&a).len(), 1);
        assert_eq!(boots(&a, "web"), 0);
    }

    #[test]
    fn back_off_and_hard_limit() {
        let settings = Settings::default();
        let mut w = ws("web", 2, 2);
        w.state = after_failure(&w.state, "boom", NOW, &settings);
        assert_eq!(w.state.backoff_until, Some(NOW + settings.backoff_base_ms));
        let s = snap(10, vec![w.clone()], vec![]);
        assert_eq!(boots(&plan(&s, NOW, &settings), "web"), 0);
        // After the back-off, one probe boot at a time.
        assert_eq!(
            boots(&plan(&s, NOW + settings.backoff_base_ms, &settings), "web"),
            1
        );
        let probing = Snapshot {
            vms: vec![vm("web", VmState::Booting)],
            ..s.clone()
        };
        assert_eq!(
            boots(
                &plan(&probing, NOW + settings.backoff_base_ms, &settings),
                "web"
            ),
            0
        );
        let second = after_failure(&w.state, "boom", NOW, &settings);
        assert_eq!(
            second.backoff_until,
            Some(NOW + 2 * settings.backoff_base_ms)
        );
        let mut state = w.state.clone();
        for _ in 1..settings.hard_limit_failures {
            state = after_failure(&state, "boom", NOW, &settings);
        }
        assert!(state.hard_limited);
        w.state = state;
        let queued = agent("web");
        let s = Snapshot {
            queued: vec![queued.clone()],
            ..snap(10, vec![w], vec![])
        };
        let a = plan(&s, NOW + 10 * 60 * 1000, &settings);
        assert!(
            matches!(&a[..], [Action::FailAgent { agent, .. }] if *agent == queued.id),
            "{a:?}"
        );
    }

    /// An idle VM held by nobody, and an assigned one an agent runs on.
    fn held_vm(s: &mut Snapshot, workspace: &str) -> VmId {
        let mut v = vm(workspace, VmState::Assigned);
        let a = AgentId::new();
        v.agent_id = Some(a);
        s.holders.insert(a, (AgentPhase::Running, Some(v.id)));
        let id = v.id;
        s.vms.push(v);
        id
    }

    #[test]
    fn surplus_idle_gives_way_to_a_queued_agent_of_another_workspace() {
        // At the cap: a holds 3 idle (min_idle 1), b's agent waits.
        let mut s = snap(
            4,
            vec![ws("a", 1, 5), ws("b", 0, 2)],
            (0..3).map(|_| vm("a", VmState::Idle)).collect(),
        );
        held_vm(&mut s, "b");
        let waiting = agent("b");
        s.queued = vec![waiting.clone()];
        let a = plan(&s, NOW, &Settings::default());
        let gone = destroys(&a);
        // One slot is needed: one of a's surplus goes, never below min_idle.
        assert_eq!(gone.len(), 1, "{a:?}");
        assert_eq!(gone[0].1, Reason::GiveWay);
        assert!(s.vms[..3].iter().any(|v| v.id == gone[0].0));
        // The next pass, while it drains, destroys nothing more.
        let mut draining = s.clone();
        draining
            .vms
            .iter_mut()
            .find(|v| v.id == gone[0].0)
            .unwrap()
            .state = VmState::Draining;
        let a = plan(&draining, NOW, &Settings::default());
        assert!(
            a.iter().all(|x| !matches!(
                x,
                Action::Destroy {
                    reason: Reason::GiveWay,
                    ..
                }
            )),
            "{a:?}"
        );
        // Once it is gone, the agent gets the slot.
        let mut freed = s.clone();
        freed.vms.retain(|v| v.id != gone[0].0);
        assert_eq!(
            plan(&freed, NOW, &Settings::default()),
            vec![Action::Boot {
                workspace: "b".into(),
                reserved_for: Some(waiting.id)
            }]
        );
        // No surplus (a at its min_idle): nothing gives way.
        let mut s = snap(
            2,
            vec![ws("a", 1, 5), ws("b", 0, 2)],
            vec![vm("a", VmState::Idle)],
        );
        held_vm(&mut s, "b");
        s.queued = vec![agent("b")];
        assert!(plan(&s, NOW, &Settings::default()).is_empty());
    }

    #[test]
    fn surplus_idle_gives_way_to_a_backfill_below_min_idle_at_the_cap() {
        let s = snap(
            4,
            vec![ws("a", 1, 5), ws("b", 2, 2)],
            (0..4).map(|_| vm("a", VmState::Idle)).collect(),
        );
        let gone = destroys(&plan(&s, NOW, &Settings::default()));
        assert_eq!(gone.len(), 2);
        assert!(gone.iter().all(|(_, r)| *r == Reason::GiveWay));
        // Below the cap, the backfill boots and nothing gives way.
        let s = snap(
            6,
            vec![ws("a", 1, 5), ws("b", 2, 2)],
            (0..4).map(|_| vm("a", VmState::Idle)).collect(),
        );
        let a = plan(&s, NOW, &Settings::default());
        assert!(destroys(&a).is_empty());
        assert_eq!(boots(&a, "b"), 2);
    }

    #[test]
    fn a_workspace_configured_first_gives_way_to_a_later_one_at_the_cap() {
        // web took the whole cap before api existed; both want 3 of 3.
        let s = snap(
            3,
            vec![ws("api", 3, 3), ws("web", 3, 3)],
            (0..3).map(|_| vm("web", VmState::Idle)).collect(),
        );
        let gone = destroys(&plan(&s, NOW, &Settings::default()));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].1, Reason::GiveWay);
        // Passes until nothing changes: shared in proportion, then stable.
        let mut world = s;
        for _ in 0..6 {
            let actions = plan(&world, NOW, &Settings::default());
            world = apply(&world, &actions);
        }
        let idle = |w: &str| world.vms.iter().filter(|v| v.workspace == w).count();
        assert_eq!((idle("web"), idle("api")), (2, 1));
        assert!(plan(&world, NOW, &Settings::default()).is_empty());
        // A workspace nothing gives way to does not hold up another that
        // something does (a found by proptest).
        let mut s = snap(
            3,
            vec![ws("a", 1, 3), ws("b", 2, 4), ws("c", 2, 4)],
            (0..4).map(|_| vm("c", VmState::Idle)).collect(),
        );
        s.queued = vec![agent("a")];
        let mut world = s;
        for _ in 0..6 {
            let actions = plan(&world, NOW, &Settings::default());
            world = apply(&world, &actions);
        }
        let idle = |w: &str| {
            world
                .vms
                .iter()
                .filter(|v| v.workspace == w && v.state == VmState::Idle)
                .count()
        };
        // a's agent runs; c gave up all but one of its min_idle of 2 (one
        // to the cap, one to the agent, one to a backfill short of its own).
        assert!(world.queued.is_empty());
        assert_eq!(world.vms.len(), 3);
        assert_eq!((idle("a") + idle("b"), idle("c")), (1, 1));
    }

    #[test]
    fn over_the_cap_destroys_idle_vms_never_assigned_ones() {
        // max_vms lowered to 2 with 2 assigned and 3 idle (a at min_idle 2).
        let mut s = snap(
            2,
            vec![ws("a", 2, 5)],
            (0..3).map(|_| vm("a", VmState::Idle)).collect(),
        );
        let held = [held_vm(&mut s, "a"), held_vm(&mut s, "a")];
        let a = plan(&s, NOW, &Settings::default());
        let gone = destroys(&a);
        assert_eq!(gone.len(), 3, "{a:?}");
        assert!(
            gone.iter()
                .all(|(id, r)| *r == Reason::OverCap && !held.contains(id))
        );
        assert_eq!(boots(&a, "a"), 0);
        // A VM let go of while over the cap is not kept warm.
        let mut s = snap(1, vec![ws("a", 0, 5)], vec![vm("a", VmState::Idle)]);
        let mut back = vm("a", VmState::Assigned);
        back.agent_id = Some(AgentId::new());
        s.vms.push(back.clone());
        let a = plan(&s, NOW, &Settings::default());
        assert!(
            a.contains(&Action::Return {
                vm: back.id,
                to_idle: false
            }),
            "{a:?}"
        );
        // Draining ones count as leaving: nothing more to destroy.
        let mut s = snap(
            1,
            vec![ws("a", 1, 5)],
            vec![vm("a", VmState::Idle), vm("a", VmState::Draining)],
        );
        s.in_flight.insert(s.vms[1].id);
        assert!(plan(&s, NOW, &Settings::default()).is_empty());
    }

    #[test]
    fn deadlines_are_the_earliest_future_moment_the_clock_changes_the_plan() {
        let settings = Settings::default();
        let mut w = ws("a", 0, 5);
        w.idle_timeout_ms = 2000;
        let mut idle = vm("a", VmState::Idle);
        idle.updated_at = NOW - 500;
        let mut s = snap(10, vec![w.clone()], vec![idle.clone()]);
        let at = next_deadline(&s, &HashSet::new(), NOW, &settings).unwrap();
        assert_eq!(at, NOW + 1501);
        // Not destroyed before it, destroyed at it.
        assert!(destroys(&plan(&s, at - 1, &settings)).is_empty());
        assert_eq!(
            destroys(&plan(&s, at, &settings)),
            vec![(idle.id, Reason::IdleTimeout)]
        );
        // A boot nothing runs times out.
        let mut boot = vm("a", VmState::Booting);
        boot.updated_at = NOW;
        s.vms = vec![boot.clone()];
        let at = next_deadline(&s, &HashSet::new(), NOW, &settings).unwrap();
        assert_eq!(at, NOW + settings.boot_timeout_ms + 1);
        assert_eq!(
            destroys(&plan(&s, at, &settings)),
            vec![(boot.id, Reason::BootTimeout)]
        );
        // In flight: its task wakes the pool, no deadline.
        let flying: HashSet<VmId> = [boot.id].into();
        assert_eq!(next_deadline(&s, &flying, NOW, &settings), None);
        // A back-off ending.
        let mut w = ws("a", 1, 1);
        w.state.consecutive_failures = 1;
        w.state.backoff_until = Some(NOW + 700);
        let s = snap(10, vec![w], vec![]);
        assert_eq!(
            next_deadline(&s, &HashSet::new(), NOW, &settings),
            Some(NOW + 700)
        );
        assert_eq!(boots(&plan(&s, NOW + 699, &settings), "a"), 0);
        assert_eq!(boots(&plan(&s, NOW + 700, &settings), "a"), 1);
        // Past deadlines are left out (nothing is due: no busy loop).
        assert_eq!(
            next_deadline(&s, &HashSet::new(), NOW + 700, &settings),
            None
        );
    }

    /// Carries out a plan as if every task finished at once: boots come up
    /// (for their agent, or warm), destroys and cold returns remove the VM,
    /// assignments take an idle VM (fresh first); held VMs stay held.
    fn apply(s: &Snapshot, actions: &[Action]) -> Snapshot {
        let mut next = s.clone();
        for action in actions {
            match action {
                Action::Destroy { vm, .. }
                | Action::Return { vm, to_idle: false }
                | Action::GiveUp { vm, .. }
                | Action::Lose { vm, .. } => {
                    next.vms.retain(|v| v.id != *vm);
                }
                Action::Return { vm, to_idle: true } => {
                    let v = next.vms.iter_mut().find(|v| v.id == *vm).unwrap();
                    v.state = VmState::Idle;
                    v.agent_id = None;
                    v.updated_at = NOW;
                }
                Action::Boot {
                    workspace,
                    reserved_for,
                } => {
                    let mut v = vm(workspace, VmState::Idle);
                    if let Some(agent) = reserved_for {
                        v.state = VmState::Assigned;
                        v.agent_id = Some(*agent);
                        next.holders
                            .insert(*agent, (AgentPhase::Running, Some(v.id)));
                        next.queued.retain(|a| a.id != *agent);
                    }
                    next.vms.push(v);
                }
                Action::Assign { agent, workspace } => {
                    let v = next
                        .vms
                        .iter_mut()
                        .find(|v| v.state == VmState::Idle && !v.test && v.workspace == *workspace)
                        .unwrap();
                    v.state = VmState::Assigned;
                    v.agent_id = Some(*agent);
                    next.holders
                        .insert(*agent, (AgentPhase::Running, Some(v.id)));
                    next.queued.retain(|a| a.id != *agent);
                }
                Action::FailAgent { agent, .. } => next.queued.retain(|a| a.id != *agent),
                Action::MarkStale { .. } => {}
            }
        }
        // Boots under way when the pass began come up warm.
        for v in &mut next.vms {
            if matches!(v.state, VmState::Booting | VmState::Provisioning) {
                match v.reserved_for.take() {
                    Some(agent) => {
                        v.state = VmState::Assigned;
                        v.agent_id = Some(agent);
                        next.holders
                            .insert(agent, (AgentPhase::Running, Some(v.id)));
                    }
                    None => v.state = VmState::Idle,
                }
            }
        }
        next
    }

    /// A tenant at or over its cap: idle VMs of each workspace (some
    /// above min_idle), VMs held by running agents, queued agents of any
    /// workspace, and a max_vms at most the live count.
    fn arb_capped() -> impl Strategy<Value = (Snapshot, usize)> {
        (
            prop::collection::vec((0usize..3, 0usize..3, 0usize..5, 0usize..3), 1..4),
            prop::collection::vec(0usize..4, 0..5),
            0usize..4,
        )
            .prop_map(|(wss, queued, lower)| {
                let names = ["a", "b", "c", "d"];
                let mut s = snap(0, vec![], vec![]);
                for (i, &(min, extra, idle, held)) in wss.iter().enumerate() {
                    s.workspaces.push(ws(names[i], min, min + extra + 2));
                    for _ in 0..idle.min(min + extra + 2) {
                        s.vms.push(vm(names[i], VmState::Idle));
                    }
                    for _ in 0..held {
                        held_vm(&mut s, names[i]);
                    }
                }
                let n = s.workspaces.len();
                s.queued = queued.into_iter().map(|w| agent(names[w % n])).collect();
                let live = s.vms.len();
                s.max_vms = Some((live.saturating_sub(lower)).max(1) as i64);
                (s, lower)
            })
    }

    proptest! {
        #[test]
        fn over_the_cap_converges_and_surplus_gives_way((s, _) in arb_capped()) {
            let settings = Settings::default();
            let max = s.max_vms.unwrap() as usize;
            let mut world = s.clone();
            for _ in 0..8 {
                let actions = plan(&world, NOW, &settings);
                for a in &actions {
                    if let Action::Destroy { vm, .. } = a {
                        let v = world.vms.iter().find(|v| v.id == *vm).unwrap();
                        prop_assert_ne!(v.state, VmState::Assigned, "an assigned VM is never destroyed");
                    }
                }
                let was_within = world.vms.len() <= max;
                world = apply(&world, &actions);
                // Once within the cap, it stays within.
                prop_assert!(!was_within || world.vms.len() <= max);
            }
            let idle: Vec<&VmRecord> = world.vms.iter().filter(|v| v.state == VmState::Idle).collect();
            // Within the cap, or nothing idle is left to destroy.
            prop_assert!(world.vms.len() <= max || idle.is_empty(), "{} live, max {max}", world.vms.len());
            // A queued agent still waiting means no workspace keeps an idle
            // VM above its min_idle (and none of its own).
            if let Some(waiting) = world.queued.first() {
                prop_assert!(!idle.iter().any(|v| v.workspace == waiting.workspace));
                for w in &world.workspaces {
                    let mine = idle.iter().filter(|v| v.workspace == w.name).count();
                    prop_assert!(mine <= w.min_idle, "{} keeps {mine} idle above min_idle {} while {} waits", w.name, w.min_idle, waiting.workspace);
                }
            }
            // Backfill below min_idle likewise: a workspace short of its
            // min_idle at the cap leaves no surplus elsewhere, and one with
            // nothing warm no other workspace that would still be as full
            // after giving it one.
            if world.vms.len() >= max {
                let idle_of = |w: &WorkspaceView| idle.iter().filter(|v| v.workspace == w.name).count();
                for short in world.workspaces.iter().filter(|w| idle_of(w) < w.min_idle) {
                    for w in &world.workspaces {
                        let mine = idle_of(w);
                        prop_assert!(mine <= w.min_idle);
                        if w.name != short.name && mine > 0 && w.min_idle > 0 && idle_of(short) == 0 {
                            prop_assert!(
                                (mine - 1) * short.min_idle < (idle_of(short) + 1) * w.min_idle,
                                "{} keeps {mine} of {} while {} has {} of {}",
                                w.name, w.min_idle, short.name, idle_of(short), short.min_idle
                            );
                        }
                    }
                }
            }
            // Settled: one more pass changes nothing.
            let again = plan(&world, NOW, &settings);
            prop_assert!(
                again.iter().all(|a| !matches!(a, Action::Destroy { .. } | Action::Boot { .. })),
                "not settled after 8 passes: {:?}", again
            );
        }
    }

    fn arb_snapshot() -> impl Strategy<Value = (Snapshot, usize)> {
        let states = prop::sample::select(vec![
            VmState::Booting,
            VmState::Provisioning,
            VmState::Idle,
            VmState::Assigned,
            VmState::Draining,
        ]);
        (
            1i64..40,
            prop::collection::vec((0usize..4, 0usize..6, 0usize..6), 1..4),
            prop::collection::vec((0usize..4, states, any::<bool>(), any::<bool>()), 0..40),
            prop::collection::vec(0usize..4, 0..10),
            1usize..10,
        )
            .prop_map(|(max_vms, wss, vms, queued, concurrent)| {
                let names = ["a", "b", "c", "d"];
                let workspaces: Vec<_> = wss
                    .iter()
                    .enumerate()
                    .map(|(i, (_, min, extra))| ws(names[i], *min, *min + *extra))
                    .collect();
                let vms: Vec<_> = vms
                    .into_iter()
                    .map(|(w, state, stale, busy)| {
                        let mut v = vm(names[w % workspaces.len()], state);
                        // Stale by version or by setup: the planner treats both alike.
                        if stale && w % 2 == 0 {
                            v.env_version = 0;
                        } else if stale {
                            v.setup_digest = "setup-0".into();
                        }
                        if state == VmState::Assigned && busy {
                            v.agent_id = Some(AgentId::new());
                        }
                        v
                    })
                    .collect();
                let mut s = snap(max_vms, workspaces.clone(), vms);
                for v in &s.vms {
                    if let Some(a) = v.agent_id {
                        s.holders.insert(a, (AgentPhase::Running, Some(v.id)));
                    }
                }
                s.queued = queued
                    .into_iter()
                    .map(|w| agent(names[w % workspaces.len()]))
                    .collect();
                (s, concurrent)
            })
    }

    proptest! {
        #[test]
        fn plans_respect_the_invariants((s, concurrent) in arb_snapshot()) {
            let settings = Settings { max_concurrent_boots: concurrent, ..Default::default() };
            let actions = plan(&s, NOW, &settings);
            let boots = actions.iter().filter(|a| matches!(a, Action::Boot { .. })).count() as i64;
            let live = s.vms.len() as i64;
            let room_made = actions.iter().filter(|a| matches!(a, Action::Destroy { reason: Reason::Stale, .. })).count() as i64;
            // Never beyond the cap (a stale VM destroyed to make room frees its slot).
            prop_assert!(boots == 0 || live + boots - room_made <= s.max_vms.unwrap());
            let booting = s.vms.iter().filter(|v| matches!(v.state, VmState::Booting | VmState::Provisioning)).count();
            prop_assert!(boots == 0 || booting + boots as usize <= concurrent);
            for a in &actions {
                if let Action::Destroy { vm, from, .. } = a {
                    let v = s.vms.iter().find(|v| v.id == *vm).unwrap();
                    prop_assert_ne!(v.state, VmState::Assigned);
                    prop_assert_eq!(v.state, *from);
                }
                if let Action::Return { vm, .. } = a {
                    let v = s.vms.iter().find(|v| v.id == *vm).unwrap();
                    let held = v.agent_id.and_then(|id| s.holders.get(&id)).is_some();
                    prop_assert!(!held, "a VM an agent holds is never returned");
                }
            }
            let mut seen = HashSet::new();
            for a in &actions {
                if let Action::Destroy { vm, .. } | Action::Return { vm, .. } = a {
                    prop_assert!(seen.insert(*vm), "one action per VM");
                }
            }
        }
    }
    /// The planner before it was made linear (a `BTreeMap` of workspaces,
    /// per-name maps, a scan of the queue per workspace), kept verbatim to
    /// check that the rewrite decides exactly the same.
    mod reference {
        use crate::plan::{Action, Reason, Settings, Snapshot, WorkspaceView, is_stale, may_boot};
        use hearth_store::{AgentPhase, Millis, VmRecord, VmState};
        use std::collections::{BTreeMap, HashMap, HashSet};

        #[derive(Default)]
        struct Counts {
            fresh_idle: Vec<usize>,
            stale_idle: Vec<usize>,
            booting_free: usize,
        }

        /// Plans one pass (the planner as it was before it was made linear).
        pub fn reference_plan(snap: &Snapshot, now: Millis, settings: &Settings) -> Vec<Action> {
            let mut actions = Vec::new();
            let workspaces: BTreeMap<&str, &WorkspaceView> = snap
                .workspaces
                .iter()
                .map(|w| (w.name.as_str(), w))
                .collect();
            let live = snap.vms.len() as i64;
            let mut capacity = snap.max_vms.map_or(0, |m| (m - live).max(0));
            let mut booting = snap
                .vms
                .iter()
                .filter(|v| matches!(v.state, VmState::Booting | VmState::Provisioning))
                .count();
            let mut counts: HashMap<&str, Counts> = HashMap::new();
            let mut stale_marks = HashSet::new();

            // Boots under way per workspace: a workspace whose boots fail probes
            // with one at a time.
            let mut booting_in: HashMap<&str, usize> = HashMap::new();
            for vm in &snap.vms {
                if matches!(vm.state, VmState::Booting | VmState::Provisioning) {
                    *booting_in.entry(vm.workspace.as_str()).or_default() += 1;
                }
            }
            let probing = |ws: &WorkspaceView, booting_in: &HashMap<&str, usize>| {
                ws.state.consecutive_failures > 0
                    && booting_in.get(ws.name.as_str()).copied().unwrap_or(0) > 0
            };
            // Whether an agent still holds a VM (running or idle on it).
            let held = |vm: &VmRecord| {
                let holder = vm.agent_id.and_then(|a| snap.holders.get(&a));
                matches!(holder, Some((phase, Some(on))) if *on == vm.id
                    && matches!(phase, AgentPhase::Running | AgentPhase::Idle))
            };
            for (i, vm) in snap.vms.iter().enumerate() {
                if snap.in_flight.contains(&vm.id) {
                    if matches!(vm.state, VmState::Booting | VmState::Provisioning)
                        && vm.reserved_for.is_none()
                        && !vm.test
                    {
                        counts
                            .entry(vm.workspace.as_str())
                            .or_default()
                            .booting_free += 1;
                    }
                    if (vm.state == VmState::Assigned && !held(vm))
                        || (vm.state == VmState::Idle && !vm.test)
                    {
                        // Being returned: it may come back warm, so it counts
                        // against max_idle until its return is done.
                        counts
                            .entry(vm.workspace.as_str())
                            .or_default()
                            .fresh_idle
                            .push(usize::MAX);
                    }
                    continue;
                }
                let ws = workspaces.get(vm.workspace.as_str()).copied();
                match vm.state {
                    VmState::Draining => actions.push(Action::Destroy {
                        vm: vm.id,
                        from: VmState::Draining,
                        reason: Reason::Draining,
                    }),
                    VmState::Booting | VmState::Provisioning => {
                        // A boot no task of this server runs: left by a crash or by
                        // another server; past the timeout it is given up.
                        if now - vm.updated_at > settings.boot_timeout_ms {
                            actions.push(Action::Destroy {
                                vm: vm.id,
                                from: vm.state,
                                reason: Reason::BootTimeout,
                            });
                        } else if vm.reserved_for.is_none() && !vm.test {
                            counts
                                .entry(vm.workspace.as_str())
                                .or_default()
                                .booting_free += 1;
                        }
                    }
                    VmState::Assigned => {
                        if !held(vm) {
                            // Returned now; whether it stays warm is decided below,
                            // once every idle VM is counted.
                            counts.entry(vm.workspace.as_str()).or_default();
                        }
                    }
                    VmState::Idle => {
                        if vm.test {
                            continue;
                        }
                        let c = counts.entry(vm.workspace.as_str()).or_default();
                        match ws {
                            Some(ws) if is_stale(vm, ws) => {
                                c.stale_idle.push(i);
                                if !vm.stale {
                                    stale_marks.insert(ws.name.clone());
                                }
                            }
                            _ => c.fresh_idle.push(i),
                        }
                    }
                    VmState::Destroyed | VmState::Failed => {}
                }
            }
            for workspace in stale_marks {
                actions.push(Action::MarkStale { workspace });
            }

            // Returns: an assigned VM whose agent let go goes back warm while its
            // workspace is under max_idle, else it is destroyed.
            for vm in &snap.vms {
                if vm.state != VmState::Assigned || snap.in_flight.contains(&vm.id) {
                    continue;
                }
                if held(vm) {
                    continue;
                }
                let to_idle = match workspaces.get(vm.workspace.as_str()) {
                    Some(ws) if !snap.stopped && !is_stale(vm, ws) => {
                        let c = counts.entry(vm.workspace.as_str()).or_default();
                        let warm = c.fresh_idle.len() + c.stale_idle.len();
                        if warm < ws.max_idle {
                            // Counted as idle from now on (index unused for returns).
                            c.fresh_idle.push(usize::MAX);
                            true
                        } else {
                            false
                        }
                    }
                    _ => false,
                };
                actions.push(Action::Return { vm: vm.id, to_idle });
            }

            let destroy_idle = |actions: &mut Vec<Action>, index: usize, reason: Reason| {
                if index != usize::MAX {
                    actions.push(Action::Destroy {
                        vm: snap.vms[index].id,
                        from: VmState::Idle,
                        reason,
                    });
                }
            };

            if snap.stopped {
                for c in counts.values() {
                    for &i in c.fresh_idle.iter().chain(&c.stale_idle) {
                        destroy_idle(&mut actions, i, Reason::PoolStopped);
                    }
                }
                return actions;
            }

            // Idle VMs of workspaces that no longer exist.
            for (name, c) in &counts {
                if !workspaces.contains_key(name) {
                    for &i in c.fresh_idle.iter().chain(&c.stale_idle) {
                        destroy_idle(&mut actions, i, Reason::WorkspaceGone);
                    }
                }
            }

            // Queued agents, first in first out: an idle VM when there is one, else
            // a cold boot while capacity lasts.
            let mut spare_idle: HashMap<&str, usize> = counts
                .iter()
                .map(|(k, c)| (*k, c.fresh_idle.len() + c.stale_idle.len()))
                .collect();
            let mut boots_blocked = false;
            for agent in &snap.queued {
                let Some(ws) = workspaces.get(agent.workspace.as_str()) else {
                    actions.push(Action::FailAgent {
                        agent: agent.id,
                        error: format!("workspace {:?} no longer exists", agent.workspace),
                    });
                    continue;
                };
                let spare = spare_idle.entry(ws.name.as_str()).or_default();
                if *spare > 0 {
                    *spare -= 1;
                    actions.push(Action::Assign {
                        agent: agent.id,
                        workspace: ws.name.clone(),
                    });
                    continue;
                }
                if ws.state.hard_limited {
                    actions.push(Action::FailAgent {
                        agent: agent.id,
                        error: format!(
                            "workspace {:?} stopped booting VMs after {} consecutive failures: {}",
                            ws.name,
                            ws.state.consecutive_failures,
                            ws.state.last_error.as_deref().unwrap_or("unknown error")
                        ),
                    });
                    continue;
                }
                if boots_blocked || !may_boot(ws, now) || probing(ws, &booting_in) {
                    continue;
                }
                if capacity > 0 && booting < settings.max_concurrent_boots {
                    capacity -= 1;
                    booting += 1;
                    *booting_in.entry(ws.name.as_str()).or_default() += 1;
                    actions.push(Action::Boot {
                        workspace: ws.name.clone(),
                        reserved_for: Some(agent.id),
                    });
                } else {
                    // FIFO: no later agent jumps ahead for a boot.
                    boots_blocked = true;
                }
            }

            // Scale down: stale first, then past max_idle, then past idle_timeout
            // beyond min_idle. Agents about to be assigned take fresh VMs first (as
            // the claim does), so those are left out.
            let mut ready: HashMap<&str, usize> = HashMap::new();
            let mut room_made: i64 = 0;
            for ws in workspaces.values() {
                let Some(c) = counts.get(ws.name.as_str()) else {
                    continue;
                };
                let queued_here = snap
                    .queued
                    .iter()
                    .filter(|a| a.workspace == ws.name)
                    .count();
                let mut fresh: Vec<usize> = c.fresh_idle.clone();
                let mut stale: Vec<usize> = c.stale_idle.clone();
                for _ in 0..queued_here {
                    if fresh.pop().is_none() && stale.pop().is_none() {
                        break;
                    }
                }
                let min_idle = if ws.warm { ws.min_idle } else { 0 };
                let fresh_ready = fresh.len() + c.booting_free;
                let mut stale_destroyed = 0;
                if !stale.is_empty() {
                    // Replace stale VMs once fresh ones cover min_idle; at the cap,
                    // make room for the replacements a few at a time.
                    let room_needed = fresh_ready < min_idle && capacity == 0;
                    if fresh_ready >= min_idle || room_needed {
                        stale_destroyed = stale.len().min(settings.stale_batch);
                        for &i in &stale[..stale_destroyed] {
                            destroy_idle(&mut actions, i, Reason::Stale);
                        }
                        if room_needed {
                            // The slots freed count only once the tenant is back
                            // under its cap.
                            room_made += stale_destroyed as i64;
                            let planned = actions
                                .iter()
                                .filter(|a| matches!(a, Action::Boot { .. }))
                                .count() as i64;
                            capacity = snap
                                .max_vms
                                .map_or(0, |m| (m - (live - room_made) - planned).max(0));
                        }
                    }
                }
                let stale_left = &stale[stale_destroyed..];
                let warm = fresh.len() + stale_left.len();
                if warm > ws.max_idle {
                    let excess = warm - ws.max_idle;
                    for &i in stale_left.iter().take(excess) {
                        destroy_idle(&mut actions, i, Reason::Excess);
                    }
                    for _ in 0..excess.saturating_sub(stale_left.len()) {
                        if let Some(i) = fresh.pop() {
                            destroy_idle(&mut actions, i, Reason::Excess);
                        }
                    }
                }
                let mut keep = fresh.len();
                let mut by_age: Vec<usize> =
                    fresh.iter().copied().filter(|&i| i != usize::MAX).collect();
                by_age.sort_by_key(|&i| snap.vms[i].updated_at);
                for i in by_age {
                    if keep <= min_idle {
                        break;
                    }
                    if now - snap.vms[i].updated_at > ws.idle_timeout_ms {
                        destroy_idle(&mut actions, i, Reason::IdleTimeout);
                        keep -= 1;
                    }
                }
                ready.insert(ws.name.as_str(), keep + c.booting_free);
            }

            // Backfill: bring each workspace's fresh idle + booting up to min_idle,
            // one VM at a time to whichever is furthest below it (in proportion).
            let mut deficits: Vec<(&WorkspaceView, usize, usize)> = workspaces
                .values()
                .filter(|ws| {
                    ws.warm && ws.min_idle > 0 && may_boot(ws, now) && !probing(ws, &booting_in)
                })
                .filter_map(|ws| {
                    let have = ready.get(ws.name.as_str()).copied().unwrap_or(0);
                    // After a failure, one probe boot at a time.
                    let want = if ws.state.consecutive_failures > 0 {
                        ws.min_idle.min(have + 1)
                    } else {
                        ws.min_idle
                    };
                    (have < want).then_some((*ws, have, want))
                })
                .collect();
            while capacity > 0 && booting < settings.max_concurrent_boots && !deficits.is_empty() {
                // Lowest fill ratio first; ties by name (the BTreeMap order).
                let (pos, _) = deficits
                    .iter()
                    .enumerate()
                    .min_by(|(_, a), (_, b)| (a.1 * b.2).cmp(&(b.1 * a.2)))
                    .expect("not empty");
                let entry = &mut deficits[pos];
                actions.push(Action::Boot {
                    workspace: entry.0.name.clone(),
                    reserved_for: None,
                });
                entry.1 += 1;
                capacity -= 1;
                booting += 1;
                if entry.1 >= entry.2 {
                    deficits.remove(pos);
                }
            }
            actions
        }
    }

    /// A snapshot with everything the planner looks at varied: VMs of
    /// unknown workspaces, test VMs, reservations, in-flight VMs, holders
    /// in every phase, old timestamps, stale versions, back-off and hard
    /// limits, warm pools off, a stopped pool, duplicate workspace names.
    fn arb_rich_snapshot() -> impl Strategy<Value = (Snapshot, Settings, Millis)> {
        let states = prop::sample::select(vec![
            VmState::Booting,
            VmState::Provisioning,
            VmState::Idle,
            VmState::Assigned,
            VmState::Draining,
            VmState::Destroyed,
        ]);
        let phases = prop::sample::select(vec![
            AgentPhase::Running,
            AgentPhase::Idle,
            AgentPhase::Completed,
            AgentPhase::Queued,
        ]);
        let workspace = (
            0usize..6,
            0usize..5,
            0usize..4,
            any::<bool>(),
            0i64..3,
            0u8..4,
            prop::sample::select(vec![60_000i64, 900_000]),
        );
        let vms = (
            0usize..7,
            states,
            (any::<bool>(), any::<bool>(), any::<bool>()),
            (any::<bool>(), any::<bool>(), any::<bool>()),
            (phases, any::<bool>()),
            0i64..4,
        );
        (
            (1i64..60, any::<bool>(), any::<bool>()),
            prop::collection::vec(workspace, 0..6),
            prop::collection::vec(vms, 0..60),
            prop::collection::vec(0usize..7, 0..12),
            (1usize..10, 1usize..4),
        )
            .prop_map(
                |((max_vms, has_cap, stopped), wss, vms, queued, (concurrent, batch))| {
                    let names = ["a", "b", "c", "d", "e", "f", "gone"];
                    let settings = Settings {
                        max_concurrent_boots: concurrent,
                        stale_batch: batch,
                        ..Default::default()
                    };
                    let workspaces: Vec<_> = wss
                        .iter()
                        .map(|&(n, min, extra, warm, failures, limit, timeout)| {
                            let mut w = ws(names[n.min(5)], min, min + extra);
                            w.warm = warm;
                            w.idle_timeout_ms = timeout;
                            w.state.consecutive_failures = failures;
                            w.state.hard_limited = limit == 0;
                            w.state.backoff_until = (limit == 1).then_some(NOW + 1000);
                            w
                        })
                        .collect();
                    let mut s = snap(max_vms, workspaces, vec![]);
                    if !has_cap {
                        s.max_vms = None;
                    }
                    s.stopped = stopped;
                    for (
                        w,
                        state,
                        (stale, test, marked),
                        (reserved, busy, flying),
                        (phase, on_it),
                        age,
                    ) in vms
                    {
                        let mut v = vm(names[w], state);
                        if stale {
                            v.env_version = 0;
                        }
                        v.test = test;
                        v.stale = marked;
                        if reserved {
                            v.reserved_for = Some(AgentId::new());
                        }
                        // 0: fresh; 1: past an idle timeout; 2, 3: past the boot timeout.
                        v.updated_at = NOW
                            - [1000, 16 * 60 * 1000, 6 * 60 * 1000, 60 * 60 * 1000][age as usize];
                        if state == VmState::Assigned && busy {
                            let agent = AgentId::new();
                            v.agent_id = Some(agent);
                            let on = if on_it { Some(v.id) } else { Some(VmId::new()) };
                            s.holders.insert(agent, (phase, on));
                        } else if state == VmState::Assigned {
                            v.agent_id = Some(AgentId::new());
                        }
                        if flying {
                            s.in_flight.insert(v.id);
                        }
                        s.vms.push(v);
                    }
                    s.queued = queued.into_iter().map(|w| agent(names[w])).collect();
                    (s, settings, NOW)
                },
            )
    }

    /// Actions whose order is decided (not the order of a hash map's walk).
    fn ordered(actions: &[Action]) -> Vec<&Action> {
        actions
            .iter()
            .filter(|a| {
                !matches!(
                    a,
                    Action::MarkStale { .. }
                        | Action::Destroy {
                            reason: Reason::PoolStopped | Reason::WorkspaceGone,
                            ..
                        }
                )
            })
            .collect()
    }

    fn sorted(actions: &[Action]) -> Vec<String> {
        let mut all: Vec<String> = actions.iter().map(|a| format!("{a:?}")).collect();
        all.sort();
        all
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn the_linear_planner_decides_as_the_reference((s, settings, now) in arb_rich_snapshot()) {
            // The reference predates the cap's rules (make_room): it is
            // compared with the plan before them.
            let base = plan_base(&s, &s.in_flight, &s.nodes, now, &settings).0;
            // The deadline comes with the plan, and the clock changes
            // nothing before it (nothing ever, without one).
            let (planned, due) = plan_with_deadline(&s, &s.in_flight, now, &settings);
            prop_assert_eq!(&planned, &plan(&s, now, &settings));
            let before = due.map_or(now + 1_000_000_000, |d| d - 1);
            prop_assert!(due.is_none_or(|d| d > now));
            prop_assert_eq!(plan(&s, before, &settings), planned);
            let old = reference::reference_plan(&s, now, &settings);
            prop_assert_eq!(sorted(&base), sorted(&old));
            prop_assert_eq!(ordered(&base), ordered(&old));
            // The cap's rules only turn returns cold and add destroys of
            // idle VMs.
            let new = plan(&s, now, &settings);
            prop_assert!(new.len() >= base.len());
            for (a, b) in new.iter().zip(&base) {
                let cold = matches!((a, b), (Action::Return { vm: x, to_idle: false }, Action::Return { vm: y, to_idle: true }) if x == y);
                prop_assert!(a == b || cold, "{:?} became {:?}", b, a);
            }
            for a in &new[base.len()..] {
                prop_assert!(matches!(a, Action::Destroy { from: VmState::Idle, reason: Reason::GiveWay | Reason::OverCap, .. }), "{:?}", a);
            }
            // The in-flight set given apart is the one planned with.
            let mut bare = s.clone();
            bare.in_flight.clear();
            prop_assert_eq!(plan_with_in_flight(&bare, &s.in_flight, now, &settings), new);
        }
    }

    // ------------------------------------------------------------ nodes

    fn node(state: NodeState, silent_ms: Millis) -> (NodeId, NodeView) {
        let id = NodeId::new();
        let view = NodeView {
            name: format!("n-{}", &id.to_string()[..8]),
            state,
            last_heartbeat: NOW - silent_ms,
        };
        (id, view)
    }

    fn on(mut v: VmRecord, node: NodeId) -> VmRecord {
        v.node_id = Some(node);
        v
    }

    fn given_up(actions: &[Action]) -> Vec<VmId> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::GiveUp { vm, .. } => Some(*vm),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_unreachable_nodes_idle_vms_are_given_up_and_backfilled_at_once() {
        let settings = Settings::default();
        let (gone_id, gone) = node(NodeState::Ready, settings.node_timeout_ms + 1);
        let (ok_id, ok) = node(NodeState::Ready, 0);
        let a = on(vm("web", VmState::Idle), gone_id);
        let b = on(vm("web", VmState::Idle), gone_id);
        let c = on(vm("web", VmState::Idle), ok_id);
        let mut booting = on(vm("web", VmState::Booting), gone_id);
        let agent = AgentId::new();
        booting.reserved_for = Some(agent);
        // At the cap (4 of 4): the given-up VMs free their slots at once.
        let mut s = snap(
            4,
            vec![ws("web", 3, 5)],
            vec![a.clone(), b.clone(), c, booting.clone()],
        );
        s.nodes = [(gone_id, gone.clone()), (ok_id, ok)].into();
        let actions = plan(&s, NOW, &settings);
        let mut up = given_up(&actions);
        up.sort();
        let mut want = vec![a.id, b.id, booting.id];
        want.sort();
        assert_eq!(up, want);
        let error = actions.iter().find_map(|x| match x {
            Action::GiveUp { vm, from, error } if *vm == booting.id => Some((*from, error.clone())),
            _ => None,
        });
        assert_eq!(
            error,
            Some((
                VmState::Booting,
                format!("node {} is unreachable", gone.name)
            ))
        );
        // min_idle 3, one warm left on a reachable node: two boots now.
        assert_eq!(boots(&actions, "web"), 2);
        assert!(
            destroys(&actions).is_empty(),
            "no driver call to an unreachable node"
        );
        // Just before the timeout, nothing is given up; the timeout is a deadline.
        let mut fresh = s.clone();
        fresh.nodes.get_mut(&gone_id).unwrap().last_heartbeat = NOW;
        fresh.nodes.get_mut(&ok_id).unwrap().last_heartbeat = NOW + 5_000;
        let (actions, due) = plan_with_deadline(&fresh, &HashSet::new(), NOW, &settings);
        assert!(given_up(&actions).is_empty());
        let due = due.unwrap();
        assert_eq!(due, NOW + settings.node_timeout_ms + 1);
        assert!(given_up(&plan(&fresh, due - 1, &settings)).is_empty());
        assert_eq!(given_up(&plan(&fresh, due, &settings)).len(), 3);
    }

    #[test]
    fn a_held_vm_on_an_unreachable_node_is_lost_only_after_lost_after() {
        let settings = Settings::default();
        let (id, mut view) = node(NodeState::Ready, settings.node_timeout_ms + 1);
        let mut held = on(vm("web", VmState::Assigned), id);
        let agent = AgentId::new();
        held.agent_id = Some(agent);
        let mut s = snap(4, vec![ws("web", 0, 5)], vec![held.clone()]);
        s.holders
            .insert(agent, (AgentPhase::Running, Some(held.id)));
        s.nodes = [(id, view.clone())].into();
        let (actions, due) = plan_with_deadline(&s, &HashSet::new(), NOW, &settings);
        assert!(actions.is_empty(), "{actions:?}");
        let lost_at = view.last_heartbeat + settings.lost_after_ms + 1;
        assert_eq!(due, Some(lost_at));
        let actions = plan(&s, lost_at, &settings);
        let (error, agent_error) = lost_errors(&view.name);
        assert_eq!(
            actions,
            vec![Action::Lose {
                vm: held.id,
                agent: Some(agent),
                error,
                agent_error: agent_error.clone(),
            }]
        );
        assert!(agent_error.contains("its VM was lost") && agent_error.contains(&view.name));
        // Let go of before then: given up (not returned through the driver).
        s.holders
            .insert(agent, (AgentPhase::Completed, Some(held.id)));
        assert_eq!(given_up(&plan(&s, NOW, &settings)), vec![held.id]);
        // The node came back: nothing happens to it.
        view.last_heartbeat = NOW;
        s.nodes = [(id, view)].into();
        s.holders
            .insert(agent, (AgentPhase::Running, Some(held.id)));
        assert!(plan(&s, NOW, &settings).is_empty());
    }

    #[test]
    fn a_draining_nodes_idle_vms_are_replaced_and_its_returns_destroyed() {
        let settings = Settings::default();
        let (drain_id, drain) = node(NodeState::Draining, 0);
        let (cordon_id, cordon) = node(NodeState::Cordoned, 0);
        let idle = on(vm("web", VmState::Idle), drain_id);
        let kept = on(vm("web", VmState::Idle), cordon_id);
        let booting = on(vm("web", VmState::Booting), drain_id);
        let mut returned = on(vm("web", VmState::Assigned), drain_id);
        returned.agent_id = Some(AgentId::new());
        let mut s = snap(
            10,
            vec![ws("web", 2, 5)],
            vec![idle.clone(), kept, booting, returned.clone()],
        );
        s.nodes = [(drain_id, drain), (cordon_id, cordon)].into();
        let actions = plan(&s, NOW, &settings);
        assert_eq!(destroys(&actions), vec![(idle.id, Reason::NodeDraining)]);
        assert!(actions.contains(&Action::Return {
            vm: returned.id,
            to_idle: false
        }));
        // The cordoned node's VM counts, the draining node's do not: one boot.
        assert_eq!(boots(&actions, "web"), 1);
    }

    /// [`arb_rich_snapshot`] with its VMs spread over three nodes (or
    /// none), each ready, cordoned or draining, and silent for a while, past
    /// the node timeout, or past lost_after.
    fn arb_fleet_snapshot() -> impl Strategy<Value = (Snapshot, Settings, Millis)> {
        let nodes = prop::collection::vec((0u8..3, 0usize..3), 3);
        (
            arb_rich_snapshot(),
            nodes,
            prop::collection::vec(0usize..4, 60),
        )
            .prop_map(|((mut s, settings, now), specs, placed)| {
                let ids: Vec<NodeId> = specs
                    .iter()
                    .map(|&(state, silent)| {
                        let state = [NodeState::Ready, NodeState::Cordoned, NodeState::Draining]
                            [state as usize];
                        let silent = [
                            1000,
                            settings.node_timeout_ms + 1,
                            settings.lost_after_ms + 1,
                        ][silent];
                        let (id, view) = node(state, silent);
                        s.nodes.insert(id, view);
                        id
                    })
                    .collect();
                for (v, &n) in s.vms.iter_mut().zip(&placed) {
                    v.node_id = ids.get(n).copied();
                }
                (s, settings, now)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn nodes_are_planned_by_their_invariants((s, settings, now) in arb_fleet_snapshot()) {
            let (actions, due) = plan_with_deadline(&s, &s.in_flight, now, &settings);
            let vm = |id: VmId| s.vms.iter().find(|v| v.id == id).unwrap();
            let node_of = |v: &VmRecord| v.node_id.and_then(|n| s.nodes.get(&n));
            let silent = |v: &VmRecord| node_of(v).map_or(0, |n| now - n.last_heartbeat);
            let unreachable = |v: &VmRecord| silent(v) > settings.node_timeout_ms;
            let held = |v: &VmRecord| {
                let holder = v.agent_id.and_then(|a| s.holders.get(&a));
                matches!(holder, Some((phase, Some(on))) if *on == v.id
                    && matches!(phase, AgentPhase::Running | AgentPhase::Idle))
            };
            let mut gone = HashSet::new();
            for a in &actions {
                match a {
                    Action::GiveUp { vm: id, from, .. } => {
                        let v = vm(*id);
                        prop_assert!(unreachable(v), "given up on a reachable node");
                        prop_assert!(!(v.state == VmState::Assigned && held(v)), "a held VM is never given up");
                        prop_assert_eq!(v.state, *from);
                        prop_assert!(gone.insert(*id));
                    }
                    Action::Lose { vm: id, agent, .. } => {
                        let v = vm(*id);
                        prop_assert!(silent(v) > settings.lost_after_ms);
                        prop_assert!(v.state == VmState::Assigned && held(v));
                        prop_assert_eq!(*agent, v.agent_id);
                        prop_assert!(gone.insert(*id));
                    }
                    // No driver call to an unreachable node, and a
                    // draining node's idle VMs go for that reason only.
                    Action::Destroy { vm: id, .. } | Action::Return { vm: id, .. } => {
                        let v = vm(*id);
                        prop_assert!(!unreachable(v), "{:?} on an unreachable node", a);
                        if let Action::Destroy { reason: Reason::NodeDraining, .. } = a {
                            prop_assert_eq!(node_of(v).map(|n| n.state), Some(NodeState::Draining));
                            prop_assert!(v.state == VmState::Idle && !s.in_flight.contains(id));
                        }
                        if let Action::Return { to_idle: true, .. } = a {
                            prop_assert_ne!(node_of(v).map(|n| n.state), Some(NodeState::Draining));
                        }
                    }
                    _ => {}
                }
            }
            // Every VM on an unreachable node is given up but for held
            // ones, which are lost after lost_after.
            for v in &s.vms {
                if unreachable(v) && v.state.is_live() {
                    let lost = silent(v) > settings.lost_after_ms;
                    let expected = !(v.state == VmState::Assigned && held(v)) || lost;
                    prop_assert_eq!(gone.contains(&v.id), expected, "{:?}", v.state);
                }
            }
            // Never beyond the cap, counting what is gone as gone.
            let boots = actions.iter().filter(|a| matches!(a, Action::Boot { .. })).count() as i64;
            let live = s.vms.iter().filter(|v| v.state.is_live()).count() as i64 - gone.len() as i64;
            let room_made = actions.iter().filter(|a| matches!(a, Action::Destroy { reason: Reason::Stale, .. })).count() as i64;
            if let Some(max) = s.max_vms && boots > 0 {
                prop_assert!(live + boots - room_made <= max);
            }
            // The clock changes nothing before the deadline.
            let before = due.map_or(now + 1_000_000_000, |d| d - 1);
            prop_assert!(due.is_none_or(|d| d > now));
            prop_assert_eq!(plan(&s, before, &settings), actions.clone());
            // The nodes given apart are the ones planned with.
            let mut bare = s.clone();
            bare.nodes.clear();
            prop_assert_eq!(plan_with_nodes(&bare, &s.in_flight, &s.nodes, now, &settings).0, actions);
        }
    }
}
