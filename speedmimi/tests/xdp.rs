//! The XDP steering program on crafted frames through BPF_PROG_TEST_RUN (root only).
//!
//! Each test makes a network namespace with a veth pair (eth0 towards clients, eth1 towards
//! backends), permanent neighbours and routes, so that the program's `bpf_fib_lookup` succeeds
//! and the expected frame is fully known: MACs, addresses, ports, TTL and checksums. Expected
//! frames are built from scratch by this file's own encoder (checksums computed over the whole
//! headers, not incrementally), and compared byte for byte with what the program wrote.

mod support;

use std::{
    net::Ipv4Addr,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData},
    programs::{TestRun, TestRunOptions, Xdp, XdpMode},
};
use speedmimi_common::{
    hash,
    l4::{self, Backend, FlowKey, MODE_DSR, MODE_NAT, PROTO_TCP, Reverse, Service, ServiceKey},
    maglev::{self, Cursor, EMPTY, Member, TABLE_SIZE},
};
use support::root_or_skip;

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const VIP_DSR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const LB_BACK: Ipv4Addr = Ipv4Addr::new(10, 101, 0, 1);
const CLIENT_GW: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
const BACKEND_PORT: u16 = 8080;
/// Backend slots 7, 8, 9 are 10.101.0.10-12 (with neighbours); slot 10 is .13 (no neighbour).
const SLOTS: [u32; 4] = [7, 8, 9, 10];
const MAC_ETH0: [u8; 6] = [2, 0, 0, 0, 0, 0xa0];
const MAC_ETH1: [u8; 6] = [2, 0, 0, 0, 0, 0xb1];
const MAC_CLIENT_GW: [u8; 6] = [2, 0, 0, 0, 0, 0xc2];
const MAC_IN: ([u8; 6], [u8; 6]) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);

fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 101, 0, 10 + i as u8)
}

fn backend_mac(i: usize) -> [u8; 6] {
    [2, 0, 0, 0, 1, 10 + i as u8]
}

// ---- an independent frame encoder -------------------------------------------------------

