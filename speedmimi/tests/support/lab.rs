//! The network-namespace lab of `cargo xtask lab`, included by path so the tests build the very topology
//! the engineers use by hand (the file is std-only for that reason).

#[path = "../../../xtask/src/lab.rs"]
mod shared;

// Test binaries that build no lab leave this unused.
#[allow(unused_imports)]
pub use shared::*;
