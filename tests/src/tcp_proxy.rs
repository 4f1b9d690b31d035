//! A loopback TCP proxy the test controls, to partition one client from its upstream.
//!
//! A partitioned network does not close sockets: bytes simply stop arriving, and only
//! heartbeats or timeouts tell. `cut()` does that to every open connection (and accepts new
//! ones into the same black hole), so a worker can lose its broker while its SMTP relay,
//! reached directly, stays up.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the test has asked for so far; connections compare it with what they started under.
#[derive(Clone, Copy, Default)]
struct Control {
    /// Forwarding is cut: open connections go silent, new ones go nowhere.
    cut: bool,
    /// Only the client's bytes are cut: the upstream's still reach the client, but not its
    /// closing of the connection.
    one_way: bool,
    /// How many times `close_all` was called.
    resets: u64,
    /// The cut applies only to the connection accepted in this position (0 = first).
    only: Option<u64>,
}

impl Control {
    /// Whether the cut applies to the connection accepted in position `index`.
    fn cuts(&self, index: u64) -> bool {
        self.cut && self.only.is_none_or(|only| only == index)
    }
}

/// A proxy on `127.0.0.1:<random port>` forwarding to one upstream address. Dropping it
/// closes the listener and every connection it holds.
pub struct TcpProxy {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    control: watch::Sender<Control>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Listen on 127.0.0.1 (port 0) and forward each accepted connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy on 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy address");
        let (control, _) = watch::channel(Control::default());
        let accepted = Arc::new(AtomicU64::new(0));
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            control.subscribe(),
            accepted.clone(),
        ));
        Self {
            addr,
            accepted,
            control,
            accept,
        }
    }

    /// Where clients connect instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far (a client that reconnects counts again).
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Black-hole every open connection in both directions without closing any socket,
    /// and accept new connections without forwarding them anywhere.
    pub fn cut(&self) {
        self.control.send_modify(|c| c.cut = true);
    }

    /// Cut only what clients send: every open connection still hears the upstream (its
    /// heartbeats, say) but the upstream hears nothing, and when the upstream gives up and
    /// closes, the client is not told. New connections go nowhere. This is the partition in
    /// which a client learns last that it was cut off.
    pub fn cut_towards_upstream(&self) {
        self.control.send_modify(|c| {
            c.cut = true;
            c.one_way = true;
        });
    }

    /// [`TcpProxy::cut_towards_upstream`] for one connection only: the one accepted in
    /// position `index` (0 = the first). The others, and new ones, go on forwarding.
    pub fn cut_connection_towards_upstream(&self, index: u64) {
        self.control.send_modify(|c| {
            c.cut = true;
            c.one_way = true;
            c.only = Some(index);
        });
    }

    /// Forward new connections again; connections cut before stay silent.
    pub fn restore(&self) {
        self.control.send_modify(|c| {
            c.cut = false;
            c.one_way = false;
            c.only = None;
        });
    }

    /// Reset (RST) every connection open now, forwarding or cut.
    pub fn close_all(&self) {
        self.control.send_modify(|c| c.resets += 1);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // Connection tasks end when the control sender goes away with `self`.
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    control: watch::Receiver<Control>,
    accepted: Arc<AtomicU64>,
) {
    while let Ok((client, _)) = listener.accept().await {
        let index = accepted.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(relay(client, upstream, control.clone(), index));
    }
}

/// One client connection: forward until cut, then hold both sockets silently until
/// `close_all` or the proxy's drop.
async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut control: watch::Receiver<Control>,
    index: u64,
) {
    let at_start = *control.borrow_and_update();
    let reset_or_gone = |c: &Control| c.resets != at_start.resets;
    let mut held_server = None;
    if !at_start.cuts(index) {
        let Ok(mut server) = TcpStream::connect(upstream).await else {
            return;
        };
        tokio::select! {
            // Bytes read but not yet written when the cut comes are dropped with this future.
            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
            _ = control.wait_for(|c| c.cuts(index) || reset_or_gone(c)) => {}
        }
        if control.borrow().one_way && !reset_or_gone(&control.borrow()) {
            // Upstream to client only, and never the upstream's end of the connection.
            let (mut from_server, _) = server.split();
            let (_, mut to_client) = client.split();
            tokio::select! {
                _ = tokio::io::copy(&mut from_server, &mut to_client) => {}
                _ = control.wait_for(reset_or_gone) => {}
            }
        }
        held_server = Some(server);
    }
    // Silent: nothing is read or written, the sockets stay open. A dropped proxy (the
    // sender gone) ends the wait with an error, which closes them too.
    let _ = control.wait_for(reset_or_gone).await;
    // Closed with RST rather than FIN, as `close_all` promises.
    let _ = client.set_zero_linger();
    if let Some(server) = &held_server {
        let _ = server.set_zero_linger();
    }
}
