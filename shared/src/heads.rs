//! The heads stream's entries (`<ns>.heads`, see [`crate::Topology::heads`]): what each
//! worker last saw of its relays' class queues, so that `relay status` can show the age of a
//! class's oldest job, which only a consumer sees.

use serde::{Deserialize, Serialize};

/// One entry of the heads stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HeadsEntry {
    /// A worker's sample of every class queue of the relays it serves.
    Report {
        /// When the sample was taken (Unix ms).
        at_ms: u64,
        queues: Vec<QueueHead>,
    },
    /// Written by a reader before it reads, to know where "now" is.
    Marker { id: String },
}

/// One class queue as a worker saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueHead {
    pub relay: String,
    /// `high`, `normal` or `low`.
    pub class: String,
    /// Jobs ready in the queue.
    pub ready: u32,
    /// Now minus the publish time of the last job this worker took from the queue's head:
    /// the oldest job waiting is at most this old (FIFO). `None` when the queue is empty or
    /// this worker has not taken a timestamped job from it yet.
    pub oldest_age_s: Option<f64>,
}

impl HeadsEntry {
    /// The entry as the stream stores it.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a heads entry serializes")
    }
}
