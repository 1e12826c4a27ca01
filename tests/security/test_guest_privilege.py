"""Least privilege inside the guest (issue 16 item 3), through real kernels (jupyter_client).

With c.MicroVMKernel.guest_user = 'jovyan' the REPL and what it starts run as uid 1000 with no
capabilities and no_new_privs, and cannot reach the guest agent (PID 1): ptrace attach, pidfd_getfd
on its fds, /proc/1/mem, the agent's virtio port and the serial console all fail. The workspace,
/tmp and the home directory are the user's; a symlink the user plants in the workspace does not
make the agent's writes for the host (the sync's uploads) go through it as root. With guest_user = 'root' the REPL is root.
"""
from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the kernel harness
from kernel.harness import BACKEND, Kernel, LocalKernelspecs, stderr_of, stdout_of

pytestmark = [pytest.mark.vm, pytest.mark.skipif(BACKEND != "vm", reason="needs the microVM")]

USER_KERNEL = "smk-security-user"
ROOT_KERNEL = "smk-security-root"
_SPECS = LocalKernelspecs("guest-user", {
    name: [f"--MicroVMKernel.guest_user={user}", "--MicroVMKernel.workspace=sync"]
    for name, user in ((USER_KERNEL, "jovyan"), (ROOT_KERNEL, "root"))})


def _start(name: str, cwd: str | None = None) -> Kernel:
    _SPECS.use()
    return Kernel(name, cwd=cwd)


@pytest.fixture(scope="module")
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="smk-security-ws-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def user_kernel(workspace: Path) -> Iterator[Kernel]:
    k = _start(USER_KERNEL, cwd=str(workspace))
    yield k
    k.shutdown()


def _probe(k: Kernel, code: str) -> dict:
    reply, outputs = k.execute(code + "\nprint('PROBE' + json.dumps(result))", timeout=120)
    assert reply["status"] == "ok", (reply.get("ename"), reply.get("evalue"), stderr_of(outputs))
    line = [x for x in stdout_of(outputs).splitlines() if x.startswith("PROBE")]
    assert line, outputs
    return json.loads(line[-1][len("PROBE"):])


IDENTITY = r"""
import json, os, subprocess
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
result = {k: status[k].strip() for k in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff",
                                          "CapBnd", "CapAmb", "NoNewPrivs")}
result["home"] = os.environ.get("HOME")
result["child"] = subprocess.run(["sh", "-c", "id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status"],
                                 capture_output=True, text=True).stdout.split()
"""


def test_repl_and_its_children_run_unprivileged(user_kernel: Kernel) -> None:
    r = _probe(user_kernel, IDENTITY)
    assert r["Uid"].split() == ["1000"] * 4, r
    assert r["Gid"].split() == ["100"] * 4, r
    assert r["Groups"] == "", r
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(r[cap], 16) == 0, (cap, r)
    assert r["NoNewPrivs"] == "1", r
    assert r["home"] == "/home/jovyan", r
    # a subprocess (what `!cmd` runs) inherits all of it
    assert r["child"] == ["1000", "CapEff:", "0000000000000000", "CapBnd:", "0000000000000000",
                          "NoNewPrivs:", "1"], r


def test_bang_command_runs_as_the_user(user_kernel: Kernel) -> None:
    reply, outputs = user_kernel.execute("!id -un; id -u", timeout=60)
    assert reply["status"] == "ok", reply
    assert stdout_of(outputs).split() == ["jovyan", "1000"], outputs


def test_the_users_pip_scripts_are_on_path(user_kernel: Kernel) -> None:
    """`%pip install` puts a package's tools in ~/.local/bin (pip's user scheme): `!tool` finds
    them."""
    code = ("import os, stat\n"
            "os.makedirs(os.path.expanduser('~/.local/bin'), exist_ok=True)\n"
            "tool = os.path.expanduser('~/.local/bin/smk-probe-tool')\n"
            "open(tool, 'w').write('#!/bin/sh\\necho tool-ran-as-$(id -u)\\n')\n"
            "os.chmod(tool, 0o755)")
    reply, outputs = user_kernel.execute(code, timeout=60)
    assert reply["status"] == "ok", (reply, outputs)
    reply, outputs = user_kernel.execute("!smk-probe-tool", timeout=60)
    assert reply["status"] == "ok", reply
    assert stdout_of(outputs).strip() == "tool-ran-as-1000", outputs


