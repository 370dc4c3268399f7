#!/usr/bin/env python3
"""Writes the fuzz seed corpora under fuzz/corpus/ from real traffic and
real files: the QMP commands a client sends to vubd, the bytes stock NBD
clients (qemu-io, qemu-img, nbdinfo, nbdcopy) send to vubd's NBD server
(recorded by a proxy in between), and the bitmap and mirror sidecars vubd
writes. The virtio-blk seeds are requests of each type as a driver lays
them out.

Usage: fuzz/seeds/capture.py VUBD_BIN   (run from the repository root)
"""

import faulthandler
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

VUBD = sys.argv[1]
CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")
DISK = 64 << 20


def save(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def wait_for(path):
    for _ in range(200):
        if os.path.exists(path):
            return
        time.sleep(0.05)
    raise RuntimeError("no " + path)


class Qmp:
    """A QMP client that keeps every byte it sends."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rb")
        self.sent = b""
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, command, **args):
        msg = {"execute": command}
        if args:
            msg["arguments"] = args
        data = json.dumps(msg).encode() + b"\n"
        self.sent += data
        self.s.sendall(data)
        while True:
            reply = json.loads(self.f.readline())
            if "error" in reply:
                print(command, reply, flush=True)
            if "event" not in reply:
                return reply


def proxy(listen_path, server_path, streams):
    """Forwards NBD connections, recording what each client sends."""
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(listen_path)
    ls.listen(8)

    def pump(a, b, record):
        while True:
            try:
                data = a.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    b.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if record is not None:
                record.append(data)
            b.sendall(data)

    def serve():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            s = socket.socket(socket.AF_UNIX)
            s.connect(server_path)
            record = []
            streams.append(record)
            threading.Thread(target=pump, args=(c, s, record), daemon=True).start()
            threading.Thread(target=pump, args=(s, c, None), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return ls


def transmission_part(stream):
    """The requests after the option haggling (GO, or EXPORT_NAME)."""
    i = 4
    while i + 16 <= len(stream):
        opt, length = struct.unpack(">II", stream[i + 8 : i + 16])
        i += 16 + length
        if opt in (1, 7):
            return stream[i:]
    return None


def nbd_seeds(tmp, vubd_nbd):
    streams = []
    px = os.path.join(tmp, "proxy.sock")
    ls = proxy(px, vubd_nbd, streams)
    uri = "nbd+unix:///disk0?socket=" + px
    runs = [
        ("qemu-io-rw", ["qemu-io", "-f", "raw", uri, "-c", "write -P 0x55 0 16k",
                        "-c", "write -z 1M 64k", "-c", "discard 2M 64k",
                        "-c", "read -P 0x55 0 16k", "-c", "flush"]),
        ("qemu-img-map", ["qemu-img", "map", "--output=json", "-f", "raw", uri]),
        ("qemu-img-bitmap", ["qemu-img", "map", "--output=json", "--image-opts",
                             "driver=nbd,export=disk0,server.type=unix,server.path=" + px
                             + ",x-dirty-bitmap=qemu:dirty-bitmap:b0"]),
        ("nbdinfo-map", ["nbdinfo", "--map", uri]),
        ("nbdinfo-list", ["nbdinfo", "--list", "nbd+unix://?socket=" + px]),
        ("nbdinfo-depth", ["nbdinfo", "--map=qemu:allocation-depth", uri]),
        ("nbdcopy-in", ["nbdcopy", "--synchronous", "--request-size=65536",
                        os.path.join(tmp, "small.raw"), uri]),
    ]
    with open(os.path.join(tmp, "small.raw"), "wb") as f:
        f.write(b"\x33" * 8192 + b"\0" * 65536 + b"\x44" * 4096)
        f.truncate(DISK)
    for name, cmd in runs:
        before = len(streams)
        print(name, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=30)
        time.sleep(0.3)
        for k, rec in enumerate(streams[before:]):
            data = b"".join(rec)
            save("nbd_handshake", f"{name}-{k}", data)
            t = transmission_part(data)
            if t:
                # Structured replies and every metadata context.
                save("nbd_transmission", f"{name}-{k}", b"\x0f" + t)
    ls.close()


def main():
    faulthandler.dump_traceback_later(90, exit=True)
    tmp = tempfile.mkdtemp(prefix="vubd-seeds-", dir="/dev/shm")
    d = None
    try:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(DISK)
        qmp_path = os.path.join(tmp, "qmp.sock")
        nbd_path = os.path.join(tmp, "nbd.sock")
        args = [VUBD, "--socket", os.path.join(tmp, "vhost.sock"), "--image", image,
                "--qmp", qmp_path, "--bitmap-flush-interval", "3600"]
        d = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(qmp_path)
        q = Qmp(qmp_path)
        q.cmd("query-block")
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b0", persistent=True)
        q.cmd("block-dirty-bitmap-add", node="disk0", name="b1", granularity=4096,
              persistent=True, disabled=True)
        q.cmd("block-dirty-bitmap-add", node="disk0", name="tmp")
        q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd_path}})
        q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "disk0"},
              name="disk0", writable=True, bitmaps=["b0"], **{"allocation-depth": True})
        nbd_seeds(tmp, nbd_path)
        q.cmd("x-debug-block-dirty-bitmap-sha256", node="disk0", name="b0")
        q.cmd("query-named-block-nodes", flat=True)
        q.cmd("block-export-del", id="e0")
        q.cmd("nbd-server-stop")
        q.cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b2",
                                                       "persistent": True}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": "disk0", "target": "b1",
                                                         "bitmaps": ["b0"]}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "disk0", "name": "tmp"}}])
        q.cmd("block-dirty-bitmap-disable", node="disk0", name="b2")
        q.cmd("block-dirty-bitmap-enable", node="disk0", name="b2")
        q.cmd("block-dirty-bitmap-remove", node="disk0", name="tmp")
        # A mirror slow enough to be under way when the daemon is killed.
        target = os.path.join(tmp, "target.img")
        q.cmd("drive-mirror", device="disk0", target=target, sync="full",
              format="raw", mode="absolute-paths", speed=65536, **{"job-id": "m0"})
        q.cmd("query-block-jobs")
        time.sleep(0.5)
        with open(image + ".vubd-mirror", "rb") as f:
            save("mirror_state", "running", b"\x00" + f.read())
        q.cmd("block-job-set-speed", device="m0", speed=0)
        q.cmd("block-job-cancel", device="m0", force=True)
        save("qmp_dispatch", "session", q.sent)
        save("qmp_json", "session", b"\x00" + q.sent)
        # Unclean stop: the sidecar with its activity log.
        d.send_signal(signal.SIGKILL)
        d.wait()
        with open(image + ".vubd-bitmaps", "rb") as f:
            save("bitmap_sidecar", "killed", f.read())
        # Clean stop (quit) after the recovery.
        os.unlink(qmp_path)
        os.unlink(os.path.join(tmp, "vhost.sock"))
        d = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(qmp_path)
        q = Qmp(qmp_path)
        q.cmd("quit")
        d.wait()
        with open(image + ".vubd-bitmaps", "rb") as f:
            save("bitmap_sidecar", "clean", f.read())
    finally:
        if d is not None and d.poll() is None:
            d.kill()
            d.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
