//! `GET /metrics` read by a real Prometheus parser (Python's `prometheus_client`), after traffic
//! that includes a route miss (404) and a dead backend (502).

mod support;

use std::{collections::BTreeMap, process::Stdio, time::Duration};

use http::StatusCode;
use serde_json::Value;
use support::{Origin, Proxy, backend_yaml, client, dead_addr, get};
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(20);

/// Parses the exposition with `prometheus_client` and prints families as JSON.
const PARSE: &str = r#"
import json, math, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({"name": f.name, "type": f.type, "samples": [
        {"name": s.name, "labels": s.labels, "value": s.value if math.isfinite(s.value) else str(s.value)}
        for s in f.samples]})
print(json.dumps(out))
"#;

/// Runs `python3 args`, bounded, with `stdin`; returns (success, stdout, stderr), or None when
/// python3 cannot be started at all.
async fn python(args: &[&str], stdin: &str, bound: Duration) -> Option<(bool, String, String)> {
    let mut child = tokio::process::Command::new("python3")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(bound, child.wait_with_output()).await.expect("python3 timed out").unwrap();
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Makes sure `prometheus_client` is importable, installing it once if needed. Err: why not.
async fn parser_available() -> Result<(), String> {
    let probe = || python(&["-c", "import prometheus_client"], "", WAIT);
    match probe().await {
        None => return Err("python3 is not installed".into()),
        Some((true, _, _)) => return Ok(()),
        Some(_) => {}
    }
    let install = python(&["-m", "pip", "install", "--quiet", "prometheus_client"], "", Duration::from_secs(180)).await;
    match install {
        Some((true, _, _)) => {}
        Some((false, out, err)) => return Err(format!("pip install prometheus_client failed:\n{out}{err}")),
        None => return Err("python3 is not installed".into()),
    }
    match probe().await {
        Some((true, _, _)) => Ok(()),
        Some((_, out, err)) => Err(format!("prometheus_client still not importable after install:\n{out}{err}")),
        None => Err("python3 is not installed".into()),
    }
}

/// One parsed sample.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Family name -> (type, samples).
type Families = BTreeMap<String, (String, Vec<Sample>)>;

fn families(json: &str) -> Families {
    let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("parser output is not JSON ({e}): {json}"));
    let mut out = Families::new();
    for f in v.as_array().expect("a list of families") {
        let samples = f["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| Sample {
                name: s["name"].as_str().unwrap().to_owned(),
                labels: serde_json::from_value(s["labels"].clone()).unwrap(),
                value: match &s["value"] {
                    Value::String(v) => v.parse().unwrap(),
                    v => v.as_f64().unwrap(),
                },
            })
            .collect();
        let name = f["name"].as_str().unwrap().to_owned();
        let kind = f["type"].as_str().unwrap().to_owned();
        assert!(out.insert(name.clone(), (kind, samples)).is_none(), "family {name} appears twice");
    }
    out
}

/// Every sample named `name` (whatever family the parser put it in).
fn samples<'a>(fams: &'a Families, name: &str) -> Vec<&'a Sample> {
    fams.values().flat_map(|(_, s)| s.iter()).filter(|s| s.name == name).collect()
}

/// The one sample named `name` with exactly these labels.
fn value(fams: &Families, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let found: Vec<_> = samples(fams, name).into_iter().filter(|s| s.labels == want).collect();
    assert!(found.len() <= 1, "{name}{want:?} appears {} times", found.len());
    found.first().map(|s| s.value)
}

