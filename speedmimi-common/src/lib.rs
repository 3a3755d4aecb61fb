//! Types and functions the kernel programs and the daemon must agree on bit for bit.
//!
//! Everything here is `no_std` and allocation-free so that `speedmimi-ebpf` links it unchanged.
//! Each BPF map has one module with its name constant and its `#[repr(C)]` key and value types.
#![no_std]

pub mod hash;
pub mod l4;
pub mod maglev;
pub mod splice;
