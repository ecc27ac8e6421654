//! Batched rollouts of netd across nodes (the seed's cluster upgrade policy,
//! §3.2, applied to netd itself).
//!
//! [`plan`] is the pure part: the batch sizes. The first batch is one node;
//! each later one doubles the last, but a batch is never larger than 10 %
//! of the nodes (at least 1); the last batch takes what is left. A resume
//! after a pause starts again at one node and doubles, over the nodes not
//! yet upgraded, still capped by 10 % of all nodes ([`plan_remaining`]).
//!
//! [`state`] holds a rollout's persisted state and the pure state machine
//! that moves it on (pause, resume, cancel, the health gate, offline nodes
//! deferred); [`kubernetes`] runs it over the netd DaemonSet.
//!
//! ```
//! use netd_cloud::rollout::plan;
//! assert_eq!(plan(25), [1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]);
//! assert_eq!(plan(100), [1, 2, 4, 8, 10, 10, 10, 10, 10, 10, 10, 10, 5]);
//! ```

pub mod kubernetes;
pub mod state;

pub use state::{Announcement, NodeProgress, NodeView, Phase, Request, RolloutState, Step};

/// The largest batch of a rollout over `total` nodes: 10 % of them,
/// rounded down, and at least one.
pub fn batch_cap(total: usize) -> usize {
    (total / 10).max(1)
}

/// The batch sizes of a rollout over `total` nodes, in order; they sum to
/// `total` (none for no nodes).
pub fn plan(total: usize) -> Vec<usize> {
    Batches::new(total, total).collect()
}

/// The batch sizes after a resume: `remaining` of `total` nodes still to
/// upgrade, starting again at one node, capped by [`batch_cap`]`(total)`.
pub fn plan_remaining(total: usize, remaining: usize) -> Vec<usize> {
    Batches::new(total, remaining).collect()
}

/// The batch sizes as an iterator (a rollout over 100 000 nodes needs no
/// list of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batches {
    cap: usize,
    next: usize,
    left: usize,
}

impl Batches {
    /// The batches over `remaining` nodes of a rollout over `total` (a
    /// `remaining` above `total` is taken as `total`).
    pub fn new(total: usize, remaining: usize) -> Self {
        Self { cap: batch_cap(total), next: 1, left: remaining.min(total) }
    }
}

impl Iterator for Batches {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.left == 0 {
            return None;
        }
        let size = self.next.min(self.cap).min(self.left);
        self.left -= size;
        self.next = self.next.saturating_mul(2).min(self.cap);
        Some(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule the issue states, checked on one sequence: sums to `left`,
    /// starts at 1, each batch but the last is min(2 x previous, cap), the
    /// last at most that.
    fn check(total: usize, left: usize, sizes: &[usize]) {
        let cap = (total / 10).max(1);
        assert_eq!(sizes.iter().sum::<usize>(), left, "N={total} left={left}: {sizes:?}");
        if left == 0 {
            assert!(sizes.is_empty());
            return;
        }
        assert_eq!(sizes[0], 1, "N={total}: {sizes:?}");
        for (i, pair) in sizes.windows(2).enumerate() {
            let rule = (pair[0] * 2).min(cap);
            if i + 2 == sizes.len() {
                assert!(pair[1] >= 1 && pair[1] <= rule, "N={total} last batch {sizes:?}");
            } else {
                assert_eq!(pair[1], rule, "N={total} batch {} of {sizes:?}", i + 1);
            }
        }
        assert!(sizes.iter().all(|&s| s <= cap), "N={total}: above the cap {cap}: {sizes:?}");
    }

    #[test]
    fn every_rollout_from_1_to_10000_nodes_follows_the_rule() {
        for total in 1..=10_000 {
            check(total, total, &plan(total));
        }
        assert!(plan(0).is_empty());
    }

    #[test]
    fn a_resume_restarts_at_one_over_the_nodes_left() {
        for total in (1..=10_000).step_by(37).chain([1, 7, 10, 25, 100, 1000]) {
            let full = plan(total);
            // Paused after each batch in turn: the rest restarts at 1.
            let mut done = 0;
            for size in full {
                done += size;
                let rest = plan_remaining(total, total - done);
                check(total, total - done, &rest);
            }
        }
        assert_eq!(plan_remaining(100, 20), [1, 2, 4, 8, 5]);
        assert_eq!(plan_remaining(5, 99), plan(5), "never more nodes than the rollout has");
    }

    #[test]
    fn the_batch_logs_of_the_issue() {
        assert_eq!(plan(1), [1]);
        assert_eq!(plan(7), [1; 7]);
        assert_eq!(plan(10), [1; 10]);
        assert_eq!(plan(25), [1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]);
        assert_eq!(plan(100), [1, 2, 4, 8, 10, 10, 10, 10, 10, 10, 10, 10, 5]);
        let thousand = plan(1000);
        assert_eq!(&thousand[..8], [1, 2, 4, 8, 16, 32, 64, 100]);
        assert_eq!(thousand.len(), 16, "{thousand:?}");
        assert_eq!(thousand.last(), Some(&73));
    }
}
