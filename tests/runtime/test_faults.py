"""Bad input and faults: hostile guests, dying guests, dying owners, missing pieces.
Every failure must be a typed error with a useful message; nothing may hang."""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from supermachine_kernel import api

from .conftest import UnixAgent
from .helpers import pid_alive, wait_until

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- a fake guest speaking garbage


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return b"SM" + bytes([kind, 0]) + struct.pack("<II", channel, len(payload)) + payload


def control(msg: dict) -> bytes:
    return frame(1, 0, json.dumps(msg).encode())


WELCOME = control({"op": "welcome", "version": 1, "boot_id": "fake", "generation": 1, "processes": []})


def read_frame(conn: socket.socket) -> tuple:
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    hdr = exact(12)
    kind, channel, length = hdr[2], *struct.unpack("<II", hdr[4:12])
    return kind, channel, exact(length)


class FakeGuest:
    """A unix socket server that plays a guest agent running `script(conn)`."""

    def __init__(self, script) -> None:
        self.dir = tempfile.mkdtemp(prefix="sm-fake-")
        self.path = os.path.join(self.dir, "agent.sock")
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(1)
        self.thread = threading.Thread(target=self._serve, args=(script,), daemon=True)
        self.thread.start()

    def _serve(self, script) -> None:
        conn, _ = self.srv.accept()
        try:
            script(conn)
            time.sleep(5)  # keep the socket open: the host must drop it by itself
        except (EOFError, OSError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.srv.close()


def welcome_then(payload_fn):
    def script(conn):
        read_frame(conn)  # hello
        conn.sendall(WELCOME)
        read_frame(conn)  # the host's first request
        conn.sendall(payload_fn())

    return script


@pytest.mark.parametrize(
    "payload, needle",
    [
        (lambda: b"\x00garbage that is not a frame", "magic"),
        (lambda: bytes(range(256)) * 8, "malformed"),
        (lambda: b"SM\x03\x00" + struct.pack("<II", 1, 1 << 30), "oversized"),
        (lambda: b"SM\x63\x00" + struct.pack("<II", 0, 0), "unknown frame kind"),
        (lambda: frame(1, 0, b"{not json"), "malformed control message"),
        (lambda: control({"op": "pong", "req": 12345}), "unsolicited"),
        (lambda: frame(3, 999, b"output for nobody"), "unknown process"),
    ],
    ids=["bad-magic", "random", "oversized", "unknown-kind", "bad-json", "unsolicited", "stray-output"],
)
def test_fake_guest_garbage_drops_the_connection(payload, needle):
    g = FakeGuest(welcome_then(payload))
    try:
        vm = api.Vm.attach_unix(g.path, timeout=5)
        t = time.monotonic()
        with pytest.raises(api.ProtocolError) as ei:
            vm.ping(timeout=10)
        assert time.monotonic() - t < 5
        assert needle in str(ei.value)
        # every later call fails the same way, at once
        with pytest.raises(api.ProtocolError):
            vm.exec(["true"])
        vm.release()
    finally:
        g.close()


def test_fake_guest_window_violation():
    def script(conn):
        read_frame(conn)
        conn.sendall(WELCOME)
        _, _, payload = read_frame(conn)  # spawn
        req = json.loads(payload)["req"]
        conn.sendall(control({"op": "spawned", "req": req, "id": 1, "os_pid": 10}))
        chunk = frame(3, 1, b"x" * 65536)
        for _ in range(4 * 16 + 1):  # one chunk past the 4 MiB window
            conn.sendall(chunk)

    g = FakeGuest(script)
    try:
        vm = api.Vm.attach_unix(g.path, timeout=5)
        child = vm.spawn(["flood"])
        with pytest.raises(api.ProtocolError) as ei:
            child.wait(timeout=10)
        assert "flow-control" in str(ei.value)
        vm.release()
    finally:
        g.close()


def test_fake_guest_garbage_instead_of_welcome():
    def script(conn):
        read_frame(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")

    g = FakeGuest(script)
    try:
        with pytest.raises(api.ProtocolError, match="magic"):
            api.Vm.attach_unix(g.path, timeout=5)
    finally:
        g.close()


def test_silent_guest_times_out_the_handshake():
    g = FakeGuest(lambda conn: read_frame(conn))
    try:
        t = time.monotonic()
        with pytest.raises(TimeoutError):
            api.Vm.attach_unix(g.path, timeout=1)
        assert time.monotonic() - t < 5
    finally:
        g.close()


# ---------------------------------------------------------------- release and death


def test_release_wakes_waiters():
    agent = UnixAgent()
    try:
        vm = agent.attach()
        child = vm.spawn(["sleep", "60"])
        errors = []

        def waiter():
            try:
                child.wait()
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.3)
        vm.release()
        t.join(10)
        assert not t.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], api.VmReleasedError)
        vm.release()  # idempotent
        with pytest.raises(api.VmReleasedError):
            vm.exec(["true"])
    finally:
        agent.stop()


