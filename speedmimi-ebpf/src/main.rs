//! SpeedMimi's kernel programs. Built for `bpfel-unknown-none` by `cargo xtask build-ebpf`;
//! the daemon embeds the object and loads it at startup when it runs as root.
#![no_std]
#![no_main]

mod l4;
mod maps;
mod splice;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves no panic is reachable; this only satisfies the linker.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
