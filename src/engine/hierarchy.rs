//! Entity hierarchies are checked here, iteratively, before Cedar sees them.
//!
//! Why: Cedar computes the transitive closure of the parent graph with a
//! recursive depth-first walk (`cyclic_tc_internal`, about a kilobyte of
//! stack per level in a release build), and the closure of a chain of n
//! entities has n²/2 edges. A 4,000-link chain in a request overflowed a
//! worker's stack and aborted the process; a 2,000-link one took 3.8 s and
//! 1 GB. Every source of entities (a request's `entities_json`, the
//! entities file, a decision's slice of synced data) is measured here
//! first, with an explicit stack, and refused above the configured depth:
//! Cedar's walk is then never deeper than that.

use std::collections::HashMap;
use std::fmt::Display;
use std::hash::Hash;

/// The default of `max_hierarchy_depth`: the longest chain of parents an
/// entity may have (a user in a team in a department in a company-wide
/// group is 3). Real directories nest groups a handful of levels deep.
pub const DEFAULT_MAX_HIERARCHY_DEPTH: u32 = 32;

/// The most `max_hierarchy_depth` may be set to: Cedar's recursion costs
/// stack per level, and the async workers' stacks are 2 MiB.
pub const MAX_HIERARCHY_DEPTH_CEILING: u32 = 256;

/// Why a hierarchy was refused, naming the entity where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HierarchyError {
    #[error(
        "entity `{uid}` has a chain of more than {max} ancestors (`max_hierarchy_depth` is {max})"
    )]
    TooDeep { uid: String, max: u32 },
    #[error("entity `{uid}` is its own ancestor (a cycle in the hierarchy)")]
    Cycle { uid: String },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    New,
    Open,
    /// Its depth: the longest chain of parents above it.
    Done(u32),
}

