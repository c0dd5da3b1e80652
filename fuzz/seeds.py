#!/usr/bin/env python3
"""Writes the committed seed corpus: valid requests of every shape the protocol and the
fuzz targets' routes take, escapes, deep nesting, the benches' payloads, and a few broken
lines. Run from fuzz/: python3 seeds.py (the output is committed, this documents it)."""

import base64
import json
import os
import random

random.seed(7)

record = {
    "ts": 1437300000.25,
    "level": "warning",
    "host": "web-03",
    "msg": "Zürich → 東京: user \"ada\"\tretried\nthree times",
    "ok": False,
    "latency_ms": [12, 250.5, -3, 1e21],
    "tags": ["a", "ß", "😀", ""],
    "nested": {"a": {"b": {"c": [None, True, {"d": "\\u0000"}]}}},
}
blob = base64.b64encode(bytes(random.getrandbits(8) for _ in range(3000))).decode()

lines = [
    b'{"cmdid": 10000, "timestamp": 1437300000, "params": {"content": "Hello world!"}}',
    b'{"cmdid":0}',
    b'{"cmdid":0,"id":"abc"}',
    b'{"cmdid":1}',
    b'{"cmdid":2,"params":{"token":"0123456789abcdef0123456789abcdef"}}',
    b'{"cmdid":10000,"id":7,"timeout_ms":50,"params":{"x":"0123456789"}}',
    json.dumps({"cmdid": 10000, "params": record}).encode(),
    json.dumps({"cmdid": 10000, "params": record}, ensure_ascii=False).encode(),
    json.dumps({"cmdid": 10000, "params": {"image": blob, "w": 640, "h": 480}}).encode(),
    json.dumps({"cmdid": 10001, "params": {"customer": "Ada \u00e9", "quantity": 3, "price": 9.99,
                                           "express": True, "tags": ["x", "y"],
                                           "address": {"street": "Main 1", "zip": -12},
                                           "kind": "retail"}}).encode(),
    b'{"cmdid":10001,"params":{"customer":"b","quantity":-1,"price":"x"}}',
    b'{"cmdid":10001,"params":{"customer":"\\ud83d\\ude00","quantity":4294967296,"price":1e400}}',
    b'{"cmdid":10000,"cmdid":0}',
    b'{"cmdid":2001.0}',
    b'{"cmdid":99999999999999999999}',
    b'{"cmdid":"10000"}',
    b'[1,2,3]',
    b'{"cmdid":10000,"params":' + b'[' * 200 + b']' * 200 + b'}',
    b'{"cmdid":10000,"params":{"s":"\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9"}}',
    b'not json',
    b'{"cmdid":10000,"params":{"s":"unterminated}',
    b'   ',
    b'{"cmdid":0}\r',
    b'\xff\xfe{"cmdid":0}',
]

def write(target, name, data):
    os.makedirs(f"seeds/{target}", exist_ok=True)
    with open(f"seeds/{target}/{name}", "wb") as f:
        f.write(data)

for i, line in enumerate(lines):
    write("params", f"line-{i:02}", line)
    # pipeline: four control bytes (output limit, flags, two generator seeds), then bytes.
    write("pipeline", f"one-{i:02}", bytes([i * 11 % 256, i % 2, i, 255 - i]) + line + b"\n")
write("pipeline", "all-pipelined", bytes([4, 1, 9, 9]) + b"\n".join(lines) + b"\n")
write("pipeline", "seed-x16", bytes([255, 0, 1, 2]) + (lines[0] + b"\n") * 16)
write("pipeline", "too-long", bytes([64, 0, 3, 4]) + b'{"cmdid":0}\n' + b"x" * 600 + b"\n" + b'{"cmdid":0}\n')
