//! What every lane of a worker shares, built once per broker connection.

use std::sync::Arc;
use std::time::Duration;

use sluice_shared::shutdown::Shutdown;
use sluice_shared::Topology;

use crate::broker::Broker;
use crate::control::Control;
use crate::memory::BodyBudget;
use crate::metrics::Metrics;
use crate::relay::Relays;

/// What every lane of a worker shares.
pub struct LaneContext {
    pub broker: Arc<Broker>,
    pub topology: Topology,
    pub relays: Arc<Relays>,
    pub delays: Arc<[Duration]>,
    pub max_message_bytes: usize,
    /// The bytes of job bodies the worker works on at once, shared by every lane and
    /// every broker connection of the worker.
    pub bodies: Arc<BodyBudget>,
    pub metrics: Metrics,
    pub shutdown: Shutdown,
    /// Tells the fleet what a relay's pushback changed.
    pub control: Control,
}
