//! Fuzz target: the XDP programs' packet parsing, run by the kernel on arbitrary frames through
//! BPF_PROG_TEST_RUN (needs root and the object from `cargo xtask build-ebpf`). The object is
//! loaded once with a NAT service on 10.0.0.10:80 and a DSR service on 10.0.0.11:8080 over three
//! backends, as speedmimi/tests/xdp.rs sets it up. Every frame must get a verdict other than
//! XDP_ABORTED; a frame neither program handles must pass unchanged; a frame whose IPv4 and TCP
//! checksums were right must leave `l4_steer` with right checksums (NAT rewrites them
//! incrementally; DSR adds an outer IPv4 header of its own).
#![no_main]

use std::{net::Ipv4Addr, sync::Mutex};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap},
    programs::{TestRun, TestRunOptions, Xdp},
};
use libfuzzer_sys::fuzz_target;
use speedmimi_common::{
    l4::{self, Backend, MODE_DSR, MODE_NAT, PROTO_TCP, Service, ServiceKey},
    maglev::{self, Cursor, EMPTY, Member, TABLE_SIZE},
};

const XDP_ABORTED: u32 = 0;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const ETH: usize = 14;
/// The test run refuses frames shorter than an Ethernet header, and longer than a page less
/// the kernel's headroom.
const MAX_FRAME: usize = 3000;

fn fixture() -> Ebpf {
    let object = speedmimi::datapath::kernel::object();
    assert!(!object.is_empty(), "no eBPF object: run `cargo xtask build-ebpf` before building the fuzz targets");
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(l4::FLOWS, 4096)
        .map_max_entries(l4::REVERSE, 4096)
        .load(object)
        .expect("load the eBPF object (as root)");
    for name in ["l4_steer", "l4_decap"] {
        let p: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
        p.load().unwrap_or_else(|e| panic!("verifier rejects {name}: {e}"));
    }
    let backends: Vec<Ipv4Addr> = (1..=3).map(|i| Ipv4Addr::new(10, 101, 0, 10 + i)).collect();
    let members: Vec<Member> = backends.iter().map(|b| Member::from_addr(format!("{b}:8080").as_bytes(), 1)).collect();
    let mut table = vec![EMPTY; TABLE_SIZE];
    maglev::build(&members, &mut [Cursor::default(); 3], &mut table);
    let key = |vip: Ipv4Addr, port: u16| ServiceKey {
        addr: u32::from_ne_bytes(vip.octets()),
        port: port.to_be(),
        proto: PROTO_TCP,
        _pad: 0,
    };
    let mut services: HashMap<_, ServiceKey, Service> = HashMap::try_from(ebpf.map_mut(l4::SERVICES).unwrap()).unwrap();
    services
        .insert(key(Ipv4Addr::new(10, 0, 0, 10), 80), Service { index: 0, mode: MODE_NAT, encap_src: 0 }, 0)
        .unwrap();
    let encap_src = u32::from_ne_bytes([10, 101, 0, 1]);
    services
        .insert(key(Ipv4Addr::new(10, 0, 0, 11), 8080), Service { index: 1, mode: MODE_DSR, encap_src }, 0)
        .unwrap();
    let mut slots: Array<_, Backend> = Array::try_from(ebpf.map_mut(l4::BACKENDS).unwrap()).unwrap();
    for (i, b) in backends.iter().enumerate() {
        slots
            .set(i as u32, Backend { addr: u32::from_ne_bytes(b.octets()), port: 8080u16.to_be(), _pad: 0 }, 0)
            .unwrap();
    }
    let mut ring: Array<_, u32> = Array::try_from(ebpf.map_mut(l4::RING).unwrap()).unwrap();
    for service in 0..2u32 {
        for (slot, &b) in table.iter().enumerate() {
            ring.set(service * TABLE_SIZE as u32 + slot as u32, b, 0).unwrap();
        }
    }
    ebpf
}

fn run(ebpf: &mut Ebpf, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    let p: &mut Xdp = ebpf.program_mut(prog).unwrap().try_into().unwrap();
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    let r = p.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// The Internet checksum of `data` folded from `sum`.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether `frame` is Ethernet/IPv4 (no options)/TCP, or that packet in IPIP (DSR), with every
/// IPv4 and TCP checksum right and every IPv4 length the packet's.
fn checksums_ok(frame: &[u8]) -> bool {
    frame.len() > ETH && frame[12..14] == [8, 0] && ip_ok(&frame[ETH..])
}

fn ip_ok(ip: &[u8]) -> bool {
    if ip.len() < 20 || ip[0] != 0x45 || usize::from(u16::from_be_bytes([ip[2], ip[3]])) != ip.len() {
        return false;
    }
    if checksum(&ip[..20], 0) != 0 {
        return false;
    }
    match ip[9] {
        4 => ip_ok(&ip[20..]),
        PROTO_TCP if ip.len() >= 40 => {
            let tcp = &ip[20..];
            let word = |i: usize| u32::from(u16::from_be_bytes([ip[i], ip[i + 1]]));
            let pseudo = word(12) + word(14) + word(16) + word(18) + u32::from(PROTO_TCP) + tcp.len() as u32;
            checksum(tcp, pseudo) == 0
        }
        _ => false,
    }
}

/// What `l4_steer` looks at at all: Ethernet, IPv4 without options, TCP.
fn steerable(frame: &[u8]) -> bool {
    frame.len() >= ETH + 40 && frame[12..14] == [8, 0] && frame[ETH] == 0x45 && frame[ETH + 9] == PROTO_TCP
}

/// What `l4_decap` looks at at all: Ethernet, IPv4 without options, IPIP.
fn decapsulable(frame: &[u8]) -> bool {
    frame.len() >= ETH + 40 && frame[12..14] == [8, 0] && frame[ETH] == 0x45 && frame[ETH + 9] == 4
}

fuzz_target!(|data: &[u8]| {
    static EBPF: Mutex<Option<Ebpf>> = Mutex::new(None);
    if data.len() < ETH || data.len() > MAX_FRAME {
        return;
    }
    let mut guard = EBPF.lock().unwrap_or_else(|e| e.into_inner());
    let ebpf = guard.get_or_insert_with(fixture);

    let (verdict, out) = run(ebpf, "l4_steer", data);
    assert!(verdict != XDP_ABORTED && verdict <= XDP_REDIRECT, "l4_steer: verdict {verdict}");
    if !steerable(data) {
        assert_eq!(verdict, XDP_PASS, "l4_steer: a frame it does not steer was not passed");
        assert_eq!(out, data, "l4_steer: a frame it does not steer was changed");
    }
    if out != data && checksums_ok(data) {
        assert!(checksums_ok(&out), "l4_steer rewrote a frame with right checksums into one with wrong ones");
    }

    let (verdict, out) = run(ebpf, "l4_decap", data);
    assert_eq!(verdict, XDP_PASS, "l4_decap passes everything");
    if !decapsulable(data) {
        assert_eq!(out, data, "l4_decap changed a frame that is not IPIP");
    } else if out != data {
        assert_eq!(out.len(), data.len() - 20, "l4_decap removes exactly the outer IPv4 header");
        assert_eq!(out[ETH..], data[ETH + 20..], "l4_decap changed the inner packet");
    }
});