AGENT = r"""
import ctypes, errno, glob, json, os
libc = ctypes.CDLL(None, use_errno=True)
SYS_pidfd_open, SYS_pidfd_getfd, PTRACE_ATTACH, PTRACE_SEIZE = 434, 438, 16, 0x4206
def err(r):
    return "ok" if r != -1 else errno.errorcode[ctypes.get_errno()]
def opened(path, mode):
    try:
        with open(path, mode):
            return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
result = {
    "attach": err(libc.ptrace(PTRACE_ATTACH, 1, None, None)),
    "seize": err(libc.ptrace(PTRACE_SEIZE, 1, None, None)),
}
pidfd = libc.syscall(SYS_pidfd_open, 1, 0)
result["pidfd_open"] = err(pidfd)
result["getfd"] = sorted({err(libc.syscall(SYS_pidfd_getfd, pidfd, fd, 0)) for fd in range(32)}) \
    if pidfd != -1 else []
result["mem"] = opened("/proc/1/mem", "rb")
result["environ"] = opened("/proc/1/environ", "rb")
result["ttyS0"] = opened("/dev/ttyS0", "wb")
result["console"] = opened("/dev/console", "wb")
result["vports"] = {p: opened(p, "wb") for p in glob.glob("/dev/vport*")}
result["kill1"] = err(libc.kill(1, 0))
"""


def test_the_agent_is_out_of_reach(user_kernel: Kernel) -> None:
    r = _probe(user_kernel, AGENT)
    assert r["attach"] == "EPERM" and r["seize"] == "EPERM", r
    # pidfd_open needs no permission; taking any of PID 1's fds (its virtio port) does
    assert r["getfd"] and "ok" not in r["getfd"], r
    assert r["mem"] == "EACCES" and r["environ"] == "EACCES", r
    assert r["ttyS0"] == "EACCES" and r["console"] == "EACCES", r
    assert r["vports"] and set(r["vports"].values()) == {"EACCES"}, r
    assert r["kill1"] == "EPERM", r


FILES = r"""
import json, os
def owner(p):
    st = os.stat(p)
    return [st.st_uid, st.st_gid]
for d in ("/tmp", os.path.expanduser("~"), os.getcwd()):
    with open(os.path.join(d, "probe.txt"), "w") as f:
        f.write("x")
    os.remove(os.path.join(d, "probe.txt"))
result = {"cwd": os.getcwd(), "workspace": owner("/workspace"), "home": owner(os.path.expanduser("~")),
          "from_host": owner("/workspace/from_host.txt"), "text": open("/workspace/from_host.txt").read()}
"""


def test_workspace_home_and_tmp_are_the_users(user_kernel: Kernel, workspace: Path) -> None:
    (workspace / "from_host.txt").write_text("hello")
    r = _probe(user_kernel, FILES)
    assert r["cwd"] == "/workspace", r
    assert r["workspace"] == [1000, 100] and r["home"] == [1000, 100], r
    # the host's file came through the agent, written as the user
    assert r["from_host"] == [1000, 100] and r["text"] == "hello", r


PLANT = """
import os
os.symlink('/etc/passwd', '/workspace/planted.txt')
os.symlink('/etc', '/workspace/planted_dir')
try:
    os.link('/etc/group', '/workspace/hard')  # refused where fs.protected_hardlinks is on
except PermissionError:
    os.symlink('/etc/group', '/workspace/hard')
"""


CHECK = """
import os
st = os.stat('/workspace/new.txt')
print(st.st_uid, st.st_gid, open('/workspace/new.txt').read(),
      'pwned' in open('/etc/passwd').read() + open('/etc/group').read())
"""


def test_host_writes_are_the_users_and_never_root_through_its_symlinks() -> None:
    """The agent's writes for the host (what the workspace sync's uploads use) in a guest with
    the user provisioned: created owned by the user; through a symlink or hard link the user
    planted towards root's files they fail instead of writing as root."""
    from supermachine_kernel import GuestError, api
    from supermachine_kernel.repl_client.guest_user import provision

    image = api.Image.build(snapshot=False, progress=False, cached_only=True)
    with image.cold_boot() as vm:
        assert provision(vm, "jovyan") == {"uid": 1000, "gid": 100, "home": "/home/jovyan"}
        planted = vm.exec(["python3", "-c", PLANT])
        assert planted.exit_code == 0, planted.stderr
        vm.write_file("/workspace/new.txt", b"hello")
        for target in ("/workspace/planted.txt", "/workspace/planted_dir/passwd",
                       "/workspace/hard",
                       "/etc/passwd"):
            with pytest.raises(GuestError, match="ermission denied"):
                vm.write_file(target, b"pwned:x:0:0::/:/bin/sh\n")
        check = vm.exec(["python3", "-c", CHECK])
        assert check.stdout.decode().split() == ["1000", "100", "hello", "False"], check
        # reads for the host are the user's too: root's own files stay unreadable
        with pytest.raises(GuestError, match="ermission denied"):
            vm.read_file("/etc/shadow")


def test_root_config_gives_root() -> None:
    k = _start(ROOT_KERNEL)
    try:
        r = _probe(k, IDENTITY)
    finally:
        k.shutdown()
    assert r["Uid"].split() == ["0"] * 4, r
    assert int(r["CapEff"], 16) != 0, r
    assert r["NoNewPrivs"] == "0", r
