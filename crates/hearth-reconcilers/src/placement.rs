//! Placement: which node a new VM boots on. A pure choice over the nodes
//! and what their live VMs take of them, read once per pass.
//!
//! **Power of two choices.** Two nodes are sampled at random; of those that
//! can take the VM, the one with more free memory wins. Only when neither
//! can is every node scanned (from a random start, first fit), so a VM is
//! placed whenever some node has room. Why not bin packing or "most free":
//! - the cost per boot is O(1) at any fleet size (a scan only when the
//!   fleet is nearly full), not a sort or a walk of 100 nodes per boot;
//! - warm VMs spread over the fleet, so losing one node costs the pool a
//!   small, even share of its warm VMs (bin packing fills a few nodes and
//!   loses many VMs with one of them);
//! - several placers (replicas, tenants passing one after another on
//!   stale usage) do not herd onto the one emptiest node the way a
//!   deterministic "most free" choice does: every placer would pick the
//!   same node, and all but one would hit its room check in the store.
//!
//! **Invariants** (property-tested below): a node chosen is `ready`,
//! reachable, runs the driver and has room (VM slots, boots in flight,
//! cpus, memory); `None` only when no node has.

use hearth_core::ids::NodeId;
use hearth_store::{Millis, NodeRecord, NodeState, NodeUsage};
use rand::Rng;
use std::collections::{HashMap, HashSet};

/// What a VM needs of its node.
#[derive(Debug, Clone)]
pub struct Need<'a> {
    /// The driver's spelling (`fake`, `sandbox`, `qemu`).
    pub driver: &'a str,
    pub cpus: i64,
    pub memory_mib: i64,
    /// The pass's clock (the store's) and the fleet's `node_timeout`: a
    /// node whose last heartbeat is older is unreachable.
    pub now: Millis,
    pub node_timeout_ms: Millis,
    /// Nodes not to pick (their room check failed in the store this pass).
    pub exclude: &'a HashSet<NodeId>,
}

/// Whether `node` is `ready`, reachable at `need.now`, runs the driver and
/// is not excluded (its room aside).
pub fn eligible(node: &NodeRecord, need: &Need<'_>) -> bool {
    node.state == NodeState::Ready
        && need.now - node.last_heartbeat <= need.node_timeout_ms
        && node.capacity.drivers.iter().any(|d| d == need.driver)
        && !need.exclude.contains(&node.id)
}

/// The free memory `node` has for `need`, or `None` when it cannot take it.
pub fn room(node: &NodeRecord, usage: Option<&NodeUsage>, need: &Need<'_>) -> Option<i64> {
    if !eligible(node, need) {
        return None;
    }
    let used = usage.copied().unwrap_or_default();
    let cap = &node.capacity;
    let fits = used.vms < cap.vm_slots
        && used.booting < cap.max_boots
        && used.cpus + need.cpus <= cap.cpus
        && used.memory_mib + need.memory_mib <= cap.memory_mib;
    fits.then_some(cap.memory_mib - used.memory_mib - need.memory_mib)
}

/// The node to boot on: best of two random samples, else the first node
/// with room from a random start; `None` when no node has room.
pub fn choose(
    nodes: &[NodeRecord],
    usage: &HashMap<NodeId, NodeUsage>,
    need: &Need<'_>,
    rng: &mut impl Rng,
) -> Option<NodeId> {
    let n = nodes.len();
    if n == 0 {
        return None;
    }
    let free = |i: usize| room(&nodes[i], usage.get(&nodes[i].id), need);
    let a = rng.gen_range(0..n);
    let sampled = if n == 1 {
        free(a).map(|f| (f, a))
    } else {
        // Two distinct nodes.
        let b = (a + rng.gen_range(1..n)) % n;
        match (free(a), free(b)) {
            (Some(fa), Some(fb)) => Some(if fb > fa { (fb, b) } else { (fa, a) }),
            (Some(fa), None) => Some((fa, a)),
            (None, Some(fb)) => Some((fb, b)),
            (None, None) => None,
        }
    };
    if let Some((_, i)) = sampled {
        return Some(nodes[i].id);
    }
    let start = rng.gen_range(0..n);
    (0..n)
        .map(|k| (start + k) % n)
        .find(|&i| free(i).is_some())
        .map(|i| nodes[i].id)
}

