//! The L7 data path: hyper servers for the HTTP and gRPC listeners, the request handler that
//! routes and balances, and WebSocket/SSE pass-through. (The upstream connections it uses are
//! `crate::upstream`.)

mod activity;
pub mod admission;
pub mod body;
mod copy;
mod detach;
mod error;
mod forward;
pub(crate) mod framing;
pub(crate) mod h1;
pub mod headers;
pub(crate) mod idle;
pub(crate) mod io;
mod park;
pub mod server;
pub(crate) mod service;
pub mod splice;
mod sse;
mod upgrade;

pub use server::serve;
