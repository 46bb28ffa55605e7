//! The machine's CPUs as the per-core runtime places its workers on them: NUMA nodes, physical
//! cores and their SMT siblings, read from `/sys` and limited to the CPUs this process may run on
//! (its affinity mask: a container's cpuset, `taskset`). When `/sys` says nothing usable, every
//! allowed CPU counts as a core of its own on one node.
//!
//! Pinning is `sched_setaffinity` on the calling thread. Where it is not permitted (some
//! containers, a seccomp profile), the caller logs the error and goes on unpinned.

use std::collections::BTreeMap;
use std::path::Path;

/// One physical core: its logical CPUs (the first is where a worker goes; the others are its SMT
/// siblings) and its NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Core {
    /// Logical CPU numbers, lowest first.
    pub cpus: Vec<usize>,
    /// The NUMA node (0 when unknown).
    pub node: usize,
}

/// The cores this process may run on, in the order workers take them: dealt out node by node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Physical cores.
    pub cores: Vec<Core>,
    /// How the topology was learnt: `"sysfs"` or a fallback's reason.
    pub source: String,
}

impl Topology {
    /// The machine's topology, from `/sys` and this process's affinity mask.
    pub fn detect() -> Self {
        let allowed = allowed_cpus();
        Self::read(Path::new("/sys/devices/system"), &allowed)
    }

    /// The topology under a sysfs root, for the `allowed` CPUs (all online ones when empty).
    pub fn read(sys: &Path, allowed: &[usize]) -> Self {
        let online = std::fs::read_to_string(sys.join("cpu/online"))
            .ok()
            .and_then(|list| parse_cpu_list(list.trim()));
        let cpus: Vec<usize> = match online {
            Some(online) if allowed.is_empty() => online,
            Some(online) => online
                .into_iter()
                .filter(|cpu| allowed.contains(cpu))
                .collect(),
            None => {
                return Self::flat(allowed, "no /sys/devices/system/cpu/online");
            }
        };
        if cpus.is_empty() {
            return Self::flat(allowed, "no allowed CPU is online in /sys");
        }
        let nodes = node_of_cpus(sys);
        // (node, package, core id) → cpus
        let mut cores: BTreeMap<(usize, usize, usize), Vec<usize>> = BTreeMap::new();
        for &cpu in &cpus {
            let topology = sys.join(format!("cpu/cpu{cpu}/topology"));
            let read = |name: &str| {
                std::fs::read_to_string(topology.join(name))
                    .ok()
                    .and_then(|text| text.trim().parse::<i64>().ok())
            };
            let (Some(package), Some(core)) = (read("physical_package_id"), read("core_id")) else {
                return Self::flat(&cpus, "no core_id/physical_package_id in /sys");
            };
            let node = nodes.get(&cpu).copied().unwrap_or(0);
            cores
                .entry((node, package.max(0) as usize, core.max(0) as usize))
                .or_default()
                .push(cpu);
        }
        let mut cores: Vec<Core> = cores
            .into_iter()
            .map(|((node, _, _), mut cpus)| {
                cpus.sort_unstable();
                Core { cpus, node }
            })
            .collect();
        cores.sort_by_key(|core| (core.node, core.cpus[0]));
        // Dealt out node by node (the first core of each node, then the second, ...), so the
        // first workers spread over every node.
        let mut by_node: BTreeMap<usize, std::collections::VecDeque<Core>> = BTreeMap::new();
        for core in cores {
            by_node.entry(core.node).or_default().push_back(core);
        }
        let mut cores = Vec::new();
        while by_node.values().any(|queue| !queue.is_empty()) {
            for queue in by_node.values_mut() {
                cores.extend(queue.pop_front());
            }
        }
        Self {
            cores,
            source: "sysfs".into(),
        }
    }