/// Adds a VM placed on `node` to `usage` (booting), so the next choice of
/// the same pass sees it.
pub fn record(usage: &mut HashMap<NodeId, NodeUsage>, node: NodeId, cpus: i64, memory_mib: i64) {
    let entry = usage.entry(node).or_insert(NodeUsage {
        node: Some(node),
        ..Default::default()
    });
    entry.vms += 1;
    entry.booting += 1;
    entry.cpus += cpus;
    entry.memory_mib += memory_mib;
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_store::NodeCapacity;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const NOW: Millis = 1_000_000;
    const TIMEOUT: Millis = 10_000;

    fn node(name: &str, memory_mib: i64, vm_slots: i64) -> NodeRecord {
        NodeRecord {
            id: NodeId::new(),
            name: name.into(),
            address: "https://127.0.0.1:7071".into(),
            ca_pem: String::new(),
            credential_hash: String::new(),
            state: NodeState::Ready,
            capacity: NodeCapacity {
                drivers: vec!["fake".into()],
                cpus: 64,
                memory_mib,
                disk_mib: 0,
                vm_slots,
                max_boots: 4,
            },
            joined_at: NOW,
            last_heartbeat: NOW,
            updated_at: NOW,
        }
    }

    fn need(exclude: &HashSet<NodeId>) -> Need<'_> {
        Need {
            driver: "fake",
            cpus: 1,
            memory_mib: 512,
            now: NOW,
            node_timeout_ms: TIMEOUT,
            exclude,
        }
    }

    #[test]
    fn only_ready_reachable_nodes_with_the_driver_and_room_are_chosen() {
        let none = HashSet::new();
        let mut rng = StdRng::seed_from_u64(1);
        let mut cordoned = node("cordoned", 8192, 10);
        cordoned.state = NodeState::Cordoned;
        let mut draining = node("draining", 8192, 10);
        draining.state = NodeState::Draining;
        let mut silent = node("silent", 8192, 10);
        silent.last_heartbeat = NOW - TIMEOUT - 1;
        let mut qemu_only = node("qemu", 8192, 10);
        qemu_only.capacity.drivers = vec!["qemu".into()];
        let full = node("full", 256, 10);
        let nodes = vec![cordoned, draining, silent, qemu_only, full];
        for _ in 0..100 {
            assert_eq!(
                choose(&nodes, &HashMap::new(), &need(&none), &mut rng),
                None
            );
        }
        // A heartbeat exactly node_timeout old is still reachable.
        let mut last = node("last", 8192, 10);
        last.last_heartbeat = NOW - TIMEOUT;
        let id = last.id;
        let mut nodes = nodes;
        nodes.push(last);
        for _ in 0..100 {
            assert_eq!(
                choose(&nodes, &HashMap::new(), &need(&none), &mut rng),
                Some(id)
            );
        }
        // Excluded (its room check failed in the store): not chosen.
        let excluded = HashSet::from([id]);
        assert_eq!(
            choose(&nodes, &HashMap::new(), &need(&excluded), &mut rng),
            None
        );
    }

    #[test]
    fn boots_in_flight_and_slots_bound_a_node() {
        let none = HashSet::new();
        let mut rng = StdRng::seed_from_u64(2);
        let a = node("a", 1 << 20, 3);
        let nodes = vec![a.clone()];
        let mut usage = HashMap::new();
        for _ in 0..3 {
            let chosen = choose(&nodes, &usage, &need(&none), &mut rng).unwrap();
            record(&mut usage, chosen, 1, 512);
        }
        // Three slots, and max_boots (4) not reached: the fourth has no slot.
        assert_eq!(choose(&nodes, &usage, &need(&none), &mut rng), None);
        let mut roomy = a;
        roomy.capacity.vm_slots = 100;
        let nodes = vec![roomy];
        record(&mut usage, nodes[0].id, 1, 512);
        // Four booting: max_boots reached.
        assert_eq!(choose(&nodes, &usage, &need(&none), &mut rng), None);
    }

    #[test]
    fn placements_spread_over_the_fleet() {
        let none = HashSet::new();
        let mut rng = StdRng::seed_from_u64(3);
        let nodes: Vec<_> = (0..10)
            .map(|i| node(&format!("n{i}"), 100 * 512, 1000))
            .collect();
        let mut usage = HashMap::new();
        for _ in 0..500 {
            let chosen = choose(&nodes, &usage, &need(&none), &mut rng).unwrap();
            record(&mut usage, chosen, 0, 512);
            // Boots in flight do not bind here: they are done at once.
            usage.get_mut(&chosen).unwrap().booting = 0;
        }
        // Best of two keeps every node within a few VMs of the mean (50).
        for n in &nodes {
            let vms = usage[&n.id].vms;
            assert!((40..=60).contains(&vms), "{} has {vms} VMs", n.name);
        }
    }

    fn arb_fleet() -> impl Strategy<Value = (Vec<NodeRecord>, HashMap<NodeId, NodeUsage>, i64, u64)>
    {
        let one = (
            0u8..3,
            any::<bool>(),
            any::<bool>(),
            (0i64..5, 0i64..5, 0i64..5, 0i64..5),
            (0i64..5, 0i64..5, 0i64..5, 0i64..5),
        );
        (prop::collection::vec(one, 0..12), 0i64..3, any::<u64>()).prop_map(
            |(specs, need_cpus, seed)| {
                let mut nodes = Vec::new();
                let mut usage = HashMap::new();
                for (i, (state, silent, qemu, cap, used)) in specs.into_iter().enumerate() {
                    let mut n = node(&format!("n{i}"), cap.3 * 256, cap.0);
                    n.state = [NodeState::Ready, NodeState::Cordoned, NodeState::Draining]
                        [state as usize];
                    if silent {
                        n.last_heartbeat = NOW - TIMEOUT - 1;
                    }
                    if qemu {
                        n.capacity.drivers = vec!["qemu".into()];
                    }
                    n.capacity.max_boots = cap.1;
                    n.capacity.cpus = cap.2;
                    usage.insert(
                        n.id,
                        NodeUsage {
                            node: Some(n.id),
                            vms: used.0,
                            booting: used.1,
                            cpus: used.2,
                            memory_mib: used.3 * 256,
                        },
                    );
                    nodes.push(n);
                }
                (nodes, usage, need_cpus, seed)
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn never_a_node_without_room_and_always_one_with((nodes, usage, cpus, seed) in arb_fleet()) {
            let none = HashSet::new();
            let need = Need { cpus, memory_mib: 256, ..need(&none) };
            let mut rng = StdRng::seed_from_u64(seed);
            let fits = |n: &NodeRecord| {
                let u = usage[&n.id];
                n.state == NodeState::Ready
                    && NOW - n.last_heartbeat <= TIMEOUT
                    && n.capacity.drivers.iter().any(|d| d == "fake")
                    && u.vms < n.capacity.vm_slots
                    && u.booting < n.capacity.max_boots
                    && u.cpus + cpus <= n.capacity.cpus
                    && u.memory_mib + 256 <= n.capacity.memory_mib
            };
            let any_fits = nodes.iter().any(fits);
            match choose(&nodes, &usage, &need, &mut rng) {
                Some(id) => {
                    let n = nodes.iter().find(|n| n.id == id).unwrap();
                    prop_assert!(fits(n), "{} has no room", n.name);
                }
                None => prop_assert!(!any_fits, "a node had room"),
            }
        }
    }
}
