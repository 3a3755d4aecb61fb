//! What the flow tests (splice, flood, stall, streams) share: the two datapaths every flow test
//! runs in, waiting for the splice map to empty, and deterministic bytes (a seeded generator
//! for contents, a position-dependent byte so loss, duplication or reordering shows).

use std::{sync::Arc, time::Duration};

use speedmimi::datapath::{Datapath, Userspace, kernel::Kernel};
use tokio::io::{AsyncRead, AsyncReadExt};

/// ("splice", the kernel datapath) and ("copy", userspace): every flow test runs in both.
pub fn modes() -> Vec<(&'static str, Arc<dyn Datapath>)> {
    vec![
        ("splice", Arc::new(Kernel::load(&Default::default(), &[]).expect("eBPF loads"))),
        ("copy", Arc::new(Userspace)),
    ]
}

/// After every flow ended: the SOCKHASH empties (bounded wait, 10 s).
pub async fn assert_unspliced(mode: &str, dp: &Arc<dyn Datapath>) {
    for _ in 0..500 {
        if dp.spliced_sockets() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(dp.spliced_sockets(), 0, "{mode}: SOCKHASH empty after every flow ended");
}

/// SplitMix64: deterministic sizes and contents from a seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// The byte at stream position `i`: a stream of these shows loss, duplication or reordering.
pub fn byte_at(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// Fills `buf` with the stream's bytes from position `pos`.
pub fn fill(buf: &mut [u8], pos: u64) {
    for (i, x) in buf.iter_mut().enumerate() {
        *x = byte_at(pos + i as u64);
    }
}

/// Reads an HTTP head up to its blank line, byte by byte, so that nothing after it is consumed
/// (what follows is the flow's, checked on its own).
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await?;
        head.push(b[0]);
    }
    Ok(head)
}