    /// One node, every CPU a core of its own.
    fn flat(cpus: &[usize], reason: &str) -> Self {
        let cpus: Vec<usize> = if cpus.is_empty() {
            (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
        } else {
            cpus.to_vec()
        };
        Self {
            cores: cpus
                .into_iter()
                .map(|cpu| Core {
                    cpus: vec![cpu],
                    node: 0,
                })
                .collect(),
            source: format!("fallback ({reason}): one node, every CPU a core"),
        }
    }

    /// How many NUMA nodes hold the cores.
    pub fn nodes(&self) -> usize {
        let mut nodes: Vec<usize> = self.cores.iter().map(|c| c.node).collect();
        nodes.sort_unstable();
        nodes.dedup();
        nodes.len()
    }

    /// Every CPU of every core.
    pub fn cpus(&self) -> Vec<usize> {
        let mut cpus: Vec<usize> = self
            .cores
            .iter()
            .flat_map(|c| c.cpus.iter().copied())
            .collect();
        cpus.sort_unstable();
        cpus
    }

    /// Where worker `index` of `workers` goes: cores are dealt out node by node, so workers spread
    /// over every node; past the number of cores they wrap around.
    pub fn core_for(&self, index: usize) -> &Core {
        &self.cores[index % self.cores.len()]
    }

    /// The logical CPU worker `index` is pinned to: the first CPU of its core ([`Self::core_for`])
    /// for the first round of workers, then that core's next SMT sibling, so workers past the
    /// number of physical cores (a container given two hyperthreads of one core, say) each get a
    /// CPU of their own rather than sharing one while its sibling idles.
    pub fn cpu_for(&self, index: usize) -> usize {
        // The first CPU of every core, then the second of every core that has one, and so on:
        // cores with fewer SMT threads than others never get a CPU twice while one idles.
        let rounds = self.cores.iter().map(|c| c.cpus.len()).max().unwrap_or(1);
        let order: Vec<usize> = (0..rounds)
            .flat_map(|round| {
                self.cores
                    .iter()
                    .filter_map(move |c| c.cpus.get(round).copied())
            })
            .collect();
        order[index % order.len()]
    }

    /// The CPUs no worker of `workers` sits on (their SMT siblings excluded): where background
    /// threads go. Empty when the workers take every core.
    pub fn spare_cpus(&self, workers: usize) -> Vec<usize> {
        self.cores
            .iter()
            .skip(workers)
            .flat_map(|core| core.cpus.iter().copied())
            .collect()
    }
}

/// `0-3,8,10-11` → `[0, 1, 2, 3, 8, 10, 11]`.
pub fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    if list.is_empty() {
        return Some(cpus);
    }
    for part in list.split(',') {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (first.parse::<usize>().ok()?, last.parse::<usize>().ok()?);
                if last < first || last - first > 65_536 {
                    return None;
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// CPU → NUMA node, from `node/node<N>/cpulist`.
fn node_of_cpus(sys: &Path) -> BTreeMap<usize, usize> {
    let mut nodes = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(sys.join("node")) else {
        return nodes;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(node) = name
            .to_str()
            .and_then(|n| n.strip_prefix("node"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if let Some(cpus) = std::fs::read_to_string(entry.path().join("cpulist"))
            .ok()
            .and_then(|list| parse_cpu_list(list.trim()))
        {
            for cpu in cpus {
                nodes.insert(cpu, node);
            }
        }
    }
    nodes
}

/// The CPUs this process may run on (empty when the OS does not say).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bit set owned here; the call writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Restricts the calling thread to `cpus` (threads it starts afterwards inherit this).
pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: `set` is a plain bit set owned here; CPU_SET bounds-checks against its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            if cpu >= libc::CPU_SETSIZE as usize {
                return Err(std::io::Error::other(format!(
                    "cpu {cpu} is past CPU_SETSIZE"
                )));
            }
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, path: &str, text: &str) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        std::fs::write(path, text).expect("write");
    }

    /// Two nodes, two cores each, two SMT threads per core (cpu n and n + 4 are siblings).
    fn two_nodes_with_smt() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        write(root, "cpu/online", "0-7\n");
        for cpu in 0..8 {
            let core = cpu % 4;
            write(
                root,
                &format!("cpu/cpu{cpu}/topology/core_id"),
                &format!("{core}\n"),
            );
            write(
                root,
                &format!("cpu/cpu{cpu}/topology/physical_package_id"),
                &format!("{}\n", core / 2),
            );
        }
        write(root, "node/node0/cpulist", "0-1,4-5\n");
        write(root, "node/node1/cpulist", "2-3,6-7\n");
        dir
    }

    #[test]
    fn cpu_lists_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn physical_cores_group_their_smt_siblings_and_spread_over_nodes() {
        let dir = two_nodes_with_smt();
        let topology = Topology::read(dir.path(), &[]);
        assert_eq!(topology.source, "sysfs");
        assert_eq!(topology.nodes(), 2);
        let cores: Vec<(Vec<usize>, usize)> = topology
            .cores
            .iter()
            .map(|c| (c.cpus.clone(), c.node))
            .collect();
        assert_eq!(
            cores,
            vec![
                (vec![0, 4], 0),
                (vec![2, 6], 1),
                (vec![1, 5], 0),
                (vec![3, 7], 1)
            ],
            "the first workers spread over both nodes"
        );
        assert_eq!(topology.core_for(5).cpus, vec![2, 6], "wraps around");
        assert_eq!(
            (0..9).map(|w| topology.cpu_for(w)).collect::<Vec<_>>(),
            vec![0, 2, 1, 3, 4, 6, 5, 7, 0],
            "a worker per logical CPU: SMT siblings once every core has one"
        );
        assert_eq!(topology.spare_cpus(3), vec![3, 7]);
        assert_eq!(topology.cpus(), (0..8).collect::<Vec<_>>());
        assert!(topology.spare_cpus(4).is_empty());
    }

    #[test]
    fn workers_past_the_cores_take_each_cpu_once_however_many_threads_a_core_has() {
        let topology = Topology {
            cores: vec![
                Core {
                    cpus: vec![2],
                    node: 0,
                },
                Core {
                    cpus: vec![3, 7],
                    node: 0,
                },
            ],
            source: "test".into(),
        };
        assert_eq!(
            (0..4).map(|w| topology.cpu_for(w)).collect::<Vec<_>>(),
            vec![2, 3, 7, 2]
        );
    }

    #[test]
    fn only_the_allowed_cpus_count() {
        let dir = two_nodes_with_smt();
        let topology = Topology::read(dir.path(), &[2, 3, 6]);
        let cpus: Vec<Vec<usize>> = topology.cores.iter().map(|c| c.cpus.clone()).collect();
        assert_eq!(cpus, vec![vec![2, 6], vec![3]]);
        assert_eq!(topology.nodes(), 1);
    }

    #[test]
    fn without_sysfs_every_allowed_cpu_is_a_core_on_one_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let topology = Topology::read(dir.path(), &[0, 1, 2]);
        assert!(
            topology.source.starts_with("fallback"),
            "{}",
            topology.source
        );
        assert_eq!(topology.cores.len(), 3);
        assert_eq!(topology.nodes(), 1);
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "cpu/online", "0-1\n");
        let topology = Topology::read(dir.path(), &[]);
        assert!(topology.source.contains("core_id"), "{}", topology.source);
        assert_eq!(topology.cores.len(), 2);
    }
}
