#!/usr/bin/env python3
"""vubd's QMP monitor driven by QEMU's own Python client library.

PyPI `qemu.qmp` is the library QEMU's iotests, avocado tests and many
management tools use: its asyncio `QMPClient`, its synchronous
`legacy.QEMUMonitorProtocol`, and the `qmp-shell` front end. If vubd
speaks QMP the way QEMU does, all three work unchanged; that is what this
suite checks, against a real vubd process per test.

Run: VUBD_BIN=target/release/vubd python3 tests/python/test_qmp.py [-v]
(the Rust test `qemu_qmp_python_client` in tests/tests/qmp.rs runs it). A
missing `qemu.qmp` is an ImportError, a failure: never a silent skip.
"""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 15


def vubd_binary() -> str:
    """VUBD_BIN, else the newest vubd built in this workspace."""
    env = os.environ.get("VUBD_BIN")
    if env:
        return env
    builds = [ROOT / "target" / p / "vubd" for p in ("release", "debug")]
    builds = [b for b in builds if b.exists()]
    if not builds:
        raise RuntimeError("no vubd binary: build it or set VUBD_BIN")
    return str(max(builds, key=lambda b: b.stat().st_mtime))


class Vubd:
    """A vubd process with a QMP socket, on a fresh sparse image."""

    def __init__(self, size=64 << 20, extra=()):
        self.dir = tempfile.mkdtemp(prefix="vubd-pyqmp-")
        self.image = os.path.join(self.dir, "disk.img")
        with open(self.image, "wb") as f:
            f.truncate(size)
        self.qmp = os.path.join(self.dir, "qmp.sock")
        self.proc = subprocess.Popen(
            [vubd_binary(), "--socket", os.path.join(self.dir, "vhost.sock"),
             "--image", self.image, "--qmp", self.qmp, *extra],
            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(self.qmp):
            if self.proc.poll() is not None:
                raise RuntimeError(f"vubd exited: {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("vubd's QMP socket never appeared")
            time.sleep(0.01)

    def wait_exit(self) -> int:
        return self.proc.wait(timeout=TIMEOUT)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class AsyncClientTest(unittest.IsolatedAsyncioTestCase):
    """The asyncio QMPClient: connect, negotiate, commands, errors, events."""

    def setUp(self):
        self.vubd = Vubd(extra=("--node-name", "pydisk"))

    def tearDown(self):
        self.vubd.close()

    async def client(self, name="test") -> QMPClient:
        qmp = QMPClient(name)
        await asyncio.wait_for(qmp.connect(self.vubd.qmp), TIMEOUT)
        return qmp

    async def test_greeting_and_queries(self):
        qmp = await self.client()
        try:
            greeting = qmp.greeting
            self.assertIsNotNone(greeting)
            self.assertEqual(list(greeting.QMP.capabilities), [])
            version = await qmp.execute("query-version")
            self.assertEqual(dict(greeting.QMP.version), version)
            self.assertEqual(version["qemu"], {"major": 7, "minor": 2, "micro": 0})
            self.assertTrue(version["package"].startswith("vubd "))
            names = {c["name"] for c in await qmp.execute("query-commands")}
            self.assertTrue({"query-block", "quit", "block-dirty-bitmap-add",
                             "x-debug-block-dirty-bitmap-sha256"} <= names, names)
            blocks = await qmp.execute("query-block")
            self.assertEqual(len(blocks), 1)
            inserted = blocks[0]["inserted"]
            self.assertEqual(inserted["node-name"], "pydisk")
            self.assertEqual(inserted["image"]["virtual-size"], 64 << 20)
            self.assertEqual(inserted["image"]["filename"], self.vubd.image)
            self.assertEqual(inserted["drv"], "raw")
        finally:
            await qmp.disconnect()

    async def test_errors_keep_the_connection(self):
        qmp = await self.client()
        try:
            with self.assertRaises(ExecuteError) as cm:
                await qmp.execute("no-such-command")
            self.assertEqual(cm.exception.error_class, "CommandNotFound")
            self.assertEqual(str(cm.exception),
                             "The command no-such-command has not been found")
            with self.assertRaises(ExecuteError) as cm:
                await qmp.execute("block-dirty-bitmap-add", {"node": "pydisk"})
            self.assertEqual(cm.exception.error_class, "GenericError")
            self.assertEqual(str(cm.exception), "Parameter 'name' is missing")
            with self.assertRaises(ExecuteError) as cm:
                await qmp.execute("block-dirty-bitmap-add",
                                  {"node": "nope", "name": "b"})
            self.assertEqual(str(cm.exception),
                             "Cannot find device='nope' nor node-name='nope'")
            with self.assertRaises(ExecuteError) as cm:
                await qmp.execute("query-block", {"bogus": 1})
            self.assertEqual(str(cm.exception), "Parameter 'bogus' is unexpected")
            # Still connected, still answering.
            self.assertIn("qemu", await qmp.execute("query-version"))
        finally:
            await qmp.disconnect()

    async def test_bitmap_commands(self):
        qmp = await self.client()
        try:
            await qmp.execute("block-dirty-bitmap-add",
                              {"node": "pydisk", "name": "b0", "granularity": 4096})
            await qmp.execute("block-dirty-bitmap-add",
                              {"node": "pydisk", "name": "b1", "disabled": True})
            bitmaps = (await qmp.execute("query-block"))[0]["inserted"]["dirty-bitmaps"]
            by_name = {b["name"]: b for b in bitmaps}
            self.assertEqual(by_name["b0"]["granularity"], 4096)
            self.assertTrue(by_name["b0"]["recording"])
            self.assertFalse(by_name["b1"]["recording"])
            self.assertEqual(by_name["b0"]["count"], 0)
            await qmp.execute("block-dirty-bitmap-merge",
                              {"node": "pydisk", "target": "b1",
                               "bitmaps": ["b0", {"node": "pydisk", "name": "b0"}]})
            sha = await qmp.execute("x-debug-block-dirty-bitmap-sha256",
                                    {"node": "pydisk", "name": "b1"})
            self.assertRegex(sha["sha256"], r"^[0-9a-f]{64}$")
            with self.assertRaises(ExecuteError) as cm:
                await qmp.execute("block-dirty-bitmap-add",
                                  {"node": "pydisk", "name": "b0"})
            self.assertEqual(str(cm.exception), "Bitmap already exists: b0")
            for cmd in ("block-dirty-bitmap-disable", "block-dirty-bitmap-enable",
                        "block-dirty-bitmap-clear", "block-dirty-bitmap-remove"):
                await qmp.execute(cmd, {"node": "pydisk", "name": "b0"})
            with self.assertRaises(ExecuteError) as cm:
                await qmp.execute("block-dirty-bitmap-remove",
                                  {"node": "pydisk", "name": "b0"})
            self.assertEqual(str(cm.exception), "Dirty bitmap 'b0' not found")
        finally:
            await qmp.disconnect()

    async def test_transaction(self):
        """QEMU's checkpoint step: disable the old bitmap and add the new one
        at one instant; a failing action rolls back the others."""
        qmp = await self.client()
        node = "pydisk"

        def act(kind, **data):
            return {"type": kind, "data": {"node": node, **data}}

        try:
            await qmp.execute("block-dirty-bitmap-add", {"node": node, "name": "b0"})
            with self.assertRaises(ExecuteError) as cm:
                await qmp.execute("transaction", {"actions": [
                    act("block-dirty-bitmap-disable", name="b0"),
                    act("block-dirty-bitmap-add", name="b1"),
                    {"type": "abort", "data": {}}]})
            self.assertEqual(str(cm.exception), "Transaction aborted using Abort action")
            with self.assertRaises(ExecuteError) as cm:
                await qmp.execute("transaction", {
                    "actions": [act("block-dirty-bitmap-add", name="b1")],
                    "properties": {"completion-mode": "grouped"}})
            self.assertEqual(
                str(cm.exception),
                "Action 'block-dirty-bitmap-add' does not support Transaction "
                "property completion-mode = grouped")
            bitmaps = (await qmp.execute("query-block"))[0]["inserted"]["dirty-bitmaps"]
            self.assertEqual([(b["name"], b["recording"]) for b in bitmaps], [("b0", True)])
            self.assertEqual(await qmp.execute("transaction", {"actions": [
                act("block-dirty-bitmap-disable", name="b0"),
                act("block-dirty-bitmap-add", name="b1")]}), {})
            bitmaps = (await qmp.execute("query-block"))[0]["inserted"]["dirty-bitmaps"]
            self.assertEqual([(b["name"], b["recording"]) for b in bitmaps],
                             [("b1", True), ("b0", False)])
        finally:
            await qmp.disconnect()

    async def test_quit_sends_shutdown_to_every_client(self):
        first = await self.client("first")
        second = await self.client("second")
        with first.listener(("SHUTDOWN",)) as l1, second.listener(("SHUTDOWN",)) as l2:
            self.assertEqual(await first.execute("quit"), {})
            for listener in (l1, l2):
                event = await asyncio.wait_for(listener.get(), TIMEOUT)
                self.assertEqual(event["event"], "SHUTDOWN")
                self.assertEqual(event["data"], {"guest": False, "reason": "host-qmp-quit"})
                self.assertIn("seconds", event["timestamp"])
                self.assertIn("microseconds", event["timestamp"])
        # vubd closes the connections as it exits; qemu.qmp reports that
        # as EOFError from disconnect(), exactly as with QEMU after quit
        # (QEMU's own python/qemu/machine ignores it the same way).
        for qmp in (first, second):
            try:
                await qmp.disconnect()
            except EOFError:
                pass
        self.assertEqual(self.vubd.wait_exit(), 0)


class LegacyClientTest(unittest.TestCase):
    """The synchronous QEMUMonitorProtocol that QEMU's iotests use."""

    def setUp(self):
        self.vubd = Vubd()

    def tearDown(self):
        self.vubd.close()

    def test_cmd_and_events(self):
        mon = QEMUMonitorProtocol(self.vubd.qmp)
        greeting = mon.connect()
        self.assertIn("QMP", greeting)
        self.assertEqual(mon.cmd("query-version")["qemu"]["minor"], 2)
        reply = mon.cmd_obj({"execute": "query-block", "id": "x-1"})
        self.assertEqual(reply["id"], "x-1")
        self.assertEqual(reply["return"][0]["device"], "disk0")
        reply = mon.cmd_raw("query-block", {"bogus": True})
        self.assertEqual(reply["error"]["desc"], "Parameter 'bogus' is unexpected")
        self.assertEqual(mon.cmd("quit"), {})
        event = mon.pull_event(wait=float(TIMEOUT))
        self.assertEqual(event["event"], "SHUTDOWN")
        # After quit the daemon exits and closes the socket, as QEMU does;
        # the client may see that end of file while closing (QEMU's own
        # machine.py tolerates it the same way).
        try:
            mon.close()
        except EOFError:
            pass
        self.assertEqual(self.vubd.wait_exit(), 0)


class QmpShellTest(unittest.TestCase):
    """qmp-shell, fed commands on standard input (non-interactive)."""

    def setUp(self):
        self.vubd = Vubd()

    def tearDown(self):
        self.vubd.close()

    def test_piped_commands(self):
        # qmp-shell is installed with qemu.qmp; run it through this Python so
        # that the same installation is used.
        script = (
            "query-version\n"
            "block-dirty-bitmap-add node=disk0 name=sh granularity=65536\n"
            "query-block\n"
            "no-such-command\n"
            "block-dirty-bitmap-add node=disk0\n"
        )
        # No `quit` at the end: the daemon would close the connection while
        # qmp-shell closes its own, and qemu.qmp then raises EOFError from
        # close(), with QEMU as with vubd. `quit` is covered above.
        out = subprocess.run(
            [sys.executable, "-m", "qemu.qmp.qmp_shell", self.vubd.qmp],
            input=script, capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("Connected to QEMU 7.2.0", out.stdout)
        replies = []
        for chunk in out.stdout.split("(QEMU) "):
            line = chunk.strip()
            if line.startswith("{"):
                replies.append(json.loads(line))
        self.assertEqual(len(replies), 5, out.stdout)
        self.assertTrue(replies[0]["return"]["package"].startswith("vubd "))
        self.assertEqual(replies[1], {"return": {}})
        names = [b["name"] for b in replies[2]["return"][0]["inserted"]["dirty-bitmaps"]]
        self.assertEqual(names, ["sh"])
        self.assertEqual(replies[3]["error"]["class"], "CommandNotFound")
        self.assertEqual(replies[4]["error"]["desc"], "Parameter 'name' is missing")
        self.assertIsNone(self.vubd.proc.poll(), "vubd exited when qmp-shell left")


if __name__ == "__main__":
    unittest.main()
