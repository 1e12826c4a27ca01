"""Protocol operations, each against the agent over a unix socket and against a real microVM:
exec (collect), spawn (streaming), stdin, signals, timeouts, tty, file transfer."""
from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import pytest

from supermachine_kernel import api


def test_echo(vm):
    r = vm.exec(["echo", "hello", "world"])
    assert r.stdout == b"hello world\n"
    assert r.stderr == b""
    assert r.exit_code == 0
    assert not r.timed_out
    assert r.peak_rss_kib > 0


def test_exit_codes_and_stderr(vm):
    r = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 42"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 42)
    assert vm.exec(["false"]).exit_code == 1


def test_missing_program_is_a_guest_error(vm):
    with pytest.raises(api.GuestError) as ei:
        vm.exec(["/no/such/program"])
    assert ei.value.kind == "not_found"


def test_env_and_cwd(vm):
    r = vm.exec(["sh", "-c", 'echo "$GREETING"; pwd'], env={"GREETING": "hi there"}, cwd="/tmp")
    assert r.stdout == b"hi there\n/tmp\n"


def test_user_runs_the_process_as_that_user(vm):
    """`user` as an OCI config's User: a name from /etc/passwd (its gid and home), or
    uid[:gid] (a uid without an entry gets gid 0 and HOME=/)."""
    if os.geteuid() != 0:
        pytest.skip("the unix-socket agent runs as this user: it cannot change to another")
    script = 'echo "$(id -u) $(id -g) $HOME $(pwd)"'
    assert vm.exec(["sh", "-c", script], user="nobody", cwd="/").stdout == b"65534 65534 /nonexistent /\n"
    assert vm.exec(["sh", "-c", script], user="4321:7", cwd="/").stdout == b"4321 7 / /\n"
    assert vm.exec(["sh", "-c", script], user="4321", cwd="/").stdout == b"4321 0 / /\n"
    assert vm.exec(["id", "-G"], user="nobody").stdout == b"65534\n", "root's groups are dropped"
    with pytest.raises(api.GuestError) as ei:
        vm.exec(["true"], user="no-such-user")
    assert ei.value.kind == "not_found" and "/etc/passwd" in str(ei.value)
    assert vm.exec(["id", "-u"]).stdout == b"0\n", "without user: root"


def test_stage_files(vm):
    r = vm.exec(["cat", "/tmp/staged.txt"], stage_files={"/tmp/staged.txt": b"staged!"})
    assert r.stdout == b"staged!"


def test_stdin_round_trip(vm):
    payload = os.urandom(3 * 1024 * 1024)  # several stdin windows
    r = vm.exec(["sha256sum"], stdin=payload)
    assert r.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()


def test_process_exiting_before_reading_its_stdin(vm):
    # The agent acks stdin it had to drop, possibly after the host forgot the process: the
    # connection must survive that.
    for _ in range(3):
        r = vm.exec(["head", "-c", "1"], stdin=b"x" * (5 * 1024 * 1024))
        assert (r.exit_code, r.stdout) == (0, b"x")
    assert vm.exec(["true"]).exit_code == 0


def read_until(child, needle: bytes, timeout: float = 60) -> bytes:
    out = b""
    while needle not in out:
        chunk = child.read_stdout(timeout=timeout)
        assert chunk, f"EOF before {needle!r}; got {out!r}"
        out += chunk
    return out


def test_spawn_interactive_stdin(vm):
    child = vm.spawn(["python3", "-u", "-c", "import sys\nfor l in sys.stdin: print(l.strip().upper())"])
    assert child.id > 0 and child.os_pid > 0
    for word in [b"alpha", b"beta"]:
        child.write_stdin(word + b"\n")
        assert read_until(child, b"\n") == word.upper() + b"\n"
    with pytest.raises(TimeoutError):
        child.read_stdout(timeout=0.2)
    assert child.poll() is None
    child.close_stdin()
    assert child.read_stdout(timeout=60) == b""
    st = child.wait(timeout=60)
    assert st.exit_code == 0 and st.signal is None and not st.timed_out
    assert child.poll() == st
    with pytest.raises(BrokenPipeError):
        child.write_stdin(b"too late")


def test_stream_10mb(vm):
    size = 10 * 1024 * 1024
    child = vm.spawn(["head", "-c", str(size), "/dev/urandom"])
    h = hashlib.sha256()
    got = 0
    while True:
        chunk = child.read_stdout(65536, timeout=120)
        if not chunk:
            break
        got += len(chunk)
        h.update(chunk)
    assert got == size
    assert child.wait(timeout=60).exit_code == 0


def test_slow_consumer_is_bounded_by_the_window(vm):
    # The guest can only run ahead of the host by the output window; the rest waits in the guest.
    child = vm.spawn(["head", "-c", str(12 * 1024 * 1024), "/dev/zero"])
    with pytest.raises(TimeoutError):
        child.wait(timeout=3)  # blocked on its window: cannot finish until we read
    total = 0
    while chunk := child.read_stdout(1 << 20, timeout=60):
        total += len(chunk)
    assert total == 12 * 1024 * 1024
    assert child.wait(timeout=60).exit_code == 0


