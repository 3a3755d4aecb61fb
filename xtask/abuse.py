#!/usr/bin/env python3
"""Resource-abuse figures for README's Security section (issue 12): a release SpeedMimi on
127.0.0.1 with `max_conn` slots, attackers holding most of them in every pre-request state the
listener has (a partial h2 preface, a slowloris head, an idle h2c connection after its preface
and SETTINGS, a connection that sends nothing), each reconnecting as soon as the proxy closes it,
and one normal client meanwhile. Prints the normal client's latency, the proxy's CPU while
attacked and the sockets left in CLOSE-WAIT. Bounded: every phase has a fixed duration.
The attackers connect from 127.0.0.2, the normal client from 127.0.0.1; PER_CLIENT sets
`server.max_conn_per_client` (0, the default: no limit).

Usage: python3 xtask/abuse.py target/release/speedmimi [ATTACKERS] [SECONDS] [PER_CLIENT]
"""

import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/speedmimi"
ATTACKERS = int(sys.argv[2]) if len(sys.argv) > 2 else 1200
SECONDS = float(sys.argv[3]) if len(sys.argv) > 3 else 20.0
PER_CLIENT = int(sys.argv[4]) if len(sys.argv) > 4 else 0
ATTACKER_SOURCE = ("127.0.0.2", 0)
PROXY, BACKEND, ADMIN = 18480, 18481, 18482
READ_TIMEOUT = 5
MAX_CONN = 1000

CONFIG = f"""
server:
  host: "127.0.0.1"
  port: {PROXY}
  read_timeout: {READ_TIMEOUT}s
  max_conn: {MAX_CONN}
  max_conn_per_client: {PER_CLIENT}
  workers: 1
backends:
  default:
    - id: "b1"
      host: "127.0.0.1"
      port: {BACKEND}
routing:
  default:
    path: "/"
    upstream: "default"
    load_balancer: "round_robin"
grpc:
  enabled: false
admin:
  host: "127.0.0.1"
  port: {ADMIN}
ebpf:
  enabled: false
"""

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def attacker(kind, stop, closed):
    """Holds one slot in the given state; reconnects whenever the proxy closes it."""
    while not stop.is_set():
        try:
            s = socket.create_connection(("127.0.0.1", PROXY), timeout=2, source_address=ATTACKER_SOURCE)
        except OSError:
            time.sleep(0.05)
            continue
        s.settimeout(0.5)
        try:
            if kind == "preface":
                s.sendall(b"PRI")
            elif kind == "h2idle":
                s.sendall(H2_PREFACE + SETTINGS)
            elif kind == "slowloris":
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            while not stop.is_set():
                if kind == "slowloris":
                    s.sendall(b"X-a: b\r\n")
                try:
                    if s.recv(4096) == b"":
                        break
                except socket.timeout:
                    continue
        except OSError:
            pass
        finally:
            closed[0] += 1
            s.close()


def normal_client(results):
    """One request every 50 ms for SECONDS; puts (latencies, failures) on `results`."""
    latencies, failures = [], 0
    t0 = time.time()
    while time.time() - t0 < SECONDS:
        start = time.time()
        try:
            s = socket.create_connection(("127.0.0.1", PROXY), timeout=READ_TIMEOUT + 5)
            s.settimeout(READ_TIMEOUT + 5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            s.close()
            if data.startswith(b"HTTP/1.1 200"):
                latencies.append(time.time() - start)
            else:
                failures += 1
        except OSError:
            failures += 1
        time.sleep(0.05)
    results.put((latencies, failures))


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def close_wait(port):
    out = subprocess.run(["ss", "-tan", "state", "close-wait", f"sport = :{port}"], capture_output=True, text=True)
    return max(0, len(out.stdout.strip().splitlines()) - 1)


def main():
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(CONFIG)
        path = f.name
    backend = subprocess.Popen([BIN, "demo-backend", "--port", str(BACKEND), "--id", "b1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = subprocess.Popen([BIN, "-c", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        kinds = ["preface", "slowloris", "h2idle", "silent"]
        stop = threading.Event()
        closed = [0]
        threads = [threading.Thread(target=attacker, args=(kinds[i % 4], stop, closed), daemon=True)
                   for i in range(ATTACKERS)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        cpu0, t0 = cpu_seconds(proxy.pid), time.time()
        # The normal client runs in its own process: the attackers' threads share a GIL.
        spawn = multiprocessing.get_context("spawn")
        results = spawn.Queue()
        normal = spawn.Process(target=normal_client, args=(results,))
        normal.start()
        latencies, failures = results.get(timeout=SECONDS + 3 * (READ_TIMEOUT + 5))
        normal.join()
        cpu = cpu_seconds(proxy.pid) - cpu0
        wall = time.time() - t0
        stop.set()
        latencies.sort()
        pct = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")
        print(f"attackers: {ATTACKERS} (preface, slowloris, idle h2c, silent; reconnecting) against max_conn "
              f"{MAX_CONN}, max_conn_per_client {PER_CLIENT}, read_timeout {READ_TIMEOUT}s, {wall:.0f} s")
        print(f"attacker connections closed by the proxy: {closed[0]}")
        print(f"normal client: {len(latencies)} ok, {failures} failed; latency p50 {pct(0.5):.1f} ms, "
              f"p99 {pct(0.99):.1f} ms, max {latencies[-1] * 1000 if latencies else float('nan'):.1f} ms")
        print(f"proxy CPU while attacked: {cpu:.2f} s over {wall:.0f} s ({100 * cpu / wall:.1f}% of a core)")
        time.sleep(0.5)
        print(f"sockets in CLOSE-WAIT on the proxy port: {close_wait(PROXY)}")
    finally:
        proxy.terminate()
        backend.terminate()
        proxy.wait(timeout=15)
        backend.wait(timeout=5)
        os.unlink(path)


if __name__ == "__main__":
    main()
