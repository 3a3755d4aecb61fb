//! Connections to backends, below the proxy and beside the backend that owns them: each
//! backend's pool (HTTP/1.1 keep-alive connections per worker, one shared HTTP/2 connection,
//! TLS to `https` backends), the request body type those connections carry, and the
//! upstream's retry budget.

mod body;
mod budget;
mod pool;

pub use body::{BodyTimeout, BodyTooLarge, BoxError, Meter, RequestBody};
pub use budget::RetryBudget;
pub use pool::{ConnectError, H1Conn, Pool, RawConn, UpstreamIo, set_worker};
