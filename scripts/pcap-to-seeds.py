#!/usr/bin/env python3
"""Turns a loopback capture of plaintext peer traffic into fuzz seeds for `peer_frames`.

Each TCP connection's bytes in each direction (requests to a peer port, and the replies) are
cut at frame boundaries (40-byte header, payload length at bytes 28-31) into seeds of whole
frames of at most 8 KiB (a bigger frame is a seed of its own), at most 8 per direction and
kind of first frame. The capture comes from the peer TLS test's plaintext control run:

    RAINIO_KEEP_PCAP=/tmp/peers.pcap cargo test -p tests --test cluster_processes -- peer_traffic
    scripts/pcap-to-seeds.py /tmp/peers.pcap
"""
import os
import struct
import sys

pcap = open(sys.argv[1], "rb").read()
magic = struct.unpack("<I", pcap[:4])[0]
if magic not in (0xA1B2C3D4, 0xA1B23C4D):
    sys.exit("not a little-endian pcap file")
linktype = struct.unpack("<I", pcap[20:24])[0]
if linktype != 1:
    sys.exit(f"link type {linktype}: expected Ethernet (capture on lo)")
flows = {}
at = 24
while at + 16 <= len(pcap):
    incl = struct.unpack("<I", pcap[at + 8 : at + 12])[0]
    frame = pcap[at + 16 : at + 16 + incl]
    at += 16 + incl
    if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
        continue
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != 6:
        continue
    total = struct.unpack(">H", ip[2:4])[0]
    tcp = ip[ihl:total]
    sport, dport = struct.unpack(">HH", tcp[:4])
    payload = tcp[(tcp[12] >> 4) * 4 :]
    if payload:
        flows.setdefault((sport, dport), bytearray()).extend(payload)
out = os.path.join(os.path.dirname(__file__), "..", "fuzz", "seeds", "peer_frames")
os.makedirs(out, exist_ok=True)
seeds = {}
for (s, d), data in sorted(flows.items()):
    at, cur = 0, bytearray()
    while at + 40 <= len(data):
        n = 40 + struct.unpack(">I", data[at + 28 : at + 32])[0]
        frame = data[at : at + n]
        at += n
        if cur and len(cur) + len(frame) > 8192:
            seeds.setdefault((s < d, cur[5]), []).append(bytes(cur))
            cur = bytearray()
        cur += frame
    if cur:
        seeds.setdefault((s < d, cur[5]), []).append(bytes(cur))
n = 0
for key, group in sorted(seeds.items()):
    for seed in group[:8]:
        name = os.path.join(out, f"capture-{n:02}.bin")
        with open(name, "wb") as f:
            f.write(seed)
        n += 1
print(f"{n} seeds in {out}")
