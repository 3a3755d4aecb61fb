//! `GET /metrics`: Prometheus text exposition format 0.0.4.

use std::{fmt::Write as _, sync::atomic::Ordering::Relaxed};

use axum::{
    extract::State as AxState,
    http::header,
    response::{IntoResponse, Response},
};

use super::Admin;
use crate::{state::State, stats::Histogram};

/// Histogram bounds in seconds (Prometheus' usual latency buckets).
const BOUNDS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

pub async fn render(AxState(admin): AxState<Admin>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text(&admin.state)).into_response()
}

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let bounds_us: Vec<u64> = BOUNDS.iter().map(|s| (s * 1e6) as u64).collect();
    for (le, n) in BOUNDS.iter().zip(h.cumulative(&bounds_us)) {
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count());
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum().as_secs_f64());
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count());
}

/// The whole exposition.
pub fn text(state: &State) -> String {
    let mut out = String::with_capacity(4096);
    let snap = state.snapshot();
    let s = &state.stats;

    family(&mut out, "speedmimi_uptime_seconds", "gauge", "Seconds since start.");
    let _ = writeln!(out, "speedmimi_uptime_seconds {}", s.started.elapsed().as_secs_f64());
    family(&mut out, "speedmimi_connections_open", "gauge", "Client connections open now.");
    let _ = writeln!(out, "speedmimi_connections_open {}", s.connections_open.load(Relaxed));
    family(&mut out, "speedmimi_connections_total", "counter", "Client connections accepted.");
    let _ = writeln!(out, "speedmimi_connections_total {}", s.connections_total.load(Relaxed));
    family(
        &mut out,
        "speedmimi_connections_refused_total",
        "counter",
        "Client connections closed at accept, by reason (per_client: over server.max_conn_per_client).",
    );
    let _ = writeln!(
        out,
        "speedmimi_connections_refused_total{{reason=\"per_client\"}} {}",
        s.refused_per_client.load(Relaxed)
    );
    family(
        &mut out,
        "speedmimi_http1_handovers_total",
        "counter",
        "HTTP/1 connections the proxy's own engine handed to hyper, at a request it does not serve itself.",
    );
    let _ = writeln!(out, "speedmimi_http1_handovers_total {}", s.http1_handovers.load(Relaxed));
    family(
        &mut out,
        "speedmimi_h2_bridged_requests_total",
        "counter",
        "HTTP/2 requests the proxy's own engine forwarded to their HTTP/1.1 backend (instead of hyper's client).",
    );
    let _ = writeln!(out, "speedmimi_h2_bridged_requests_total {}", s.h2_bridged.load(Relaxed));
    family(&mut out, "speedmimi_upgraded_flows_open", "gauge", "Upgraded (WebSocket) flows open now.");
    let _ = writeln!(out, "speedmimi_upgraded_flows_open {}", s.upgraded_open.load(Relaxed));
    family(&mut out, "speedmimi_spliced_flows_open", "gauge", "Flows spliced in the kernel now.");
    let _ = writeln!(out, "speedmimi_spliced_flows_open {}", state.datapath.spliced_sockets() / 2);
    family(
        &mut out,
        "speedmimi_spliced_flows_parked",
        "gauge",
        "Spliced flows parked now: quiet, watched by one epoll instead of a tokio task each.",
    );
    let _ = writeln!(out, "speedmimi_spliced_flows_parked {}", s.spliced_parked.load(Relaxed));
    if let Some(a) = state.announcer.get() {
        let st = a.status();
        family(&mut out, "speedmimi_announced_vips", "gauge", "l4 VIPs on the announce interface now.");
        let _ = writeln!(out, "speedmimi_announced_vips {}", st.announced.len());
        family(&mut out, "speedmimi_announce_drained", "gauge", "1 while the operator has drained this node.");
        let _ = writeln!(out, "speedmimi_announce_drained {}", u8::from(st.drained));
    }

    family(
        &mut out,
        "speedmimi_requests_total",
        "counter",
        "Requests answered through a backend, by route, upstream, backend and status code.",
    );
    for route in &snap.routes {
        for rs in &route.stats {
            let labels = format!(
                "route=\"{}\",upstream=\"{}\",backend=\"{}\"",
                esc(&rs.route),
                esc(&rs.upstream),
                esc(&rs.backend)
            );
            for (code, n) in rs.codes() {
                let _ = writeln!(out, "speedmimi_requests_total{{{labels},code=\"{code}\"}} {n}");
            }
        }
    }
    family(&mut out, "speedmimi_server_requests_total", "counter", "Requests answered, including local errors.");
    let _ = writeln!(out, "speedmimi_server_requests_total {}", s.traffic.requests.load(Relaxed));

    let backends: Vec<_> = snap.upstreams.values().flat_map(|u| u.backends.iter()).collect();
    let label = |b: &crate::backend::Backend| format!("upstream=\"{}\",backend=\"{}\"", esc(&b.upstream), esc(&b.id));
    family(
        &mut out,
        "speedmimi_backend_up",
        "gauge",
        "1 when the backend may get traffic (active, healthy, not cooling down).",
    );
    for b in &backends {
        let _ = writeln!(out, "speedmimi_backend_up{{{}}} {}", label(b), u8::from(b.is_up()));
    }
    family(&mut out, "speedmimi_backend_health_check_up", "gauge", "The active health check's verdict (1 up, 0 down).");
    for b in &backends {
        let _ =
            writeln!(out, "speedmimi_backend_health_check_up{{{}}} {}", label(b), u8::from(b.checked_up.load(Relaxed)));
    }
    family(&mut out, "speedmimi_backend_in_flight", "gauge", "Requests and upgraded flows in flight to the backend.");
    for b in &backends {
        let _ = writeln!(out, "speedmimi_backend_in_flight{{{}}} {}", label(b), b.inflight.load(Relaxed));
    }
    family(&mut out, "speedmimi_backend_ejected", "gauge", "1 while outlier ejection keeps the backend out.");
    for b in &backends {
        let _ = writeln!(out, "speedmimi_backend_ejected{{{}}} {}", label(b), u8::from(b.standing.ejected()));
    }
    family(&mut out, "speedmimi_backend_ejections_total", "counter", "Outlier ejections of the backend.");
    for b in &backends {
        let _ = writeln!(out, "speedmimi_backend_ejections_total{{{}}} {}", label(b), b.standing.ejections().0);
    }
    family(
        &mut out,
        "speedmimi_backend_slow_start_share",
        "gauge",
        "Share of its traffic the backend takes during slow start (1 = full).",
    );
    for b in &backends {
        let _ = writeln!(out, "speedmimi_backend_slow_start_share{{{}}} {}", label(b), b.standing.share());
    }
    family(&mut out, "speedmimi_upstream_retries_total", "counter", "Requests sent again to another backend.");
    for u in snap.upstreams.values() {
        let _ = writeln!(
            out,
            "speedmimi_upstream_retries_total{{upstream=\"{}\"}} {}",
            esc(&u.name),
            u.budget.retried.load(Relaxed)
        );
    }
    family(&mut out, "speedmimi_upstream_retries_refused_total", "counter", "Retries the retry budget refused.");
    for u in snap.upstreams.values() {
        let _ = writeln!(
            out,
            "speedmimi_upstream_retries_refused_total{{upstream=\"{}\"}} {}",
            esc(&u.name),
            u.budget.refused.load(Relaxed)
        );
    }
    family(&mut out, "speedmimi_backend_weight", "gauge", "Configured weight.");
    for b in &backends {
        let _ = writeln!(out, "speedmimi_backend_weight{{{}}} {}", label(b), b.weight.load(Relaxed));
    }
    family(&mut out, "speedmimi_bytes_received_total", "counter", "Request body bytes sent on to the backend.");
    for b in &backends {
        let _ = writeln!(out, "speedmimi_bytes_received_total{{{}}} {}", label(b), b.traffic.bytes_in.load(Relaxed));
    }
    family(&mut out, "speedmimi_bytes_sent_total", "counter", "Response body bytes from the backend sent to clients.");
    for b in &backends {
        let _ = writeln!(out, "speedmimi_bytes_sent_total{{{}}} {}", label(b), b.traffic.bytes_out.load(Relaxed));
    }
    family(
        &mut out,
        "speedmimi_upgraded_flows_total",
        "counter",
        "Upgraded flows that ended, by how they were joined.",
    );
    for b in &backends {
        let l = label(b);
        let _ =
            writeln!(out, "speedmimi_upgraded_flows_total{{{l},mode=\"splice\"}} {}", b.spliced_flows.load(Relaxed));
        let _ = writeln!(out, "speedmimi_upgraded_flows_total{{{l},mode=\"copy\"}} {}", b.copied_flows.load(Relaxed));
    }
    family(
        &mut out,
        "speedmimi_spliced_bytes_total",
        "counter",
        "Bytes the kernel moved for spliced flows (per-CPU counters, summed).",
    );
    for b in &backends {
        if let Some(c) = state.datapath.counters(b.slot) {
            let l = label(b);
            let _ =
                writeln!(out, "speedmimi_spliced_bytes_total{{{l},direction=\"to_backend\"}} {}", c.bytes_to_backend);
            let _ = writeln!(out, "speedmimi_spliced_bytes_total{{{l},direction=\"to_client\"}} {}", c.bytes_to_client);
        }
    }
    family(
        &mut out,
        "speedmimi_spliced_overlap_bytes_cut_total",
        "counter",
        "Bytes cut from received segments that overlapped bytes a spliced flow had already moved.",
    );
    for b in &backends {
        if let Some(c) = state.datapath.counters(b.slot) {
            let _ = writeln!(out, "speedmimi_spliced_overlap_bytes_cut_total{{{}}} {}", label(b), c.overlap_bytes_cut);
        }
    }
    let xdp: Vec<_> = backends.iter().filter_map(|b| Some((label(b), state.datapath.l4_counters(b.slot)?))).collect();
    if !xdp.is_empty() {
        family(
            &mut out,
            "speedmimi_xdp_packets_total",
            "counter",
            "Packets XDP steered, by direction (per-CPU, summed).",
        );
        for (l, c) in &xdp {
            let _ = writeln!(out, "speedmimi_xdp_packets_total{{{l},direction=\"to_backend\"}} {}", c.packets);
            let _ = writeln!(out, "speedmimi_xdp_packets_total{{{l},direction=\"to_client\"}} {}", c.reply_packets);
        }
        family(&mut out, "speedmimi_xdp_bytes_total", "counter", "IP bytes XDP steered, by direction.");
        for (l, c) in &xdp {
            let _ = writeln!(out, "speedmimi_xdp_bytes_total{{{l},direction=\"to_backend\"}} {}", c.bytes);
            let _ = writeln!(out, "speedmimi_xdp_bytes_total{{{l},direction=\"to_client\"}} {}", c.reply_bytes);
        }
        family(&mut out, "speedmimi_xdp_new_flows_total", "counter", "Flows XDP gave a backend from the Maglev ring.");
        for (l, c) in &xdp {
            let _ = writeln!(out, "speedmimi_xdp_new_flows_total{{{l}}} {}", c.new_flows);
        }
    }
    family(
        &mut out,
        "speedmimi_request_duration_seconds",
        "histogram",
        "Time from receiving a request to the backend's response head.",
    );
    for b in &backends {
        histogram(&mut out, "speedmimi_request_duration_seconds", &label(b), &b.traffic.latency);
    }
    #[cfg(feature = "count-allocs")]
    {
        family(&mut out, "speedmimi_allocations_total", "counter", "Heap allocations by every thread (bench build).");
        let _ = writeln!(out, "speedmimi_allocations_total {}", crate::alloc_count::total());
    }
    out
}
