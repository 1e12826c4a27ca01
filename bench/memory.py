"""Memory investigation: host Pss per idle VM restored from one template snapshot (raw QEMU + QMP).

Independent of the runtime: it builds the same QEMU command line as core/runtime/src/qemu.rs
(microvm, guest RAM in a memory-backend-file under /dev/shm, TCG), bakes a template the way
DESIGN.md §4 describes (share=on, stop, x-ignore-shared, migrate to `exec:cat > state`),
restores N clones (share=off, -incoming defer, migrate-incoming), says Hello to each clone's
agent, runs a first exec, lets the guests idle, then reads /proc/PID/smaps_rollup and breaks
/proc/PID/smaps down by mapping (guest RAM, TCG code buffer, anonymous heap, libraries, ...).

Each *variant* is a set of QEMU/host options (see VARIANTS); variants that change guest state
(memory size, CPU model, kernel command line) get their own template.

Run: .venv/bin/python bench/memory.py [--variants base,tb16,nokernel+nothp+tb64,...]
     [--counts 1,4,8] [--idle 5] [--first-exec true|none|python] [--loop] [--detail] [--json F]
     .venv/bin/python bench/memory.py --perf 3 --variants base,nokernel+nothp+tb64
       (restore stages + python/numpy/loop timings and TCG code size, variants interleaved)
A variant spec joins named option sets with "+" (see variants()).

Findings (QEMU 7.2 Debian, TCG, 256 MiB guest, 8 clones of one template, idle after `true`):
  the runtime's command line: ~52 MiB Pss/VM = TCG code buffer 16 (translated code, rounded
  up by THP) + vmlinuz copy 13.5 (read into QEMU's heap for fw_cfg even on restore) + other
  anon 7 (TB hash table, softmmu TLBs, a THP-rounded arena) + heap 4.9 + QEMU/libs 6.5
  (private relocations ~4.6) + guest RAM 4.6 (1.9 private COW + shared template pages / N).
  Restore without -kernel/-initrd/-append (-13.5 MiB) and PR_SET_THP_DISABLE in the launcher
  (-3 MiB): ~36 MiB after a first exec, ~24 MiB for a clone that has only said Hello. The TCG
  code a guest translates (5 MiB by Welcome, 15 after `true`, 33 after `python3 -c pass`, 55
  after `import numpy`) is the floor under TCG: tb-size below the working set thrashes
  (tb-size 16: `import numpy` 3x slower, tb 8/4/2: even `true` 2-5x slower); tb-size=64 caps
  growth at no measured cost. -m, -cpu, -msg, -sandbox, -overcommit, malloc tunables and the
  guest cmdline changed nothing measurable.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(__file__))
from common import median, percentile  # noqa: E402

MIB = 1024 * 1024
PR_SET_PDEATHSIG = 1
PR_SET_THP_DISABLE = 41
_libc = ctypes.CDLL(None, use_errno=True)

# ---------------------------------------------------------------------------------------------
# guest files


def guest_files(image: Optional[str] = None) -> dict:
    """kernel / initrd / rootfs of a cached image, via the project's own image cache."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from supermachine_kernel import _core  # noqa: WPS433

    return _core.ensure_image(image, None, None, None, False)


