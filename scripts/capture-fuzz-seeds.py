#!/usr/bin/env python3
"""Records what real initiators send, as fuzz seeds.

A loopback TCP proxy sits between libiscsi's tools and a running appliance and writes each
connection's client-to-target bytes to fuzz/seeds/pdu_stream/<tool>-<n>.bin, prefixed with the
pdu_stream target's mode byte (0: the stream carries its own login). Usage:

    scripts/capture-fuzz-seeds.py TARGET_HOST:PORT IQN
"""
import os
import socket
import subprocess
import sys
import threading

target_host, target_port = sys.argv[1].rsplit(":", 1)
iqn = sys.argv[2]
out_dir = os.path.join(os.path.dirname(__file__), "..", "fuzz", "seeds", "pdu_stream")
os.makedirs(out_dir, exist_ok=True)

listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(16)
proxy_port = listener.getsockname()[1]
current = {"tool": "x", "n": 0}
lock = threading.Lock()


def pump(src, dst, sink):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if sink is not None:
                sink.extend(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve():
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection((target_host, int(target_port)))
        captured = bytearray()
        with lock:
            current["n"] += 1
            name = f"{current['tool']}-{current['n']}.bin"

        def run(client=client, upstream=upstream, captured=captured, name=name):
            t = threading.Thread(target=pump, args=(upstream, client, None), daemon=True)
            t.start()
            pump(client, upstream, captured)
            t.join(timeout=5)
            with open(os.path.join(out_dir, name), "wb") as f:
                f.write(bytes([0]) + bytes(captured[:65536]))

        threading.Thread(target=run, daemon=True).start()


threading.Thread(target=serve, daemon=True).start()
portal = f"127.0.0.1:{proxy_port}"
url = f"iscsi://{portal}/{iqn}/0"
tools = [
    ("iscsi-ls", ["iscsi-ls", "-s", f"iscsi://{portal}"]),
    ("iscsi-inq", ["iscsi-inq", url]),
    ("iscsi-inq-vpd83", ["iscsi-inq", "-e", "1", "-c", "131", url]),
    ("iscsi-readcapacity16", ["iscsi-readcapacity16", url]),
    ("iscsi-perf", ["iscsi-perf", "-m", "4", "-b", "8", "-r", "-t", "1", url]),
]
for tool, cmd in tools:
    with lock:
        current["tool"] = tool
        current["n"] = 0
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, check=False)
    threading.Event().wait(0.5)
print(f"seeds in {os.path.normpath(out_dir)}: {sorted(os.listdir(out_dir))}")
