//! Channels between nodes: one lazily connected HTTP/2 channel per address, with
//! `TCP_NODELAY` and flow-control windows sized so that a large answer (a WAL batch, a
//! candidate list, a checkpoint chunk) never waits on a window update, and the node's
//! bearer token on every request.

use std::time::Duration;

use feedgraph_proto::auth::{AuthChannel, Credentials};

use crate::Error;

/// HTTP/2 stream window (per request).
pub const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 connection window.
pub const CONNECTION_WINDOW: u32 = 8 << 20;
/// Largest message a node accepts from another node (a WAL batch of a bulk-load chunk
/// can be tens of MB).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// `host:port` or a URL → a channel that connects on first use, so that an unreachable
/// node fails requests, not start-up; with the node's `credentials` (its admin token
/// on every request, TLS when the cluster uses it).
pub fn channel(addr: &str, credentials: &Credentials) -> Result<AuthChannel, Error> {
    let endpoint = credentials.endpoint(addr).map_err(|e| Error::Remote(format!("address `{addr}`: {e}")))?;
    let channel = endpoint
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_millis(500))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .connect_lazy();
    Ok(credentials.authorize(channel))
}