def host_tsc_khz() -> Optional[int]:
    try:
        return int(open("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read().strip())
    except (OSError, ValueError):
        pass
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            return round(float(line.split(":")[1]) * 1000)
    return None


# ---------------------------------------------------------------------------------------------
# options


@dataclass
class Variant:
    """One set of options. Fields marked (template) change guest state and need their own bake."""

    name: str
    memory_mib: int = 256  # (template)
    cpu: str = "max"  # (template)
    append_extra: list = field(default_factory=list)  # (template)
    vcpus: int = 1  # (template)
    tb_size_mib: Optional[int] = None
    thread: Optional[str] = None  # "single" | "multi"
    msg_timestamp_off: bool = False
    sandbox: bool = True
    overcommit: Optional[str] = None  # e.g. "mem-lock=off"
    env: dict = field(default_factory=dict)  # extra environment for QEMU (malloc tuning)
    thp_disable: bool = False  # prctl(PR_SET_THP_DISABLE) before exec (inherited by QEMU)
    restore_without_kernel: bool = False  # restore with no -kernel/-initrd/-append
    extra_args: list = field(default_factory=list)
    note: str = ""

    def template_key(self) -> tuple:
        return (self.memory_mib, self.cpu, tuple(self.append_extra), self.vcpus)


def kernel_cmdline(v: Variant) -> str:
    words = ["console=ttyS0", "quiet", "panic=-1", "reboot=t"]
    khz = host_tsc_khz()
    if khz:
        words.append(f"tsc_early_khz={khz}")
    return " ".join(words + list(v.append_extra))


def qemu_args(v: Variant, files: dict, ram: str, share: bool, wd: str, incoming: bool) -> list[str]:
    """The runtime's command line (core/runtime/src/qemu.rs QemuConfig::args) plus the variant."""
    accel = "tcg"
    if v.tb_size_mib is not None:
        accel += f",tb-size={v.tb_size_mib}"
    if v.thread:
        accel += f",thread={v.thread}"
    esc = lambda s: s.replace(",", ",,")  # noqa: E731
    a = ["-M", "microvm,acpi=on,x-option-roms=off,pcie=off,memory-backend=mem",
         "-accel", accel, "-cpu", v.cpu,
         "-m", f"{v.memory_mib}M", "-smp", str(v.vcpus),
         "-nodefaults", "-no-user-config", "-display", "none"]
    if v.sandbox:
        a += ["-sandbox", "on"]
    a += ["-no-reboot"]
    a += ["-object", f"memory-backend-file,id=mem,size={v.memory_mib}M,mem-path={esc(ram)},"
                     f"share={'on' if share else 'off'}"]
    if not (incoming and v.restore_without_kernel):
        a += ["-kernel", files["kernel"]]
        if files.get("initrd"):
            a += ["-initrd", files["initrd"]]
        a += ["-append", kernel_cmdline(v)]
    a += ["-serial", f"file:{wd}/console.log",
          "-device", "virtio-serial-device",
          "-chardev", f"socket,id=agent,path={esc(wd + '/agent.sock')},server=on,wait=off",
          "-device", "virtserialport,chardev=agent,name=agent",
          "-drive", f"id=root,file={esc(files['rootfs'])},format=raw,if=none,readonly=on",
          "-device", "virtio-blk-device,drive=root",
          "-qmp", f"unix:{wd}/qmp.sock,server=on,wait=off"]
    if v.msg_timestamp_off:
        a += ["-msg", "timestamp=off"]
    if v.overcommit:
        a += ["-overcommit", v.overcommit]
    a += list(v.extra_args)
    if incoming:
        a += ["-incoming", "defer"]
    return a


def launch(v: Variant, args: list[str], wd: str) -> subprocess.Popen:
    owner = os.getpid()

    def pre() -> None:
        os.setpgid(0, 0)
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if v.thp_disable:
            _libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
        if os.getppid() != owner:
            os._exit(1)

    env = dict(os.environ)
    env.update(v.env)
    err = open(os.path.join(wd, "qemu.log"), "wb")
    return subprocess.Popen([shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"] + args,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                            env=env, preexec_fn=pre)


# ---------------------------------------------------------------------------------------------
# QMP and the agent protocol (core/protocol)


def connect_unix(path: str, deadline: float, proc: subprocess.Popen) -> socket.socket:
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU exited ({proc.returncode}) before {path} listened")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} never listened")
            time.sleep(0.001)


class Qmp:
    def __init__(self, path: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
        self.sock = connect_unix(path, time.monotonic() + timeout, proc)
        self.f = self.sock.makefile("rwb")
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args) -> dict:
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError(f"QMP closed during {name}")
            r = json.loads(line)
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")

    def wait_migration(self, timeout: float = 60.0) -> dict:
        end = time.monotonic() + timeout
        while True:
            st = self.cmd("query-migrate")
            if st.get("status") == "completed":
                return st
            if st.get("status") in ("failed", "cancelled"):
                raise RuntimeError(f"migration {st}")
            if time.monotonic() > end:
                raise TimeoutError(f"migration {st}")
            time.sleep(0.001)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


K_CONTROL, K_STDIN, K_STDOUT, K_STDERR = 1, 2, 3, 4


class Agent:
    def __init__(self, path: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
        self.sock = connect_unix(path, time.monotonic() + timeout, proc)
        self.buf = b""
        self.req = 1 << 32

    def send(self, kind: int, channel: int, payload: bytes) -> None:
        self.sock.sendall(b"SM" + bytes([kind, 0]) + struct.pack("<II", channel, len(payload)) + payload)

    def control(self, msg: dict) -> None:
        self.send(K_CONTROL, 0, json.dumps(msg).encode())

    def _fill(self) -> None:
        d = self.sock.recv(1 << 16)
        if not d:
            raise RuntimeError("agent connection closed")
        self.buf += d

    def frame(self) -> tuple[int, int, bytes]:
        while True:
            if len(self.buf) >= 12:
                if self.buf[:2] != b"SM":
                    raise RuntimeError(f"bad magic {self.buf[:2]!r}")
                kind, ch, n = self.buf[2], *struct.unpack("<II", self.buf[4:12])
                if len(self.buf) >= 12 + n:
                    p = self.buf[12:12 + n]
                    self.buf = self.buf[12 + n:]
                    return kind, ch, p
            self._fill()

    def hello(self, timeout: float = 60.0) -> dict:
        self.sock.settimeout(timeout)
        self.control({"op": "hello", "version": 1, "host_time_ns": time.time_ns(),
                      "entropy": list(os.urandom(32))})
        # A frame half-written before a snapshot may arrive ahead of Welcome: skip to it.
        while True:
            i = self.buf.find(b"SM\x01\x00")
            if i >= 0:
                self.buf = self.buf[i:]
                if len(self.buf) >= 12:
                    n = struct.unpack("<I", self.buf[8:12])[0]
                    if len(self.buf) >= 12 + n:
                        try:
                            msg = json.loads(self.buf[12:12 + n])
                        except ValueError:
                            msg = None
                        if isinstance(msg, dict) and msg.get("op") == "welcome":
                            self.buf = self.buf[12 + n:]
                            return msg
                        self.buf = self.buf[4:]
                        continue
            self._fill()

    def next_control(self) -> dict:
        while True:
            kind, _, p = self.frame()
            if kind == K_CONTROL:
                return json.loads(p)

    def exec(self, argv: list[str], timeout: float = 120.0) -> tuple[int, bytes, bytes]:
        self.sock.settimeout(timeout)
        self.req += 1
        req = self.req
        self.control({"op": "spawn", "req": req, "argv": argv, "env": [], "cwd": None,
                      "tty": None, "timeout_ms": None})
        pid = None
        out, err = [], []
        while True:
            kind, ch, p = self.frame()
            if kind == K_CONTROL:
                m = json.loads(p)
                if m.get("op") == "spawned" and m.get("req") == req:
                    pid = m["id"]
                    self.send(K_STDIN, pid, b"")
                elif m.get("op") == "error" and m.get("req") == req:
                    raise RuntimeError(f"spawn {argv}: {m}")
                elif m.get("op") == "exited" and m.get("id") == pid:
                    self.control({"op": "forget", "req": self.req + 1, "id": pid})
                    self.req += 1
                    return m["status"]["exit_code"], b"".join(out), b"".join(err)
            elif kind == K_STDOUT and ch == pid:
                out.append(p)
            elif kind == K_STDERR and ch == pid:
                err.append(p)

    def pause(self) -> None:
        self.req += 1
        req = self.req
        self.control({"op": "pause", "req": req})
        while True:
            m = self.next_control()
            if m.get("op") == "paused" and m.get("req") == req:
                return

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# bake / restore


@dataclass
class Template:
    variant: Variant
    dir: str
    ram: str
    state: str
    boot_s: float
    snapshot_s: float


def bake(v: Variant, files: dict, root: str, warmup: list[list[str]]) -> Template:
    d = tempfile.mkdtemp(prefix=f"tpl-{v.name}-", dir=root)
    ram, state = os.path.join(d, "ram"), os.path.join(d, "state")
    t0 = time.perf_counter()
    proc = launch(v, qemu_args(v, files, ram, True, d, False), d)
    try:
        agent = Agent(os.path.join(d, "agent.sock"), proc)
        agent.hello(timeout=120)
        for argv in warmup:
            code, out, err = agent.exec(argv)
            if code != 0:
                raise RuntimeError(f"warmup {argv} failed: {code} {err[-500:]!r}")
        boot_s = time.perf_counter() - t0
        agent.pause()
        qmp = Qmp(os.path.join(d, "qmp.sock"), proc)
        t1 = time.perf_counter()
        qmp.cmd("stop")
        qmp.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": True}])
        qmp.cmd("migrate", uri=f"exec:cat > {state}")
        qmp.wait_migration()
        snap_s = time.perf_counter() - t1
        agent.close()
        qmp.close()
    finally:
        proc.kill()
        proc.wait()
    return Template(v, d, ram, state, boot_s, snap_s)


@dataclass
class Clone:
    proc: subprocess.Popen
    wd: str
    agent: Agent
    t_welcome: float
    t_first_exec: float
    t_python: float
    t_qmp: float = 0.0  # QMP connected (QEMU initialised)
    t_loaded: float = 0.0  # device state loaded, guest running


def restore(tpl: Template, v: Variant, files: dict, root: str,
            first_exec: list[str], then: list[list[str]]) -> Clone:
    """Restores one clone of `tpl` with the TCG/host options of `v`."""
    wd = tempfile.mkdtemp(prefix="clone-", dir=root)
    args = qemu_args(v, files, tpl.ram, False, wd, True)
    t0 = time.perf_counter()
    proc = launch(v, args, wd)
    try:
        qmp = Qmp(os.path.join(wd, "qmp.sock"), proc)
        t_q = time.perf_counter() - t0
        qmp.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": True}])
        # Connect and say Hello before the guest runs: the chardev holds it until it does.
        agent = Agent(os.path.join(wd, "agent.sock"), proc)
        agent.control({"op": "hello", "version": 1, "host_time_ns": time.time_ns(),
                       "entropy": list(os.urandom(32))})
        qmp.cmd("migrate-incoming", uri=f"exec:cat {tpl.state}")
        qmp.wait_migration()
        if qmp.cmd("query-status").get("status") != "running":
            qmp.cmd("cont")
        t_l = time.perf_counter() - t0
        qmp.close()
        # (the Hello is already sent; hello() would send a second one — read the Welcome only)
        agent.sock.settimeout(60)
        while True:
            m = agent.next_control()
            if m.get("op") == "welcome":
                break
        t_w = time.perf_counter() - t0
        if first_exec:
            code, out, err = agent.exec(first_exec)
            if code != 0:
                raise RuntimeError(f"{first_exec}: {code} {err[-300:]!r}")
        t_x = time.perf_counter() - t0
        for argv in then:
            code, out, err = agent.exec(argv)
            if code != 0:
                raise RuntimeError(f"{argv}: {code} {err[-300:]!r}")
        t_p = time.perf_counter() - t0
        return Clone(proc, wd, agent, t_w, t_x, t_p, t_q, t_l)
    except BaseException:
        proc.kill()
        proc.wait()
        sys.stderr.write(open(os.path.join(wd, "qemu.log")).read()[-2000:])
        raise


def kill_clone(c: Clone) -> None:
    c.agent.close()
    c.proc.kill()
    c.proc.wait()
    shutil.rmtree(c.wd, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# measuring


def rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in open(f"/proc/{pid}/smaps_rollup"):
        m = re.match(r"(\w+):\s+(\d+) kB", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def smaps(pid: int) -> list[dict]:
    maps, cur = [], None
    for line in open(f"/proc/{pid}/smaps"):
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \d+\s*(.*)$", line)
        if m and not line.split()[0].endswith(":"):
            cur = {"start": int(m.group(1), 16), "end": int(m.group(2), 16), "perms": m.group(3),
                   "path": m.group(4).strip()}
            maps.append(cur)
            continue
        m = re.match(r"(\w+):\s+(\d+) kB", line)
        if m and cur is not None:
            cur[m.group(1)] = int(m.group(2))
    return maps


def classify(mp: dict, ram: str) -> str:
    path, perms = mp["path"], mp["perms"]
    size = mp["end"] - mp["start"]
    if path == ram or (ram and path.startswith(ram)):
        return "guest_ram"
    if path == "[heap]":
        return "heap"
    if path.startswith("[stack"):
        return "stack"
    if path in ("[vdso]", "[vvar]", "[vsyscall]", "[vvar_vclock]"):
        return "kernel"
    if not path or path.startswith("[anon"):
        if "x" in perms and size >= MIB:
            return "tcg_code"
        return "anon"
    if "qemu-system" in path:
        return "qemu_binary"
    if ".so" in path:
        return "libs"
    return "files"


CATS = ["guest_ram", "tcg_code", "anon", "heap", "qemu_binary", "libs", "stack", "files", "kernel"]


def breakdown(pid: int, ram: str) -> dict:
    by = {c: {"Pss": 0, "Private": 0, "Rss": 0, "AnonHugePages": 0} for c in CATS}
    big_anon = []
    for mp in smaps(pid):
        c = classify(mp, ram)
        by[c]["Pss"] += mp.get("Pss", 0)
        by[c]["Rss"] += mp.get("Rss", 0)
        by[c]["Private"] += mp.get("Private_Dirty", 0) + mp.get("Private_Clean", 0)
        by[c]["AnonHugePages"] += mp.get("AnonHugePages", 0)
        if c in ("anon", "heap", "tcg_code") and mp.get("Pss", 0) >= 512:
            big_anon.append({"size_kib": (mp["end"] - mp["start"]) // 1024, "perms": mp["perms"],
                             "cat": c, "Pss": mp.get("Pss", 0),
                             "AnonHugePages": mp.get("AnonHugePages", 0)})
    big_anon.sort(key=lambda x: -x["Pss"])
    return {"by": by, "big": big_anon[:8]}


def disk_kib(path: str) -> int:
    return os.stat(path).st_blocks // 2


# ---------------------------------------------------------------------------------------------
# the experiment

LOOP = ("import time\nt=time.perf_counter()\ns=0\nfor i in range(300000):\n    s+=i*i\n"
        "print(round(time.perf_counter()-t,4))")


def run_variant(v: Variant, files: dict, root: str, templates: dict,
                counts: list[int], idle: float, first_exec: list[str], then: list[list[str]],
                warmup: list[list[str]], detail: bool, loop: bool) -> dict:
    key = v.template_key()
    if key not in templates:
        # Baked with the variant's own TCG/host options too (they don't enter guest state, and
        # later variants with the same template key reuse this template).
        tv = dataclasses.replace(v, restore_without_kernel=False)
        templates[key] = bake(tv, files, root, warmup)
    tpl = templates[key]
    res = {"variant": v.name, "note": v.note, "bake_boot_s": tpl.boot_s,
           "snapshot_s": tpl.snapshot_s, "state_bytes": os.path.getsize(tpl.state),
           "template_ram_kib": disk_kib(tpl.ram), "runs": {}}
    lat_w, lat_x, lat_p = [], [], []
    for n in counts:
        clones = []
        try:
            for _ in range(n):
                c = restore(tpl, v, files, root, first_exec, then)
                clones.append(c)
                lat_w.append(c.t_welcome)
                lat_x.append(c.t_first_exec)
                lat_p.append(c.t_python)
            time.sleep(idle)
            pss = [rollup(c.proc.pid) for c in clones]
            run = {
                "pss_mib": [p["Pss"] / 1024 for p in pss],
                "rss_mib": [p["Rss"] / 1024 for p in pss],
                "private_mib": [(p.get("Private_Dirty", 0) + p.get("Private_Clean", 0)) / 1024 for p in pss],
                "anon_huge_mib": [p.get("AnonHugePages", 0) / 1024 for p in pss],
                "template_ram_kib_after": disk_kib(tpl.ram),
            }
            run["pss_mean_mib"] = sum(run["pss_mib"]) / n
            bd = [breakdown(c.proc.pid, tpl.ram) for c in clones]
            run["breakdown_mib"] = {cat: sum(b["by"][cat]["Pss"] for b in bd) / n / 1024 for cat in CATS}
            run["breakdown_private_mib"] = {cat: sum(b["by"][cat]["Private"] for b in bd) / n / 1024
                                            for cat in CATS}
            run["thp_mib"] = {cat: sum(b["by"][cat]["AnonHugePages"] for b in bd) / n / 1024 for cat in CATS}
            if detail:
                run["big_mappings_vm0"] = bd[0]["big"]
            if loop and n == counts[0]:
                t = time.perf_counter()
                code, out, _ = clones[0].agent.exec(["python3", "-c", LOOP])
                run["loop_host_s"] = time.perf_counter() - t
                run["loop_guest_s"] = float(out.strip() or "nan")
                t = time.perf_counter()
                clones[0].agent.exec(["python3", "-c", LOOP])
                run["loop2_host_s"] = time.perf_counter() - t
            res["runs"][n] = run
        finally:
            for c in clones:
                kill_clone(c)
    res["restore_welcome_ms"] = {"p50": percentile(lat_w, 50) * 1e3, "p95": percentile(lat_w, 95) * 1e3}
    res["restore_first_exec_ms"] = {"p50": percentile(lat_x, 50) * 1e3, "p95": percentile(lat_x, 95) * 1e3}
    res["restore_python_ms"] = {"p50": percentile(lat_p, 50) * 1e3, "p95": percentile(lat_p, 95) * 1e3}
    return res


PERF_STEPS_ALL = [
    ("true", ["true"]),
    ("python3 -c pass", ["python3", "-c", "pass"]),
    ("python3 -c pass (2nd)", ["python3", "-c", "pass"]),
    ("import numpy", ["python3", "-c", "import numpy"]),
    ("import numpy (2nd)", ["python3", "-c", "import numpy"]),
    ("loop 300k", ["python3", "-c", LOOP]),
]
PERF_STEPS = PERF_STEPS_ALL


def perf(vs: list[Variant], files: dict, root: str, rounds: int, warmup: list[list[str]]) -> dict:
    """Rounds of: for each variant, restore one clone and time its restore stages and a fixed
    workload (interleaved, so a loaded host biases every variant alike). Also records the TCG
    code-buffer Pss after each step."""
    templates: dict = {}
    out: dict = {v.name: {"qmp_up": [], "loaded+cont": [], "welcome": [], "first_exec": [], **{n: [] for n, _ in PERF_STEPS},
                          "loop_guest": [], "tcg_after": {n: [] for n, _ in PERF_STEPS},
                          "pss_after": {n: [] for n, _ in PERF_STEPS}} for v in vs}
    for v in vs:
        key = v.template_key()
        if key not in templates:
            templates[key] = bake(dataclasses.replace(v, restore_without_kernel=False), files, root, warmup)
    for rnd in range(rounds):
        for v in vs:
            tpl = templates[v.template_key()]
            c = restore(tpl, v, files, root, ["true"], [])
            o = out[v.name]
            try:
                o["qmp_up"].append(c.t_qmp)
                o["loaded+cont"].append(c.t_loaded)
                o["welcome"].append(c.t_welcome)
                o["first_exec"].append(c.t_first_exec)
                for name, argv in PERF_STEPS:
                    t = time.perf_counter()
                    code, stdout, err = c.agent.exec(argv, timeout=600)
                    o[name].append(time.perf_counter() - t)
                    if name.startswith("loop"):
                        o["loop_guest"].append(float(stdout.strip() or "nan"))
                    bd = breakdown(c.proc.pid, tpl.ram)["by"]
                    o["tcg_after"][name].append(bd["tcg_code"]["Pss"] / 1024)
                    o["pss_after"][name].append(rollup(c.proc.pid)["Pss"] / 1024)
            finally:
                kill_clone(c)
        print(f"  perf round {rnd + 1}/{rounds} done", file=sys.stderr, flush=True)
    return out


def print_perf(out: dict) -> None:
    names = ["qmp_up", "loaded+cont", "welcome", "first_exec"] + [n for n, _ in PERF_STEPS] + ["loop_guest"]
    print("\n== restore stages and guest workloads: median seconds (min-max); TCG code MiB after ==")
    print(f"{'step':<24}" + "".join(f"{v:>24}" for v in out))
    for n in names:
        cells = []
        for v in out:
            xs = out[v][n]
            cells.append(f"{median(xs):.3f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "n/a")
        print(f"{n:<24}" + "".join(f"{c:>24}" for c in cells))
    for n, _ in PERF_STEPS:
        print(f"{'tcg/Pss after ' + n:<38}" + "".join(
            f"{median(out[v]['tcg_after'][n]):>10.1f}/{median(out[v]['pss_after'][n]):<13.1f}" for v in out))


def variants() -> dict[str, Variant]:
    malloc = {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_MMAP_THRESHOLD_": "131072"}
    vs = [
        Variant("base", note="the runtime's command line today"),
        Variant("tb8", tb_size_mib=8),
        Variant("tb16", tb_size_mib=16),
        Variant("tb32", tb_size_mib=32),
        Variant("tb64", tb_size_mib=64),
        Variant("tb4", tb_size_mib=4),
        Variant("tb2", tb_size_mib=2),
        Variant("single", thread="single"),
        Variant("nothp", thp_disable=True, note="prctl(PR_SET_THP_DISABLE) in the launcher"),
        Variant("m128", memory_mib=128),
        Variant("m512", memory_mib=512),
        Variant("qemu64", cpu="qemu64"),
        Variant("cmdline", append_extra=["init_on_alloc=0", "transparent_hugepage=never", "nowatchdog"],
                note="guest cmdline: init_on_alloc=0 transparent_hugepage=never nowatchdog"),
        Variant("gthp", append_extra=["transparent_hugepage=never"]),
        Variant("gioa", append_extra=["init_on_alloc=0"]),
        Variant("msgts", msg_timestamp_off=True),
        Variant("malloc", env=malloc, note="MALLOC_ARENA_MAX=1 + trim/mmap thresholds 128K"),
        Variant("arena1", env={"MALLOC_ARENA_MAX": "1"}),
        Variant("trim", env={"MALLOC_TRIM_THRESHOLD_": "0"}, note="MALLOC_TRIM_THRESHOLD_=0"),
        Variant("nosandbox", sandbox=False),
        Variant("memlockoff", overcommit="mem-lock=off"),
        Variant("nokernel", restore_without_kernel=True, note="restore without -kernel/-initrd/-append"),
    ]
    return {v.name: v for v in vs}


def combine(names: list[str], all_: dict[str, Variant]) -> Variant:
    """`a+b+c`: later fields override earlier ones when set."""
    out = Variant("+".join(names))
    default = Variant("x")
    for n in names:
        v = all_[n]
        for f in dataclasses.fields(Variant):
            if f.name in ("name", "note"):
                continue
            val = getattr(v, f.name)
            if val != getattr(default, f.name):
                if isinstance(val, dict):
                    val = {**getattr(out, f.name), **val}
                elif isinstance(val, list):
                    val = getattr(out, f.name) + val
                setattr(out, f.name, val)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="base")
    ap.add_argument("--counts", default="1,4,8")
    ap.add_argument("--idle", type=float, default=5.0)
    ap.add_argument("--image", default=None)
    ap.add_argument("--first-exec", default="true", choices=["true", "python", "none"],
                    help="what the clone runs after Welcome before idling ('none': Hello only)")
    ap.add_argument("--perf-steps", default="all", choices=["all", "short"],
                    help="perf workload: all (true, python, numpy, loop) or short (true, python)")
    ap.add_argument("--perf", type=int, default=0, metavar="ROUNDS",
                    help="instead of Pss at 1/4/8: ROUNDS x (restore one clone per variant, "
                         "interleaved) timing restore stages and guest workloads")
    ap.add_argument("--python-after", action="store_true",
                    help="also run python3 -c 'print(1+1)' after the first exec, before idling")
    ap.add_argument("--warmup", default="python3 -c pass", help="shell words run in the bake VM")
    ap.add_argument("--loop", action="store_true", help="time a small Python loop in one clone")
    ap.add_argument("--detail", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--root", default="/dev/shm")
    a = ap.parse_args()
    files = guest_files(a.image)
    all_ = variants()
    counts = [int(x) for x in a.counts.split(",")]
    first = {"true": ["true"], "none": [], "python": ["python3", "-c", "print(1+1)"]}[a.first_exec]
    then = [["python3", "-c", "print(1+1)"]] if a.python_after else []
    warmup = [a.warmup.split()] if a.warmup else []
    root = tempfile.mkdtemp(prefix="smk-mem-", dir=a.root)
    templates: dict = {}
    results = []
    if a.perf_steps == "short":
        globals()["PERF_STEPS"] = PERF_STEPS_ALL[:2]
    if a.perf:
        vs = [combine(spec.split("+"), all_) if "+" in spec else all_[spec] for spec in a.variants.split(",")]
        try:
            out = perf(vs, files, root, a.perf, warmup)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print_perf(out)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
        return
    try:
        for spec in a.variants.split(","):
            v = combine(spec.split("+"), all_) if "+" in spec else all_[spec]
            r = run_variant(v, files, root, templates, counts, a.idle, first, then, warmup,
                            a.detail, a.loop)
            results.append(r)
            print_result(r)
            sys.stdout.flush()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_summary(results, counts)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


def print_result(r: dict) -> None:
    print(f"\n--- {r['variant']} {('(' + r['note'] + ')') if r['note'] else ''}")
    print(f"  template: boot+warmup {r['bake_boot_s']:.2f} s, snapshot {r['snapshot_s'] * 1e3:.0f} ms, "
          f"state {r['state_bytes'] / 1024:.0f} KiB, RAM file {r['template_ram_kib'] / 1024:.1f} MiB allocated")
    print(f"  restore: welcome p50 {r['restore_welcome_ms']['p50']:.0f} ms p95 {r['restore_welcome_ms']['p95']:.0f};"
          f" first exec p50 {r['restore_first_exec_ms']['p50']:.0f} ms p95 {r['restore_first_exec_ms']['p95']:.0f};"
          f" after python p50 {r['restore_python_ms']['p50']:.0f} ms")
    for n, run in r["runs"].items():
        b = run["breakdown_mib"]
        print(f"  N={n}: Pss/VM {run['pss_mean_mib']:.1f} MiB (min {min(run['pss_mib']):.1f} max {max(run['pss_mib']):.1f}),"
              f" private {sum(run['private_mib']) / n:.1f}, THP {sum(run['anon_huge_mib']) / n:.1f} | "
              + " ".join(f"{k}={b[k]:.1f}" for k in CATS if b[k] >= 0.05))
        if "loop_guest_s" in run:
            print(f"    python loop: guest {run['loop_guest_s']:.3f} s, exec {run['loop_host_s']:.2f} s,"
                  f" again {run['loop2_host_s']:.2f} s")
        for m in run.get("big_mappings_vm0", []):
            print(f"    {m['cat']:<9} {m['perms']} size {m['size_kib'] / 1024:8.1f} MiB  Pss {m['Pss'] / 1024:6.1f}"
                  f"  THP {m['AnonHugePages'] / 1024:.1f}")


def print_summary(results: list[dict], counts: list[int]) -> None:
    print("\n== Pss per idle VM (MiB), restore latency (ms) ==")
    head = f"{'variant':<28}" + "".join(f"{'N=' + str(n):>8}" for n in counts) + \
        f"{'ram':>7}{'tcg':>7}{'anon+heap':>10}{'libs+bin':>9}{'welcome':>9}{'exec50':>8}{'exec95':>8}{'loop s':>8}"
    print(head)
    print("-" * len(head))
    for r in results:
        last = r["runs"][counts[-1]]
        b = last["breakdown_mib"]
        loop = r["runs"][counts[0]].get("loop_guest_s", float("nan"))
        print(f"{r['variant']:<28}" + "".join(f"{r['runs'][n]['pss_mean_mib']:>8.1f}" for n in counts)
              + f"{b['guest_ram']:>7.1f}{b['tcg_code']:>7.1f}{b['anon'] + b['heap']:>10.1f}"
              f"{b['libs'] + b['qemu_binary']:>9.1f}{r['restore_welcome_ms']['p50']:>9.0f}"
              f"{r['restore_first_exec_ms']['p50']:>8.0f}{r['restore_first_exec_ms']['p95']:>8.0f}{loop:>8.3f}")


if __name__ == "__main__":
    main()
