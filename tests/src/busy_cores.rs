//! A noisy neighbour: threads that keep every core busy while a test runs a step, so the
//! broker answers as slowly as it does on a loaded machine (as in CI, where the tests run in
//! parallel). Bounded: each thread stops when the guard is dropped, or after a minute.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The longest a busy thread spins, whatever happens to its guard.
const AT_MOST: Duration = Duration::from_secs(60);

/// Keeps the machine's cores busy until dropped.
pub struct BusyCores {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl BusyCores {
    /// Two spinning threads per core.
    pub fn start() -> BusyCores {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let started = Instant::now();
                    let mut x: u64 = 1;
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < AT_MOST {
                        for _ in 0..10_000 {
                            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                        }
                        std::hint::black_box(x);
                    }
                })
            })
            .collect();
        BusyCores { stop, threads }
    }
}

impl Drop for BusyCores {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