fn csum(data: &[u8], mut sum: u32) -> u16 {
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[derive(Clone)]
struct Tcp {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    ttl: u8,
    payload: Vec<u8>,
}

impl Tcp {
    fn new(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Tcp {
        Tcp { src, dst, sport, dport, flags, ttl: 64, payload: b"hello, backend".to_vec() }
    }

    /// The IPv4 packet (header with a correct checksum, TCP with a correct checksum).
    fn ip(&self) -> Vec<u8> {
        let mut tcp = Vec::new();
        tcp.extend(self.sport.to_be_bytes());
        tcp.extend(self.dport.to_be_bytes());
        tcp.extend(0x0102_0304u32.to_be_bytes());
        tcp.extend(0u32.to_be_bytes());
        tcp.extend([5 << 4, self.flags]);
        tcp.extend(65535u16.to_be_bytes());
        tcp.extend([0, 0, 0, 0]);
        tcp.extend(&self.payload);
        let mut pseudo = Vec::new();
        pseudo.extend(self.src.octets());
        pseudo.extend(self.dst.octets());
        pseudo.extend([0, PROTO_TCP]);
        pseudo.extend((tcp.len() as u16).to_be_bytes());
        pseudo.extend(&tcp);
        let c = csum(&pseudo, 0);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        ipv4(self.ttl, PROTO_TCP, self.src, self.dst, &tcp, 0x4000)
    }

    fn frame(&self, macs: ([u8; 6], [u8; 6])) -> Vec<u8> {
        eth(macs, 0x0800, &self.ip())
    }
}

fn ipv4(ttl: u8, proto: u8, src: Ipv4Addr, dst: Ipv4Addr, body: &[u8], frag: u16) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend(((20 + body.len()) as u16).to_be_bytes());
    h.extend(0x1234u16.to_be_bytes());
    h.extend(frag.to_be_bytes());
    h.extend([ttl, proto, 0, 0]);
    h.extend(src.octets());
    h.extend(dst.octets());
    let c = csum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend(body);
    h
}

fn eth((dst, src): ([u8; 6], [u8; 6]), ethertype: u16, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(dst);
    f.extend(src);
    f.extend(ethertype.to_be_bytes());
    f.extend(body);
    f
}

/// What SpeedMimi's DSR puts in front of a client packet: an outer IPv4 header, protocol 4.
fn ipip(inner: &[u8], backend: Ipv4Addr) -> Vec<u8> {
    let mut outer = ipv4(64, 4, LB_BACK, backend, inner, 0);
    outer[4..6].copy_from_slice(&[0, 0]); // id 0
    outer[10..12].copy_from_slice(&[0, 0]);
    let c = csum(&outer[..20], 0);
    outer[10..12].copy_from_slice(&c.to_be_bytes());
    outer
}

// ---- a namespace with routes and neighbours, and the program loaded in it ----------------

struct Netns(String);

impl Netns {
    fn new() -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("smxdp{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let ns = Netns(name);
        ns.ip(&["netns", "add", &ns.0]);
        let cmds: Vec<String> = vec![
            "link set lo up".into(),
            "link add eth0 type veth peer name eth1".into(),
            format!("link set eth0 address {}", mac_text(MAC_ETH0)),
            format!("link set eth1 address {}", mac_text(MAC_ETH1)),
            "link set eth0 up".into(),
            "link set eth1 up".into(),
            "addr add 10.100.0.1/24 dev eth0".into(),
            format!("addr add {LB_BACK}/24 dev eth1"),
            format!("route add 10.200.0.0/16 via {CLIENT_GW}"),
            format!("neigh replace {CLIENT_GW} lladdr {} dev eth0 nud permanent", mac_text(MAC_CLIENT_GW)),
        ];
        for c in cmds {
            let argv: Vec<&str> = c.split(' ').collect();
            ns.ip_in(&argv);
        }
        for i in 0..3 {
            ns.ip_in(&[
                "neigh",
                "replace",
                &backend_ip(i).to_string(),
                "lladdr",
                &mac_text(backend_mac(i)),
                "dev",
                "eth1",
                "nud",
                "permanent",
            ]);
        }
        let fwd = Command::new("ip").args(["netns", "exec", &ns.0, "sysctl", "-qw", "net.ipv4.ip_forward=1"]).status();
        assert!(fwd.is_ok_and(|s| s.success()), "enable forwarding in {}", ns.0);
        ns
    }

    fn ip(&self, argv: &[&str]) {
        let out = Command::new("ip").args(argv).output().expect("run ip");
        assert!(out.status.success(), "ip {argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn ip_in(&self, argv: &[&str]) {
        let mut all = vec!["-n", &self.0];
        all.extend_from_slice(argv);
        self.ip(&all);
    }

    /// Runs `f` on a thread that has entered the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = std::fs::File::open(format!("/var/run/netns/{}", self.0)).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread only, with an open namespace fd.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("test thread")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

/// The loaded object with two services: NAT on VIP:80 (ring 0) and DSR on VIP_DSR:8080 (ring 1),
/// both over backends 0-2 at weights 50/30/20. Lives on the namespace's thread.
struct Fixture {
    ebpf: Ebpf,
    /// Ring 0 as written: backend index (0-2) per slot.
    table: Vec<u32>,
}

const MEMBERS: [(usize, u32); 3] = [(0, 50), (1, 30), (2, 20)];

impl Fixture {
    fn new() -> Fixture {
        let object = speedmimi::datapath::kernel::object();
        assert!(!object.is_empty(), "no eBPF object: run `cargo xtask build-ebpf` first");
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(l4::FLOWS, 4096)
            .map_max_entries(l4::REVERSE, 4096)
            .load(object)
            .expect("load the eBPF object");
        for name in ["l4_steer", "l4_decap"] {
            let p: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load().unwrap_or_else(|e| panic!("verifier rejects {name}: {e}"));
        }
        // A device's XDP receive queue exists only while XDP is attached; test runs with an
        // ingress ifindex need it, so the program is attached (no traffic flows here).
        let p: &mut Xdp = ebpf.program_mut("l4_steer").unwrap().try_into().unwrap();
        for dev in ["eth0", "eth1"] {
            p.attach(dev, XdpMode::Driver).or_else(|_| p.attach(dev, XdpMode::Skb)).expect("attach");
        }

        let members: Vec<Member> = MEMBERS
            .iter()
            .map(|&(i, w)| Member::from_addr(format!("{}:{BACKEND_PORT}", backend_ip(i)).as_bytes(), w))
            .collect();
        let mut table = vec![EMPTY; TABLE_SIZE];
        maglev::build(&members, &mut [Cursor::default(); 3], &mut table);

        let mut services: HashMap<_, ServiceKey, Service> =
            HashMap::try_from(ebpf.map_mut(l4::SERVICES).unwrap()).unwrap();
        let nat = Service { index: 0, mode: MODE_NAT, encap_src: 0 };
        services.insert(service_key(VIP, 80), nat, 0).unwrap();
        let dsr = Service { index: 1, mode: MODE_DSR, encap_src: u32::from_ne_bytes(LB_BACK.octets()) };
        services.insert(service_key(VIP_DSR, BACKEND_PORT), dsr, 0).unwrap();
        let mut backends: Array<_, Backend> = Array::try_from(ebpf.map_mut(l4::BACKENDS).unwrap()).unwrap();
        for (i, slot) in SLOTS.iter().enumerate() {
            let b = Backend { addr: u32::from_ne_bytes(backend_ip(i).octets()), port: BACKEND_PORT.to_be(), _pad: 0 };
            backends.set(*slot, b, 0).unwrap();
        }
        let mut fx = Fixture { ebpf, table };
        for ring in 0..2 {
            for (s, &m) in fx.table.clone().iter().enumerate() {
                fx.set_slot(ring, s, SLOTS[m as usize]);
            }
        }
        fx
    }

    fn set_slot(&mut self, ring: u32, slot: usize, backend_slot: u32) {
        let mut map: Array<_, u32> = Array::try_from(self.ebpf.map_mut(l4::RING).unwrap()).unwrap();
        map.set(ring * TABLE_SIZE as u32 + slot as u32, backend_slot, 0).unwrap();
    }

    /// The backend (0-2) userspace Maglev gives a client.
    fn expected_backend(&self, client: Ipv4Addr) -> usize {
        self.table[maglev::slot(hash::client_v4(client.into()))] as usize
    }

    fn run(&mut self, prog: &str, frame: &[u8], ingress: &str) -> (u32, Vec<u8>) {
        let p: &mut Xdp = self.ebpf.program_mut(prog).unwrap().try_into().unwrap();
        let mut ctx = Vec::new();
        for v in [0u32, frame.len() as u32, 0, ifindex(ingress), 0, 0] {
            ctx.extend(v.to_ne_bytes());
        }
        let mut out = vec![0u8; frame.len() + 64];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        let r = p.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn flows(&self) -> HashMap<&MapData, FlowKey, l4::Flow> {
        HashMap::try_from(self.ebpf.map(l4::FLOWS).unwrap()).unwrap()
    }

    fn reverse(&self) -> HashMap<&MapData, FlowKey, Reverse> {
        HashMap::try_from(self.ebpf.map(l4::REVERSE).unwrap()).unwrap()
    }
}

fn service_key(vip: Ipv4Addr, port: u16) -> ServiceKey {
    ServiceKey { addr: u32::from_ne_bytes(vip.octets()), port: port.to_be(), proto: PROTO_TCP, _pad: 0 }
}

fn flow_key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> FlowKey {
    FlowKey {
        src: u32::from_ne_bytes(src.octets()),
        dst: u32::from_ne_bytes(dst.octets()),
        sport: sport.to_be(),
        dport: dport.to_be(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn assert_frame(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(hex(got), hex(want), "{what}: frame differs (got, then expected)");
}

/// Runs a test body in a fresh namespace with the program loaded, as root.
fn with_fixture(test: &str, body: impl FnOnce(&mut Fixture) + Send) {
    if !root_or_skip(test) {
        return;
    }
    let ns = Netns::new();
    ns.run(|| body(&mut Fixture::new()));
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const RST: u8 = 0x04;

#[test]
fn nat_rewrites_to_the_maglev_backend_and_replies_back_to_the_vip() {
    with_fixture("nat_rewrites_to_the_maglev_backend_and_replies_back_to_the_vip", |fx| {
        for n in 0..40u8 {
            let client = Ipv4Addr::new(10, 200, 1, n + 1);
            let sport = 40000 + u16::from(n);
            let b = fx.expected_backend(client);
            let syn = Tcp::new(client, sport, VIP, 80, SYN);
            let (action, out) = fx.run("l4_steer", &syn.frame(MAC_IN), "eth0");
            assert_eq!(action, XDP_REDIRECT, "client {client}: redirected");
            let want = Tcp { dst: backend_ip(b), dport: BACKEND_PORT, ttl: 63, ..syn.clone() };
            assert_frame(&format!("client {client} to backend {b}"), &out, &want.frame((backend_mac(b), MAC_ETH1)));

            let reply = Tcp::new(backend_ip(b), BACKEND_PORT, client, sport, SYN | ACK);
            let (action, out) = fx.run("l4_steer", &reply.frame(MAC_IN), "eth1");
            assert_eq!(action, XDP_REDIRECT, "reply to {client}: redirected");
            let want = Tcp { src: VIP, sport: 80, ttl: 63, ..reply };
            assert_frame(&format!("reply to {client}"), &out, &want.frame((MAC_CLIENT_GW, MAC_ETH0)));
        }
        // The kernel and userspace agree on more than these 40: every client above reached
        // the backend `expected_backend` named. The flow tables hold each flow both ways.
        assert_eq!(fx.flows().keys().count(), 40);
        assert_eq!(fx.reverse().keys().count(), 40);
    });
}

#[test]
fn established_flows_keep_their_backend_when_the_ring_changes_and_rst_forgets_them() {
    with_fixture("established_flows_keep_their_backend_when_the_ring_changes_and_rst_forgets_them", |fx| {
        let client = Ipv4Addr::new(10, 200, 0, 9);
        let b = fx.expected_backend(client);
        let other = (b + 1) % 3;
        let (_, out) = fx.run("l4_steer", &Tcp::new(client, 5000, VIP, 80, SYN).frame(MAC_IN), "eth0");
        assert_eq!(out[30..34], backend_ip(b).octets());

        // The client's slot now names another backend: the open flow stays, a new one moves.
        let slot = maglev::slot(hash::client_v4(client.into()));
        fx.set_slot(0, slot, SLOTS[other]);
        let (_, out) = fx.run("l4_steer", &Tcp::new(client, 5000, VIP, 80, ACK).frame(MAC_IN), "eth0");
        assert_eq!(out[30..34], backend_ip(b).octets(), "established flow stays on backend {b}");
        let (_, out) = fx.run("l4_steer", &Tcp::new(client, 5001, VIP, 80, SYN).frame(MAC_IN), "eth0");
        assert_eq!(out[30..34], backend_ip(other).octets(), "new flow goes to backend {other}");

        // A new connection reusing a remembered 4-tuple (its SYN) takes the ring's backend.
        let (_, out) = fx.run("l4_steer", &Tcp::new(client, 5002, VIP, 80, SYN).frame(MAC_IN), "eth0");
        assert_eq!(out[30..34], backend_ip(other).octets());
        fx.set_slot(0, slot, SLOTS[b]);
        let (_, out) = fx.run("l4_steer", &Tcp::new(client, 5002, VIP, 80, ACK).frame(MAC_IN), "eth0");
        assert_eq!(out[30..34], backend_ip(other).octets(), "the flow stays where its SYN went");
        let (_, out) = fx.run("l4_steer", &Tcp::new(client, 5002, VIP, 80, SYN).frame(MAC_IN), "eth0");
        assert_eq!(out[30..34], backend_ip(b).octets(), "a reused tuple's SYN follows the ring");

        // A reset from the client still reaches the backend, and both table entries go.
        let key = flow_key(client, 5000, VIP, 80);
        let back = flow_key(backend_ip(b), BACKEND_PORT, client, 5000);
        assert!(fx.flows().get(&key, 0).is_ok() && fx.reverse().get(&back, 0).is_ok());
        let (action, out) = fx.run("l4_steer", &Tcp::new(client, 5000, VIP, 80, RST | ACK).frame(MAC_IN), "eth0");
        assert_eq!((action, &out[30..34]), (XDP_REDIRECT, &backend_ip(b).octets()[..]));
        assert!(fx.flows().get(&key, 0).is_err(), "client flow forgotten after RST");
        assert!(fx.reverse().get(&back, 0).is_err(), "reply flow forgotten after RST");

        // A reset from the backend does the same for the other flow.
        let key = flow_key(client, 5001, VIP, 80);
        let rst = Tcp::new(backend_ip(other), BACKEND_PORT, client, 5001, RST);
        let (action, out) = fx.run("l4_steer", &rst.frame(MAC_IN), "eth1");
        assert_eq!((action, &out[26..30]), (XDP_REDIRECT, &VIP.octets()[..]));
        assert!(fx.flows().get(&key, 0).is_err(), "client flow forgotten after the backend's RST");
    });
}

#[test]
fn nat_without_a_known_neighbour_passes_the_rewritten_packet_to_the_kernel() {
    with_fixture("nat_without_a_known_neighbour_passes_the_rewritten_packet_to_the_kernel", |fx| {
        let client = Ipv4Addr::new(10, 200, 3, 3);
        let slot = maglev::slot(hash::client_v4(client.into()));
        fx.set_slot(0, slot, SLOTS[3]); // 10.101.0.13: no neighbour entry
        let syn = Tcp::new(client, 6000, VIP, 80, SYN);
        let (action, out) = fx.run("l4_steer", &syn.frame(MAC_IN), "eth0");
        assert_eq!(action, XDP_PASS, "the kernel resolves the neighbour and forwards");
        // Rewritten, but TTL and MACs left to the kernel's forwarding.
        let want = Tcp { dst: backend_ip(3), dport: BACKEND_PORT, ..syn };
        assert_frame("passed after rewrite", &out, &want.frame(MAC_IN));
    });
}

#[test]
fn dsr_encapsulates_in_ipip_and_decap_restores_the_client_packet() {
    with_fixture("dsr_encapsulates_in_ipip_and_decap_restores_the_client_packet", |fx| {
        for n in 0..20u8 {
            let client = Ipv4Addr::new(10, 200, 2, n + 1);
            let b = fx.expected_backend(client);
            let syn =
                Tcp { payload: vec![n; 100 + usize::from(n)], ..Tcp::new(client, 7000, VIP_DSR, BACKEND_PORT, SYN) };
            let (action, out) = fx.run("l4_steer", &syn.frame(MAC_IN), "eth0");
            assert_eq!(action, XDP_REDIRECT, "client {client}: redirected");
            let want = eth((backend_mac(b), MAC_ETH1), 0x0800, &ipip(&syn.ip(), backend_ip(b)));
            assert_frame(&format!("client {client} encapsulated to backend {b}"), &out, &want);
            assert!(fx.reverse().keys().next().is_none(), "DSR keeps no reply state");

            // The backend's side: the decapsulator gives the stack the client's packet.
            let (action, inner) = fx.run("l4_decap", &out, "eth1");
            assert_eq!(action, XDP_PASS);
            assert_frame("decapsulated", &inner, &syn.frame((backend_mac(b), MAC_ETH1)));
        }
    });
}

#[test]
fn foreign_and_malformed_frames_pass_unchanged() {
    with_fixture("foreign_and_malformed_frames_pass_unchanged", |fx| {
        let client = Ipv4Addr::new(10, 200, 0, 1);
        let good = Tcp::new(client, 1234, VIP, 80, SYN);
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut frame = good.frame(MAC_IN);
            f(&mut frame);
            frame
        };
        let mut options = good.ip();
        options.splice(20..20, [1, 1, 1, 0]); // NOP NOP NOP EOL
        options[0] = 0x46;
        options[3] += 4;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("ARP", eth(MAC_IN, 0x0806, &[0u8; 28])),
            ("IPv6", eth(MAC_IN, 0x86dd, &[0x60; 60])),
            ("IP options", eth(MAC_IN, 0x0800, &options)),
            ("more fragments", with(&|f| f[20] |= 0x20)),
            ("fragment offset", with(&|f| f[21] = 0x10)),
            ("UDP to the VIP", eth(MAC_IN, 0x0800, &ipv4(64, 17, client, VIP, &[0u8; 16], 0))),
            ("ICMP to the VIP", eth(MAC_IN, 0x0800, &ipv4(64, 1, client, VIP, &[8, 0, 0, 0, 0, 0, 0, 0], 0))),
            ("other port", Tcp::new(client, 1234, VIP, 81, SYN).frame(MAC_IN)),
            ("other address", Tcp::new(client, 1234, Ipv4Addr::new(10, 0, 0, 12), 80, SYN).frame(MAC_IN)),
            ("TTL 1", Tcp { ttl: 1, ..good.clone() }.frame(MAC_IN)),
            ("IP version 6 in an IPv4 frame", with(&|f| f[14] = 0x65)),
            ("truncated TCP header", good.frame(MAC_IN)[..14 + 20 + 10].to_vec()),
            ("truncated IP header", good.frame(MAC_IN)[..14 + 12].to_vec()),
            ("Ethernet only", good.frame(MAC_IN)[..14].to_vec()),
            ("reply without a flow", Tcp::new(backend_ip(0), BACKEND_PORT, client, 999, ACK).frame(MAC_IN)),
        ];
        for (what, frame) in cases {
            for prog in ["l4_steer", "l4_decap"] {
                let (action, out) = fx.run(prog, &frame, "eth0");
                assert_eq!(action, XDP_PASS, "{prog}: {what} passes");
                assert_frame(&format!("{prog}: {what}"), &out, &frame);
            }
        }
        assert!(fx.flows().keys().next().is_none(), "no flow was created");
    });
}
