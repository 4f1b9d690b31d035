//! How much job-body memory a worker holds: bounded in bytes, not only by counts of jobs.
//!
//! A job's body is held where the broker puts it (a lane's window of unacknowledged
//! deliveries, already in lapin's buffers) and, while it is worked on, in a few copies:
//! the delivery, the parsed text, the formatted message. RabbitMQ does not implement
//! `basic.qos` `prefetch_size`, so the worker bounds both itself:
//! - a lane's window holds at most [`WINDOW_BYTES`] of bodies as far as the bodies it has
//!   seen tell ([`window_for_bytes`]; a lane starts at prefetch 1 and shrinks its window
//!   as soon as a bigger body arrives, see [`crate::lane`]);
//! - the bodies being worked on, across all lanes, add up to at most [`WORKING_BYTES`]
//!   ([`BodyBudget`]): a body bigger than that is worked on alone;
//! - a freed body goes back to the system ([`give_big_allocations_back`]), so memory
//!   used once for a big job does not stay resident in an allocator's free lists.

use tokio::sync::{Semaphore, SemaphorePermit};

const MIB: usize = 1024 * 1024;

/// Bytes of job bodies a whole worker works on at once (parsing, building, sending,
/// settling). A job worked on costs about three times its body at its peak (the delivery,
/// the parsed text moved into the message, the formatted message); so with 16 MiB the
/// working copies stay within about 48 MiB however many lanes run, and a job bigger than
/// the budget waits for the others and goes alone.
pub const WORKING_BYTES: usize = 16 * MIB;

/// Bytes of bodies a lane's window of unacknowledged jobs holds at most, judged by the
/// largest body the lane has seen: 4 MiB is a window of 32 jobs of 128 KiB, and of one job
/// from 4 MiB up. With the default four sessions per relay, the windows hold about
/// 16 MiB of bodies that wait (or one body per lane, when bodies are bigger).
pub const WINDOW_BYTES: usize = 4 * MIB;

/// The most jobs a lane's window may hold when its largest body so far is `largest_body`
/// bytes: [`WINDOW_BYTES`] of them, and never fewer than one.
pub fn window_for_bytes(largest_body: usize) -> u16 {
    (WINDOW_BYTES / largest_body.max(1)).clamp(1, usize::from(u16::MAX)) as u16
}

/// Allocations from this size up get a mapping of their own, unmapped when freed.
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
const OWN_MAPPING_FROM: usize = MIB;

/// Make glibc's malloc map every allocation of [`OWN_MAPPING_FROM`] bytes or more on its
/// own and unmap it when freed. By default glibc raises that threshold after the first
/// such free (up to 32 MiB), and later body-sized blocks come from per-thread arenas that
/// keep freed memory resident: a worker that worked on 8 MiB bodies on several threads
/// holds tens of MiB it no longer uses (fifty 8 MiB jobs: 122 MiB peak instead of ~75).
/// Called once at start; nothing to do with other allocators.
pub fn give_big_allocations_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a malloc parameter; it takes malloc's own lock and has no
    // other precondition.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_MAPPING_FROM as libc::c_int);
    }
}

/// The worker-wide budget of body bytes being worked on (see [`WORKING_BYTES`]). Shared by
/// every lane; a lane holds a [`BodyHold`] for a job from before it parses the body until
/// the job is settled.
pub struct BodyBudget {
    bytes: Semaphore,
    total: u32,
}

/// Proof that a job's body fits in the worker's budget; gives its bytes back when dropped.
pub struct BodyHold<'a> {
    _permit: SemaphorePermit<'a>,
}

impl BodyBudget {
    /// A budget of `total` bytes (at most `u32::MAX`).
    pub fn new(total: usize) -> Self {
        let total = u32::try_from(total).unwrap_or(u32::MAX).max(1);
        Self {
            bytes: Semaphore::new(total as usize),
            total,
        }
    }

    /// Wait until a body of `len` bytes fits beside the bodies being worked on. A body
    /// larger than the whole budget takes all of it, so it is worked on alone.
    pub async fn hold(&self, len: usize) -> BodyHold<'_> {
        let cost = u32::try_from(len).unwrap_or(u32::MAX).clamp(1, self.total);
        let permit = self
            .bytes
            .acquire_many(cost)
            .await
            .expect("the body budget is never closed");
        BodyHold { _permit: permit }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_holds_window_bytes_of_the_largest_body_seen_and_at_least_one_job() {
        let cases = [
            (0, u16::MAX),
            (1024, 4096),
            (128 * 1024, 32),
            (MIB, 4),
            (4 * MIB, 1),
            (8 * MIB, 1),
            (64 * MIB, 1),
        ];
        for (largest, expected) in cases {
            assert_eq!(window_for_bytes(largest), expected, "{largest} bytes");
        }
    }

    #[tokio::test]
    async fn bodies_over_the_budget_are_worked_on_one_at_a_time() {
        let budget = BodyBudget::new(16 * MIB);
        let small = budget.hold(4 * MIB).await;
        let other = budget.hold(8 * MIB).await;
        // 4 + 8 + 8 > 16: the third waits until one is given back.
        let third = budget.hold(8 * MIB);
        tokio::pin!(third);
        assert!(futures_util::poll!(&mut third).is_pending());
        drop(small);
        assert!(futures_util::poll!(&mut third).is_ready());
        drop(other);
        // A body bigger than the budget takes all of it: nothing else goes beside it.
        let huge = budget.hold(100 * MIB).await;
        let tiny = budget.hold(1);
        tokio::pin!(tiny);
        assert!(futures_util::poll!(&mut tiny).is_pending());
        drop(huge);
        assert!(futures_util::poll!(&mut tiny).is_ready());
    }
}
