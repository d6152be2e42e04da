#!/usr/bin/env python3
"""Round trip of a 48-byte message over loopback TCP between two processes.

    scripts/loopback-rtt.py [ROUND_TRIPS]

Prints the mean round trip with the two processes free to run on any CPU and with both
pinned to CPU 0. On a VM the difference is the cost of waking a thread on another virtual
CPU, which every hop between controllers pays at queue depth 1 (docs/benchmarks.md). Binds
127.0.0.1 only; stops only the child it forks.
"""
import os
import socket
import sys
import time


def measure(trips, cpu=None):
    allowed = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    child = os.fork()
    if child == 0:
        # The echo side: inherits the affinity set above.
        c = socket.create_connection(("127.0.0.1", port))
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            d = c.recv(64)
            if not d:
                os._exit(0)
            c.sendall(d)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 48
    for _ in range(1000):  # warm up
        conn.sendall(msg)
        conn.recv(64)
    t = time.perf_counter()
    for _ in range(trips):
        conn.sendall(msg)
        got = conn.recv(64)
        if len(got) != len(msg):
            sys.exit("short echo: the loop assumes one segment per message")
    dt = time.perf_counter() - t
    conn.close()
    srv.close()
    os.waitpid(child, 0)
    os.sched_setaffinity(0, allowed)
    return dt / trips * 1e6


def main():
    trips = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    free = measure(trips)
    pinned = measure(trips, cpu=0)
    print(f"loopback TCP round trip, {trips} trips: any CPU {free:.1f} us, both on CPU 0 {pinned:.1f} us")


if __name__ == "__main__":
    main()