/// Checks that no node has a chain of more than `max_depth` parents above
/// it and that no node is its own ancestor. `parents` lists each node's
/// direct parents; a parent that is not itself a node has the depth
/// `outside_depth` gives (0 when it has no parents: stored entities of known
/// depth, or entities no one described). Linear in nodes and edges, with a
/// stack of its own.
pub fn check<'a, K, P>(
    nodes: &'a [K],
    parents: impl Fn(usize) -> P,
    outside_depth: impl Fn(&K) -> u32,
    max_depth: u32,
) -> Result<(), HierarchyError>
where
    K: Eq + Hash + Display + 'a,
    P: Iterator<Item = &'a K>,
{
    let index: HashMap<&K, usize> = nodes.iter().enumerate().map(|(at, k)| (k, at)).collect();
    let mut marks = vec![Mark::New; nodes.len()];
    // (node, its parents not yet looked at, its depth so far)
    let mut stack: Vec<(usize, P, u32)> = Vec::new();
    for root in 0..nodes.len() {
        if marks[root] != Mark::New {
            continue;
        }
        marks[root] = Mark::Open;
        stack.push((root, parents(root), 0));
        while let Some((at, pending, depth)) = stack.last_mut() {
            let node = *at;
            match pending.next() {
                Some(parent) => match index.get(parent) {
                    Some(&parent_at) => match marks[parent_at] {
                        Mark::New => {
                            marks[parent_at] = Mark::Open;
                            stack.push((parent_at, parents(parent_at), 0));
                        }
                        Mark::Open => {
                            return Err(HierarchyError::Cycle {
                                uid: nodes[parent_at].to_string(),
                            });
                        }
                        Mark::Done(parent_depth) => *depth = (*depth).max(parent_depth + 1),
                    },
                    None => *depth = (*depth).max(outside_depth(parent).saturating_add(1)),
                },
                None => {
                    let depth = *depth;
                    if depth > max_depth {
                        return Err(HierarchyError::TooDeep {
                            uid: nodes[node].to_string(),
                            max: max_depth,
                        });
                    }
                    marks[node] = Mark::Done(depth);
                    stack.pop();
                    if let Some((_, _, child_depth)) = stack.last_mut() {
                        *child_depth = (*child_depth).max(depth + 1);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Refuses a hierarchy whose closure has more than `max_links` (entity,
/// ancestor) pairs among `nodes`: the closure Cedar builds, and what its
/// work and memory grow with (a chain within the depth limit is cheap; a
/// thousand entities in 32 layers, each the child of a whole layer, had half
/// a million pairs and took seconds). Call it on a hierarchy [`check`]
/// accepted (no cycles). One bit per pair while it counts: `nodes` is a
/// request's entities, bounded by `max_request_entities`.
pub fn check_closure<'a, K, P>(
    nodes: &'a [K],
    parents: impl Fn(usize) -> P,
    max_links: usize,
) -> Result<(), ClosureTooLarge>
where
    K: Eq + Hash + 'a,
    P: Iterator<Item = &'a K>,
{
    let n = nodes.len();
    let words = n.div_ceil(64);
    let index: HashMap<&K, usize> = nodes.iter().enumerate().map(|(at, k)| (k, at)).collect();
    let direct: Vec<Vec<usize>> = (0..n)
        .map(|at| parents(at).filter_map(|p| index.get(p).copied()).collect())
        .collect();
    // Parents before children: a post-order walk up from each node.
    let mut order = Vec::with_capacity(n);
    let mut seen = vec![false; n];
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for root in 0..n {
        if seen[root] {
            continue;
        }
        seen[root] = true;
        stack.push((root, 0));
        while let Some((at, next)) = stack.last_mut() {
            let node = *at;
            if let Some(&parent) = direct[node].get(*next) {
                *next += 1;
                if !seen[parent] {
                    seen[parent] = true;
                    stack.push((parent, 0));
                }
            } else {
                order.push(node);
                stack.pop();
            }
        }
    }
    let mut bits = vec![0u64; n * words];
    let mut links = 0usize;
    for node in order {
        let mut row = vec![0u64; words];
        for &parent in &direct[node] {
            row[parent / 64] |= 1 << (parent % 64);
            let from = &bits[parent * words..(parent + 1) * words];
            for (word, theirs) in row.iter_mut().zip(from) {
                *word |= theirs;
            }
        }
        links += row
            .iter()
            .map(|word| word.count_ones() as usize)
            .sum::<usize>();
        if links > max_links {
            return Err(ClosureTooLarge { max: max_links });
        }
        bits[node * words..(node + 1) * words].copy_from_slice(&row);
    }
    Ok(())
}

/// A hierarchy whose closure is larger than allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the hierarchy has more than {max} (entity, ancestor) pairs (`max_request_ancestors` is {max})"
)]
pub struct ClosureTooLarge {
    pub max: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(edges: &[(&str, &[&str])], max: u32) -> Result<(), HierarchyError> {
        let nodes: Vec<String> = edges.iter().map(|(n, _)| n.to_string()).collect();
        let parents: Vec<Vec<String>> = edges
            .iter()
            .map(|(_, ps)| ps.iter().map(|p| p.to_string()).collect())
            .collect();
        check(&nodes, |at| parents[at].iter(), |_| 0, max)
    }

    fn chain(n: usize) -> (Vec<String>, Vec<Vec<String>>) {
        let nodes: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
        // Each node's parent is the next one: node 0 has n-1 ancestors.
        let parents = (0..n)
            .map(|i| {
                if i + 1 < n {
                    vec![format!("n{}", i + 1)]
                } else {
                    vec![]
                }
            })
            .collect();
        (nodes, parents)
    }

    #[test]
    fn depth_is_the_longest_chain_of_parents() {
        // d has two paths up: d -> c -> a (2) and d -> b (1).
        let edges: &[(&str, &[&str])] =
            &[("d", &["b", "c"]), ("c", &["a"]), ("b", &[]), ("a", &[])];
        assert_eq!(run(edges, 2), Ok(()));
        assert_eq!(
            run(edges, 1),
            Err(HierarchyError::TooDeep {
                uid: "d".into(),
                max: 1
            })
        );
    }

    #[test]
    fn a_chain_of_any_length_is_measured_without_recursion() {
        // Far deeper than any thread's stack would allow a recursive walk.
        let (nodes, parents) = chain(1_000_000);
        assert_eq!(
            check(&nodes, |at| parents[at].iter(), |_| 0, 999_999),
            Ok(())
        );
        let refused = check(&nodes, |at| parents[at].iter(), |_| 0, 32);
        assert!(
            matches!(refused, Err(HierarchyError::TooDeep { max: 32, .. })),
            "{refused:?}"
        );
    }

    #[test]
    fn parents_outside_the_nodes_count_with_their_own_depth() {
        let nodes = vec!["a".to_string()];
        let parents = [vec!["stored".to_string()]];
        let depth_of_stored = |uid: &String| if uid == "stored" { 31 } else { 0 };
        assert_eq!(
            check(&nodes, |at| parents[at].iter(), depth_of_stored, 32),
            Ok(())
        );
        assert!(check(&nodes, |at| parents[at].iter(), depth_of_stored, 31).is_err());
    }

    #[test]
    fn the_closure_is_counted_pair_by_pair() {
        // d -> b, d -> c -> a: d has 3 ancestors, c 1: 4 pairs.
        let nodes: Vec<String> = ["d", "c", "b", "a"].map(String::from).to_vec();
        let parents: Vec<Vec<String>> = vec![
            vec!["b".into(), "c".into()],
            vec!["a".into()],
            vec![],
            vec![],
        ];
        assert_eq!(check_closure(&nodes, |at| parents[at].iter(), 4), Ok(()));
        assert_eq!(
            check_closure(&nodes, |at| parents[at].iter(), 3),
            Err(ClosureTooLarge { max: 3 })
        );
        // A chain of 100 has 99 + 98 + ... + 1 pairs.
        let (nodes, parents) = chain(100);
        assert_eq!(check_closure(&nodes, |at| parents[at].iter(), 4950), Ok(()));
        assert!(check_closure(&nodes, |at| parents[at].iter(), 4949).is_err());
    }

    #[test]
    fn cycles_are_refused_naming_an_entity_on_them() {
        let edges: &[(&str, &[&str])] = &[("a", &["b"]), ("b", &["c"]), ("c", &["a"])];
        assert!(matches!(run(edges, 100), Err(HierarchyError::Cycle { .. })));
        let self_loop: &[(&str, &[&str])] = &[("a", &["a"])];
        assert_eq!(
            run(self_loop, 100),
            Err(HierarchyError::Cycle { uid: "a".into() })
        );
        // A diamond is not a cycle.
        let diamond: &[(&str, &[&str])] =
            &[("a", &["b", "c"]), ("b", &["d"]), ("c", &["d"]), ("d", &[])];
        assert_eq!(run(diamond, 2), Ok(()));
    }
}
