//! Waiting on a condition with a deadline, and watching that something does not happen.
//!
//! A test never sleeps where it can wait on what it means: [`wait_until`] polls a condition
//! and names it when the deadline passes. A negative check ("nothing more arrives") cannot
//! wait on a condition, so [`holds_throughout`] watches one for a stated time chosen to mean
//! it, and names what it watched and for how long when it breaks.

use std::future::Future;
use std::time::Duration;

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(100);

/// Wait until `condition` holds, polling; false on timeout.
pub async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Wait until `condition` holds; panics after `timeout`, saying `what` was awaited.
pub async fn wait_until<F, Fut>(condition: F, timeout: Duration, what: &str)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(
        eventually(timeout, condition).await,
        "waited {timeout:?} for {what}, in vain"
    );
}

/// A negative check: `condition` holds at every poll for the whole of `period` (and at its
/// end); panics as soon as it does not, saying what was watched and for how long. `what`
/// says why `period` is long enough to mean it.
pub async fn holds_throughout<F, Fut>(mut condition: F, period: Duration, what: &str)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    let end = start + period;
    loop {
        assert!(
            condition().await,
            "{what}: broken after {:?} of the {period:?} watched",
            start.elapsed()
        );
        let now = tokio::time::Instant::now();
        if now >= end {
            return;
        }
        tokio::time::sleep(POLL.min(end - now)).await;
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    #[should_panic(expected = "the count stays 0: broken after")]
    async fn a_negative_check_fails_when_the_condition_breaks_during_the_period() {
        let polls = AtomicUsize::new(0);
        holds_throughout(
            || async { polls.fetch_add(1, Ordering::SeqCst) < 3 },
            Duration::from_secs(5),
            "the count stays 0",
        )
        .await;
    }

    #[tokio::test]
    async fn a_negative_check_watches_the_whole_period() {
        let start = tokio::time::Instant::now();
        holds_throughout(|| async { true }, Duration::from_millis(300), "true").await;
        assert!(start.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    #[should_panic(expected = "waited 200ms for the impossible, in vain")]
    async fn a_wait_that_times_out_names_what_it_waited_for() {
        wait_until(
            || async { false },
            Duration::from_millis(200),
            "the impossible",
        )
        .await;
    }
}
