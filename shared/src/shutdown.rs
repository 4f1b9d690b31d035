//! Stopping cleanly: one handle that every task can wait on, triggered by SIGTERM or SIGINT.

use tokio::sync::watch;

/// A cloneable "please stop" signal. Tasks `select!` on [`Shutdown::wait`].
#[derive(Clone, Debug)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
    sender: std::sync::Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal that nobody has triggered yet.
    pub fn new() -> Self {
        let (sender, receiver) = watch::channel(false);
        Self {
            receiver,
            sender: std::sync::Arc::new(sender),
        }
    }

    /// A signal triggered by the first SIGTERM or SIGINT.
    pub fn on_signals() -> Self {
        let shutdown = Self::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("stop signal received: no new jobs, finishing those in flight");
            trigger.trigger();
        });
        shutdown
    }

    /// Ask every holder to stop.
    pub fn trigger(&self) {
        let _ = self.sender.send(true);
    }

    /// True once stopping was asked for.
    pub fn is_triggered(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Resolves once stopping was asked for.
    pub async fn wait(&self) {
        let mut receiver = self.receiver.clone();
        let _ = receiver.wait_for(|stop| *stop).await;
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
