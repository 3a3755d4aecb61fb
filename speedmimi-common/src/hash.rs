//! The client-IP hash: one function, used by the XDP program and by the userspace `ip_hash`
//! balancer, so a client lands on the same backend whichever of them decides.
//!
//! Fixed seeds, no per-process randomness: every SpeedMimi node computes the same value.
//! Only arithmetic on `u64` (no loops, no tables), so the BPF verifier accepts it as is.

/// Seed mixed into client-address hashes. Changing it remaps every client.
pub const CLIENT_SEED: u64 = 0x5eed_6d69_6d69_0001;

/// The murmur3 / splitmix 64-bit finaliser: a bijective avalanche mix.
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// Hash of an IPv4 client address given as its four octets in network order
/// (`u32::from_be_bytes(octets)`, i.e. the value `Ipv4Addr` converts to).
#[inline(always)]
pub const fn client_v4(addr: u32) -> u64 {
    mix64((addr as u64) ^ CLIENT_SEED)
}

/// Hash of an IPv6 client address (`u128::from_be_bytes(octets)`).
/// IPv4-mapped addresses (`::ffff:a.b.c.d`) hash as their IPv4 address, so a dual-stack
/// listener does not split one client in two.
#[inline(always)]
pub const fn client_v6(addr: u128) -> u64 {
    if addr >> 32 == 0xffff {
        return client_v4(addr as u32);
    }
    let hi = (addr >> 64) as u64;
    let lo = addr as u64;
    mix64(hi ^ mix64(lo ^ CLIENT_SEED))
}

/// FNV-1a over bytes, then mixed: the identity hash of a backend (its `host:port`, never its
/// renameable id), with a caller-chosen seed so Maglev can draw two independent values.
pub const fn bytes(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    let mut i = 0;
    while i < data.len() {
        h ^= data[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    mix64(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_v6_equals_v4() {
        let v4 = u32::from_be_bytes([192, 0, 2, 7]);
        let mapped = 0xffff_0000_0000u128 | v4 as u128;
        assert_eq!(client_v6(mapped), client_v4(v4));
        assert_ne!(client_v6(1), client_v4(1));
    }

    #[test]
    fn fixed_values_do_not_drift() {
        // Nodes and kernel must agree across releases: pin a few values.
        assert_eq!(client_v4(0), mix64(CLIENT_SEED));
        assert_ne!(client_v4(0x0a00_0001), client_v4(0x0a00_0002));
        assert_ne!(bytes(b"127.0.0.1:8081", 1), bytes(b"127.0.0.1:8081", 2));
    }
}