def test_sigint_stops_a_busy_loop(vm):
    child = vm.spawn(["python3", "-c", "import sys; print('go', flush=True)\nwhile True: pass"])
    assert read_until(child, b"\n") == b"go\n"
    child.signal(signal.SIGINT)
    st = child.wait(timeout=30)
    # Python turns SIGINT into KeyboardInterrupt and exits with status 1 (or dies of SIGINT)
    assert st.exit_code != 0
    assert b"KeyboardInterrupt" in child.read_stderr(timeout=10) or st.signal == signal.SIGINT


def test_timeout_kill(vm):
    t = time.monotonic()
    r = vm.exec(["sleep", "30"], timeout_ms=500)
    assert time.monotonic() - t < 20
    assert r.exit_code == -1
    assert r.timed_out


def test_file_round_trip_64mib(vm, tmp_path):
    data = os.urandom(64 * 1024 * 1024)
    vm.write_file("/tmp/big.bin", data, mode=0o600)
    back = vm.read_file("/tmp/big.bin")
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    r = vm.exec(["sh", "-c", "stat -c %a /tmp/big.bin; sha256sum /tmp/big.bin"])
    mode, digest = r.stdout.decode().split("\n")[0], r.stdout.split()[1].decode()
    assert mode == "600"
    assert digest == hashlib.sha256(data).hexdigest()
    vm.exec(["rm", "/tmp/big.bin"])


def test_upload_download(vm, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    os.chmod(src, 0o751)
    assert vm.upload(src, "/tmp/up.bin") == src.stat().st_size
    assert vm.exec(["stat", "-c", "%a", "/tmp/up.bin"]).stdout == b"751\n"
    dst = tmp_path / "dst.bin"
    assert vm.download("/tmp/up.bin", dst) == src.stat().st_size
    assert dst.read_bytes() == src.read_bytes()


def test_write_file_str_and_missing_read(vm):
    vm.write_file("/tmp/hello.txt", "héllo")
    assert vm.read_file("/tmp/hello.txt") == "héllo".encode()
    with pytest.raises(api.GuestError) as ei:
        vm.read_file("/no/such/file")
    assert ei.value.kind == "not_found"
    with pytest.raises(api.GuestError):
        vm.write_file("/no/such/dir/file", b"x")
    # the connection survives guest-side errors
    assert vm.exec(["true"]).exit_code == 0


def test_tty_and_resize(vm):
    child = vm.spawn(["sh", "-c", "stty size; read x; stty size"], tty=(30, 100))
    assert read_until(child, b"\n").strip() == b"30 100"
    child.resize(40, 120)
    child.write_stdin(b"\n")
    read_until(child, b"40 120")
    assert child.wait(timeout=60).exit_code == 0


def test_concurrent_execs_from_threads(vm):
    results = {}

    def run(i):
        results[i] = vm.exec(["sh", "-c", f"echo {i}"]).stdout

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {i: f"{i}\n".encode() for i in range(8)}


def test_wait_timeout_then_kill(vm):
    child = vm.spawn(["sleep", "60"])
    with pytest.raises(TimeoutError):
        child.wait(timeout=0.2)
    child.signal(signal.SIGKILL)
    st = child.wait(timeout=30)
    assert st.exit_code == -1 and st.signal == signal.SIGKILL


def test_reconnect_keeps_processes_and_streams(vm):
    child = vm.spawn(["cat"])
    child.write_stdin(b"before\n")
    assert read_until(child, b"\n") == b"before\n"
    generation = vm.reconnect()
    assert generation >= 2
    child.write_stdin(b"after\n")
    assert read_until(child, b"\n") == b"after\n"
    assert any(p["id"] == child.id and p["running"] for p in vm.processes())
    child.close_stdin()
    assert child.wait(timeout=60).exit_code == 0
    assert vm.exec(["echo", "ok"]).stdout == b"ok\n"


def test_hello_signals_the_processes_that_asked_for_it(vm):
    """SUPERMACHINE_NOTIFY_HELLO=<signal>: the agent signals the process after every Hello
    (what lets a restored REPL start warming up at once)."""
    script = ("import signal, time\n"
              "got = []\n"
              "signal.signal(signal.SIGUSR1, lambda *a: got.append(1))\n"
              "print('ready', flush=True)\n"
              "while True:\n"
              "    time.sleep(0.02)\n"
              "    while got:\n"
              "        got.pop()\n"
              "        print('hello', flush=True)\n")
    asked = vm.spawn(["python3", "-c", script],
                     env={"SUPERMACHINE_NOTIFY_HELLO": str(int(signal.SIGUSR1))})
    other = vm.spawn(["python3", "-c", script])
    try:
        for child in (asked, other):
            assert read_until(child, b"ready\n").endswith(b"ready\n")
        vm.reconnect()
        assert read_until(asked, b"hello\n").endswith(b"hello\n")
        vm.reconnect()
        assert read_until(asked, b"hello\n") == b"hello\n"  # after every Hello
        with pytest.raises(TimeoutError):
            other.read_stdout(timeout=1.0)  # did not ask: not signalled
    finally:
        for child in (asked, other):
            child.signal(signal.SIGKILL)
            child.wait(timeout=30)