/// The family type of the family holding samples named `name`.
fn kind_of<'a>(fams: &'a Families, name: &str) -> &'a str {
    fams.values().find(|(_, s)| s.iter().any(|s| s.name == name)).map(|(k, _)| k.as_str()).unwrap_or("<absent>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_the_traffic() {
    if let Err(why) = parser_available().await {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("no Prometheus parser: {why}");
        }
        eprintln!("SKIPPED metrics_parse_as_prometheus_text_and_count_the_traffic: {why}");
        return;
    }

    let (a, off) = (Origin::start("a").await, Origin::start("off").await);
    let dead = dead_addr().await;
    let yaml = format!(
        "server:\n  host: 127.0.0.1\n  port: 8080\nbackends:\n  default:\n{}{}      active: false\n  dead:\n{}\
         routing:\n  main:\n    host: app.test\n    path: /\n    upstream: default\n    load_balancer: round_robin\n  \
         broken:\n    host: app.test\n    path: /broken\n    upstream: dead\n",
        a.yaml(100),
        off.yaml(100),
        backend_yaml("gone", dead, 100),
    );
    let p = Proxy::start(&yaml).await;
    let c = client();
    const OK: usize = 7;
    for _ in 0..OK {
        let (status, _, body) = get(&c, &p.url("/"), &[("host", "app.test")]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "a\n"));
    }
    let (status, _, body) = get(&c, &p.url("/broken"), &[("host", "app.test")]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let (status, _, body) = get(&c, &p.url("/"), &[("host", "nope.test")]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(off.requests(), 0, "an inactive backend got requests");

    let (status, headers, text) = get(&c, &p.admin_url("/metrics"), &[]).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let ctype = headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(ctype.starts_with("text/plain"), "content-type {ctype:?}");

    let (parsed, out, err) = python(&["-c", PARSE], &text, WAIT).await.expect("python3 ran before");
    assert!(parsed, "prometheus_client rejected the exposition:\n{err}\n--- exposition ---\n{text}");
    let fams = families(&out);
    let ctx = format!("--- exposition ---\n{text}");

    // Requests by route, upstream, backend and code.
    assert_eq!(kind_of(&fams, "speedmimi_requests_total"), "counter", "{ctx}");
    let labels = [("route", "main"), ("upstream", "default"), ("backend", "a"), ("code", "200")];
    assert_eq!(value(&fams, "speedmimi_requests_total", &labels), Some(OK as f64), "{ctx}");
    let to_off: f64 = samples(&fams, "speedmimi_requests_total")
        .iter()
        .filter(|s| s.labels.get("backend").map(String::as_str) == Some("off"))
        .map(|s| s.value)
        .sum();
    assert_eq!(to_off, 0.0, "{ctx}");
    for s in samples(&fams, "speedmimi_requests_total") {
        for l in ["route", "upstream", "backend", "code"] {
            assert!(s.labels.contains_key(l), "{s:?} lacks label {l}\n{ctx}");
        }
    }
    // Everything the listener answered, the local 404 and the 502 included.
    assert_eq!(value(&fams, "speedmimi_server_requests_total", &[]), Some(OK as f64 + 2.0), "{ctx}");

    // Up: the live backend; not the inactive one, nor the one that refused connections.
    assert_eq!(kind_of(&fams, "speedmimi_backend_up"), "gauge", "{ctx}");
    let up = |upstream: &str, backend: &str| {
        value(&fams, "speedmimi_backend_up", &[("upstream", upstream), ("backend", backend)])
    };
    assert_eq!(up("default", "a"), Some(1.0), "{ctx}");
    assert_eq!(up("default", "off"), Some(0.0), "{ctx}");
    assert_eq!(up("dead", "gone"), Some(0.0), "{ctx}");
    assert_eq!(samples(&fams, "speedmimi_backend_up").len(), 3, "{ctx}");

    // The latency histogram: per backend, cumulative buckets ending in +Inf == _count.
    let hist = "speedmimi_request_duration_seconds";
    assert_eq!(fams.get(hist).map(|(k, _)| k.as_str()), Some("histogram"), "{ctx}");
    for (upstream, backend) in [("default", "a"), ("default", "off"), ("dead", "gone")] {
        let mut buckets: Vec<(f64, f64)> = samples(&fams, &format!("{hist}_bucket"))
            .iter()
            .filter(|s| {
                s.labels.get("upstream").map(String::as_str) == Some(upstream)
                    && s.labels.get("backend").map(String::as_str) == Some(backend)
            })
            .map(|s| (s.labels["le"].parse::<f64>().unwrap_or_else(|_| panic!("le {:?}", s.labels["le"])), s.value))
            .collect();
        assert!(!buckets.is_empty(), "no buckets for {backend}\n{ctx}");
        buckets.sort_by(|x, y| x.0.total_cmp(&y.0));
        assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0), "repeated le for {backend}: {buckets:?}");
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "buckets decrease for {backend}: {buckets:?}");
        let (last_le, inf) = *buckets.last().unwrap();
        assert!(last_le.is_infinite(), "no +Inf bucket for {backend}: {buckets:?}");
        let labels = [("upstream", upstream), ("backend", backend)];
        let count = value(&fams, &format!("{hist}_count"), &labels).unwrap_or_else(|| panic!("no _count\n{ctx}"));
        let sum = value(&fams, &format!("{hist}_sum"), &labels).unwrap_or_else(|| panic!("no _sum\n{ctx}"));
        assert_eq!(inf, count, "+Inf bucket != _count for {backend}\n{ctx}");
        assert!(sum >= 0.0 && (count > 0.0 || sum == 0.0), "{backend}: sum {sum} count {count}");
    }
    let count_a = value(&fams, &format!("{hist}_count"), &[("upstream", "default"), ("backend", "a")]);
    assert_eq!(count_a, Some(OK as f64), "{ctx}");
    assert_eq!(value(&fams, &format!("{hist}_count"), &[("upstream", "default"), ("backend", "off")]), Some(0.0));
    p.stop().await;
}