def test_agent_death_fails_waiting_calls():
    agent = UnixAgent()
    try:
        vm = agent.attach()
        child = vm.spawn(["sleep", "60"])
        threading.Timer(0.3, agent.proc.kill).start()
        with pytest.raises(api.VmDiedError):
            child.wait(timeout=20)
        with pytest.raises(api.VmDiedError):
            vm.exec(["true"])
        assert not vm.alive
    finally:
        agent.stop()


@pytest.mark.vm
def test_guest_panic_mid_exec(fresh_vm):
    child = fresh_vm.spawn(["sleep", "600"])
    result = {}

    def waiter():
        try:
            child.wait()
        except Exception as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=waiter)
    t.start()
    with pytest.raises(api.VmDiedError) as ei:
        fresh_vm.exec(["sh", "-c", "echo c > /proc/sysrq-trigger"])
    t.join(30)
    assert not t.is_alive(), "a waiting call hung after the guest died"
    assert isinstance(result.get("error"), api.VmDiedError)
    msg = str(ei.value)
    assert "QEMU exited" in msg, msg
    assert "sysrq" in msg.lower() or "Kernel panic" in msg, msg
    assert wait_until(lambda: not pid_alive(fresh_vm.qemu_pid), 10)


@pytest.mark.vm
def test_qemu_killed_from_outside(fresh_vm):
    child = fresh_vm.spawn(["sleep", "600"])
    os.kill(fresh_vm.qemu_pid, signal.SIGKILL)
    with pytest.raises(api.VmDiedError) as ei:
        child.wait(timeout=30)
    assert "killed by signal 9" in str(ei.value)
    assert not fresh_vm.alive


# ---------------------------------------------------------------- the owner dies

OWNER_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from supermachine_kernel import api

    box = {}
    # boot from a thread that then exits: the VM must survive its spawning thread
    t = threading.Thread(target=lambda: box.update(vm=api.Image.build(progress=False).boot()))
    t.start(); t.join()
    vm = box["vm"]
    assert vm.exec(["true"]).exit_code == 0
    print(vm.qemu_pid, vm.workdir, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.vm
def test_killing_the_owner_leaves_no_qemu(image):
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline()
        assert line, "the owner process failed to boot a VM"
        pid_s, workdir = line.split()
        qemu_pid = int(pid_s)
        assert pid_alive(qemu_pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert wait_until(lambda: not pid_alive(qemu_pid), 10), f"QEMU {qemu_pid} outlived its owner"
    finally:
        if owner.poll() is None:
            owner.kill()
    # the orphaned work dir (guest RAM!) is swept by the next VM of this user
    image.boot().release()
    assert not os.path.exists(workdir)


# ---------------------------------------------------------------- missing pieces


def test_missing_qemu_is_a_clear_error(image, monkeypatch):
    monkeypatch.setenv("SUPERMACHINE_QEMU", "/nonexistent/qemu-system-x86_64")
    for boot in (image.cold_boot, image.boot):  # cold boot and snapshot restore
        with pytest.raises(api.QemuNotFoundError) as ei:
            boot()
        msg = str(ei.value)
        assert msg.startswith("QEMU not found")
        assert "apt-get install qemu-system-x86" in msg


def test_unknown_image_name_is_a_clear_error():
    with pytest.raises(api.ImageError) as ei:
        api.Image.build("no-such-image-7f3a", progress=False)
    assert "no-such-image-7f3a" in str(ei.value)
    assert "known images" in str(ei.value)


def test_missing_image_files_are_a_clear_error(image):
    broken = api.Image(
        name="broken", hash="0", kernel="/nonexistent/vmlinuz", initrd=image.initrd, rootfs=image.rootfs
    )
    with pytest.raises(api.ImageNotFoundError, match="does not exist"):
        broken.boot()


def host_has_hw_virt() -> bool:
    flags = Path("/proc/cpuinfo").read_text()
    return " vmx" in flags or " svm" in flags


@pytest.mark.skipif(host_has_hw_virt(), reason="this host has vmx/svm: forcing kvm may work here")
def test_forcing_kvm_without_hw_virt_is_a_clear_error(image, monkeypatch):
    monkeypatch.setenv("SUPERMACHINE_ACCEL", "kvm")
    with pytest.raises(api.AcceleratorError, match="vmx/svm"):
        image.boot()


def test_bad_accel_value(image, monkeypatch):
    monkeypatch.setenv("SUPERMACHINE_ACCEL", "warp-drive")
    with pytest.raises(api.AcceleratorError, match="kvm, tcg or auto"):
        image.boot()
