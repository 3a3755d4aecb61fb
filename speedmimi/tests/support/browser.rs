//! Headless Chromium driven through the DevTools protocol (a WebSocket of JSON commands), for
//! tests of the pages the daemon serves: open a page, evaluate script in it, take screenshots.
//! The browser runs with a profile of its own and is killed, its profile removed, when dropped.

use std::{
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

use super::tls::TempDir;

/// How long one DevTools command may take.
const CALL_WITHIN: Duration = Duration::from_secs(20);

/// A headless Chromium with one page under our control. Fields drop in order: the browser's
/// processes die before its profile is removed.
pub struct Browser {
    page: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _process: Group,
    _profile: TempDir,
}

/// Chromium and the processes it forks (zygote, renderers, GPU), in a process group of their
/// own: all are killed when this is dropped, also when a test fails while starting it.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the group is the one the child leads.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

impl Browser {
    /// Starts Chromium (window `width`×`height`) and attaches to its first page.
    pub async fn start(chromium: &std::path::Path, width: u32, height: u32) -> Browser {
        let profile = TempDir::new();
        // Flags as the machine notes give them: no sandbox as root, and nothing that reaches out
        // to the network (this machine refuses it, many connections at a time).
        let process = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                &format!("--window-size={width},{height}"),
                &format!("--user-data-dir={}", profile.0.display()),
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map(Group)
            .expect("start chromium");
        // Chromium writes its DevTools port to the profile once it listens.
        let port_file = profile.0.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port: u16 = loop {
            if let Some(port) = std::fs::read_to_string(&port_file).ok().and_then(|s| s.lines().next()?.parse().ok()) {
                break port;
            }
            assert!(Instant::now() < deadline, "chromium wrote no DevTools port within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let list = super::raw(
            ([127, 0, 0, 1], port).into(),
            b"GET /json/list HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        let body = list.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let targets: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("DevTools /json/list: {e}: {list}"));
        let ws = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page target: {targets}"));
        // It names `localhost`, which may resolve to ::1 first; DevTools listens on 127.0.0.1.
        let path = ws.find("/devtools/").map(|i| &ws[i..]).unwrap_or_else(|| panic!("DevTools URL {ws}"));
        let ws = format!("ws://127.0.0.1:{port}{path}");
        let (page, _) = tokio_tungstenite::connect_async(ws.as_str()).await.expect("DevTools WebSocket");
        let mut browser = Browser { page, next_id: 0, _process: process, _profile: profile };
        browser.call("Page.enable", json!({})).await;
        browser.call("Runtime.enable", json!({})).await;
        browser
    }

    /// One DevTools command; its result (panics on a protocol error or after `CALL_WITHIN`).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.page.send(Message::text(msg)).await.expect("DevTools send");
        let answer = tokio::time::timeout(CALL_WITHIN, async {
            while let Some(msg) = self.page.next().await {
                let Ok(Message::Text(text)) = msg else { continue };
                let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
                if v["id"] == id {
                    return v;
                }
            }
            panic!("DevTools connection closed during {method}");
        })
        .await
        .unwrap_or_else(|_| panic!("DevTools {method}: no answer within {CALL_WITHIN:?}"));
        assert!(answer.get("error").is_none(), "DevTools {method}: {answer}");
        answer["result"].clone()
    }

    /// Opens `url` in the page.
    pub async fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
    }

    /// The value of a script expression in the page (promises awaited); panics on an exception.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }))
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {}", r["exceptionDetails"]);
        r["result"]["value"].clone()
    }

    /// Waits (at most `within`) until `expression` is truthy in the page; panics naming `what`.
    pub async fn wait_for(&mut self, what: &str, expression: &str, within: Duration) {
        let deadline = Instant::now() + within;
        let check = format!("(() => {{ try {{ return !!({expression}); }} catch (e) {{ return false; }} }})()");
        while self.eval(&check).await != Value::Bool(true) {
            assert!(Instant::now() < deadline, "{what}: not seen within {within:?} ({expression})");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element `selector` names (panics if there is none).
    pub async fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let found = self
            .eval(&format!("(() => {{ const e = document.querySelector({sel}); if (e) e.click(); return !!e; }})()"))
            .await;
        assert_eq!(found, Value::Bool(true), "nothing to click at {selector}");
    }

    /// The text of the element `selector` names (None if there is none).
    pub async fn text(&mut self, selector: &str) -> Option<String> {
        let sel = serde_json::to_string(selector).unwrap();
        self.eval(&format!("document.querySelector({sel})?.textContent ?? null")).await.as_str().map(str::to_owned)
    }

    /// A PNG of the page as the window shows it.
    pub async fn screenshot(&mut self) -> Vec<u8> {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true })).await;
        base64_decode(r["data"].as_str().expect("screenshot data"))
    }

    /// Renders the page as a phone would (`width` CSS pixels, touch, mobile viewport).
    pub async fn as_phone(&mut self, width: u32, height: u32) {
        let params = json!({ "width": width, "height": height, "deviceScaleFactor": 2, "mobile": true });
        self.call("Emulation.setDeviceMetricsOverride", params).await;
    }
}

/// Standard base64 (what DevTools sends screenshots in).
fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c:?}"),
    };
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for chunk in s.as_bytes().chunks(4) {
        let digits: Vec<u8> = chunk.iter().filter(|&&c| c != b'=').map(|&c| value(c)).collect();
        let n = digits.iter().enumerate().fold(0u32, |acc, (i, &d)| acc | (u32::from(d) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..digits.len()]);
    }
    out
}
