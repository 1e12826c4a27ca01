"""A real JupyterHub for tests/hub/: the host-wide image store an admin prepares, two local
users created for the test (removed after, with every process they still run), and the Hub
of deploy/jupyterhub/jupyterhub_config.py with configurable-http-proxy, all on 127.0.0.1.

Needs root (useradd, LocalProcessSpawner), JupyterHub (the test extras) and
configurable-http-proxy (`make setup` installs it from npm under .venv/hub-proxy)."""
from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from runtime.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
DEPLOY_CONFIG = REPO / "deploy" / "jupyterhub" / "jupyterhub_config.py"
KERNEL = "python-microvm"
# The limits the test Hub's admin sets (each user's first kernel plus one more may run).
HUB_VMS_PER_USER = 2
HUB_MEMORY_PER_USER = "3G"
HUB_CPU_WEIGHT = 50
START_TIMEOUT = 600.0  # a server and its first kernel on a loaded 2-core machine under TCG


def find_proxy() -> Optional[str]:
    """configurable-http-proxy: where `make setup` puts it, else on PATH."""
    local = VENV / "hub-proxy" / "node_modules" / ".bin" / "configurable-http-proxy"
    return str(local) if local.exists() else shutil.which("configurable-http-proxy")


def pids_of(uid: int) -> list[int]:
    """Every process running as `uid`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    out.append(int(entry))
            except OSError:
                pass
    return out


def qemu_pids(uid: Optional[int] = None) -> dict[int, int]:
    """QEMU processes: pid -> uid (only `uid`'s if given)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            exe = os.readlink(f"/proc/{entry}/exe")
            owner = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        if os.path.basename(exe).startswith("qemu-system") and (uid is None or owner == uid):
            found[int(entry)] = owner
    return found


def parent_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def uid_of(pid: int) -> Optional[int]:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


@dataclass
class LocalUser:
    name: str
    uid: int
    home: str


def _create_user(prefix: str) -> LocalUser:
    name = f"{prefix}{secrets.token_hex(3)}"
    # Homes private, as the guide asks (Debian's default follows umask 022: 0755).
    subprocess.run(["useradd", "--create-home", "--key", "HOME_MODE=0700", "--shell", "/bin/bash",
                    name], check=True)
    pw = pwd.getpwnam(name)
    return LocalUser(name, pw.pw_uid, pw.pw_dir)


def _remove_user(user: LocalUser) -> None:
    for _ in range(3):
        pids = pids_of(user.uid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    subprocess.run(["userdel", "--remove", user.name], check=False, capture_output=True)


@pytest.fixture(scope="module")
def hub_prerequisites() -> str:
    if os.geteuid() != 0:
        pytest.skip("the Hub tests create local users and run LocalProcessSpawner: run as root")
    pytest.importorskip("jupyterhub", reason="JupyterHub is in the test extras: make setup")
    pytest.importorskip("jupyterhub_idle_culler", reason="in the test extras: make setup")
    proxy = find_proxy()
    if proxy is None:
        pytest.skip("configurable-http-proxy not found: `make setup` installs it under "
                    ".venv/hub-proxy (npm install configurable-http-proxy)")
    return proxy


def _reachable_by_all(path: str) -> bool:
    """Every user can run `path`: it and each folder above it are world-executable."""
    path = os.path.realpath(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


# What the users' servers and kernels import: the project's dependencies and the Hub's.
USER_VENV_REQUIREMENTS = [
    "ipykernel>=7", "jupyter_client>=8", "jupyter_core>=5", "pyzmq>=25", "traitlets>=5",
    "ipywidgets>=8", "tqdm>=4.66", "jupyterhub>=5,<6", "jupyterhub-idle-culler>=1.4",
    "jupyter_server>=2.14,<3",
]


@pytest.fixture(scope="module")
def checkout_open_to_users(hub_prerequisites: str) -> Iterator[None]:
    """The users' servers import this checkout's code (a .pth names it) and run the venvs and
    store below it. A clone under `mktemp -d` (mode 0700, as a CI check makes it) is closed to
    them: for the module's duration the checkout gets o+rx (Python's importer lists the folder)
    and every folder above it o+x (traverse only); the modes are put back after."""
    changed: list[tuple[Path, int]] = []
    for path, bits in ((REPO, 0o005), *((parent, 0o001) for parent in REPO.parents)):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & bits != bits:
            path.chmod(mode | bits)
            changed.append((path, mode))
    try:
        yield
    finally:
        for path, mode in changed:
            path.chmod(mode)


@pytest.fixture(scope="module")
def user_venv(hub_prerequisites: str, checkout_open_to_users: None) -> Path:
    """A virtualenv every user can run, with this project and its kernelspec: the test venv
    itself when its Python is reachable by all, else one made once (kept, like the proxy)
    under .venv/hub-venv from the system's python3 (the test venv's may live under /root)."""
    if _reachable_by_all(sys.executable):
        return VENV
    venv = VENV / "hub-venv"
    stamp = venv / ".requirements"
    wanted = "\n".join(USER_VENV_REQUIREMENTS)
    if not (stamp.exists() and stamp.read_text() == wanted):
        base = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
        if base is None or not _reachable_by_all(base):
            pytest.skip("no python3 every user can run, for the users' servers")
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *USER_VENV_REQUIREMENTS],
                       check=True, timeout=1200)
        stamp.write_text(wanted)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "supermachine_kernel_repo.pth").write_text(f"{REPO}\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "supermachine_kernel", "install",
                    "--sys-prefix"], check=True, stdout=subprocess.DEVNULL)
    return venv


@pytest.fixture(scope="module")
def shared_store(hub_prerequisites: str) -> str:
    """The host-wide store, as an admin prepares it: the images (root's cached ones are linked
    in rather than rebuilt: `image build --shared` would run mmdebstrap again), then the real
    `supermachine-kernel prepare --shared`, which bakes the kernel's warm snapshot there. Kept
    under .venv/hub-store between runs, like a host's /var/cache/supermachine-kernel: the next
    `prepare --shared` only checks that the snapshot is there and current."""
    from supermachine_kernel import images

    store = VENV / "hub-store"
    store.mkdir(mode=0o755, exist_ok=True)
    os.chmod(store, 0o755)
    own = images.cache_dir()
    for sub in ("images/default", "kernels", "initramfs"):
        src = os.path.join(own, sub)
        if not os.path.isdir(src):
            continue
        dest = store / sub
        dest.mkdir(mode=0o755, parents=True, exist_ok=True)
        for entry in os.listdir(src):
            if not entry.startswith(".") and not (dest / entry).exists():  # not a build in flight
                subprocess.run(["cp", "-al", os.path.join(src, entry), str(dest)], check=True)
    env = dict(os.environ, SUPERMACHINE_SHARED_CACHE_DIR=str(store))
    env.pop("SUPERMACHINE_CACHE_DIR", None)
    subprocess.run([str(VENV / "bin" / "supermachine-kernel"), "prepare", "--shared"],
                   env=env, check=True, timeout=1800, stdout=subprocess.DEVNULL, cwd=store)
    # Warm snapshots of earlier versions of the kernel (this cache outlives runs): only the one
    # `prepare` just baked or used (its last-used stamp is the newest) stays.
    snapshots = sorted((store / "snapshots").iterdir(),
                       key=lambda d: (d / "last-used").stat().st_mtime if (d / "last-used").exists() else 0)
    for old in snapshots[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    return str(store)


class HubApi:
    """The Hub's REST API and the users' servers, through the proxy, with an admin token."""

    def __init__(self, base: str, token: str) -> None:
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.base = base
        self.http = requests.Session()
        # A kept-alive connection the proxy closes just as it is reused resets the next
        # request (configurable-http-proxy, Node: 5 s keep-alive; seen once in CI, a GET of
        # the user model). GETs are safe to send again; nothing else is retried.
        retry = Retry(total=3, connect=3, read=3, status=0, backoff_factor=0.5,
                      allowed_methods=frozenset({"GET"}), raise_on_status=False)
        self.http.mount("http://", HTTPAdapter(max_retries=retry))
        self.http.headers["Authorization"] = f"token {token}"
        self.token = token

    def hub(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, f"{self.base}/hub/api{path}", timeout=60, **kw)
        r.raise_for_status()
        return r.json() if r.content else None

    def server(self, user: str, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, f"{self.base}/user/{user}/api{path}", timeout=120, **kw)
        r.raise_for_status()
        return r.json() if r.content else None

    def user_model(self, user: str) -> dict:
        return self.hub("GET", f"/users/{user}")

    def start_server(self, user: str, log: Optional[Path] = None) -> None:
        try:
            self.hub("POST", f"/users/{user}/server")
        except Exception as e:  # the Hub's log says why the spawn failed
            tail = log.read_text(errors="replace")[-6000:] if log is not None else ""
            raise RuntimeError(f"{user}'s server did not start: {e}\nthe Hub's log:\n{tail}") from e
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            server = self.user_model(user)["servers"].get("")
            if server and server.get("ready"):
                return
            time.sleep(1)
        raise TimeoutError(f"{user}'s server did not start in {START_TIMEOUT} s")

    def start_kernel(self, user: str) -> str:
        return self.server(user, "POST", "/kernels", json={"name": KERNEL})["id"]

    def run(self, user: str, kernel_id: str, code: str, timeout: float = START_TIMEOUT) -> "CellResult":
        ws = self.base.replace("http://", "ws://") + f"/user/{user}/api/kernels/{kernel_id}/channels"
        return asyncio.run(_run_cell(ws, self.token, code, timeout))


@dataclass
class CellResult:
    status: str
    stdout: str = ""
    stderr: str = ""
    error: str = ""
    results: list = field(default_factory=list)


async def _run_cell(url: str, token: str, code: str, timeout: float) -> CellResult:
    """Runs `code` over the server's kernel websocket (Jupyter's JSON message format) and
    collects what its execution publishes."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    conn = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {token}"},
                                               request_timeout=timeout))
    msg_id = uuid.uuid4().hex
    conn.write_message(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                   "session": uuid.uuid4().hex, "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": True,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    }))
    result = CellResult(status="")
    idle = False
    deadline = time.monotonic() + timeout
    try:
        while not (result.status and idle):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {code!r} in {timeout} s")
            raw = await asyncio.wait_for(conn.read_message(), left)
            if raw is None:
                raise ConnectionError("the kernel websocket closed")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["header"]["msg_type"], msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    result.stdout += content["text"]
                else:
                    result.stderr += content["text"]
            elif kind in ("execute_result", "display_data"):
                result.results.append(content["data"])
            elif kind == "error":
                result.error = f"{content['ename']}: {content['evalue']}"
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
            elif kind == "execute_reply":
                result.status = content["status"]
    finally:
        conn.close()
    return result


@dataclass
class Hub:
    api: HubApi
    users: list[LocalUser]
    process: subprocess.Popen
    culler_command: list[str]
    culler_env: dict[str, str]
    log: Path


@pytest.fixture(scope="module")
def hub(hub_prerequisites: str, user_venv: Path, shared_store: str) -> Iterator[Hub]:
    """The deploy config's Hub, with two fresh local users. The idle culler is the deploy
    config's service and role, but the test runs its command itself (with a short timeout),
    so that no server is culled while the other tests use it."""
    work = Path(tempfile.mkdtemp(prefix="smk-hub-"))
    # The admin's limits file (deploy/jupyterhub/limits.md), which every user's kernel reads:
    # in a folder all may read, as /etc/supermachine-kernel is.
    limits_dir = Path(tempfile.mkdtemp(prefix="smk-hub-limits-"))
    os.chmod(limits_dir, 0o755)
    limits_file = limits_dir / "limits.py"
    limits_file.write_text(
        f"c.MicroVMLimits.vms_per_user = {HUB_VMS_PER_USER}\n"
        f"c.MicroVMLimits.memory_per_user = {HUB_MEMORY_PER_USER!r}\n"
        f"c.MicroVMLimits.cpu_weight = {HUB_CPU_WEIGHT}\n"
        f"c.MicroVMLimits.state_dir = {str(limits_dir / 'state')!r}\n"
    )
    os.chmod(limits_file, 0o644)
    users: list[LocalUser] = []
    process: Optional[subprocess.Popen] = None
    try:
        users = [_create_user("smka"), _create_user("smkb")]
        port, hub_port, api_port = free_port(), free_port(), free_port()
        token = secrets.token_hex(32)
        culler_token = secrets.token_hex(32)
        (work / "test_config.py").write_text(
            "c = get_config()  # noqa: F821\n"
            f"load_subconfig({str(DEPLOY_CONFIG)!r})  # noqa: F821\n"
            "culler = next(s for s in c.JupyterHub.services if s['name'] == 'idle-culler')\n"
            "culler.pop('command')\n"
            f"culler['api_token'] = {culler_token!r}\n"
            f"c.JupyterHub.services.append({{'name': 'test-admin', 'api_token': {token!r}}})\n"
            "c.JupyterHub.load_roles.append({'name': 'admin', 'services': ['test-admin']})\n"
        )
        env = dict(
            os.environ,
            SUPERMACHINE_HUB_VENV=str(user_venv),
            SUPERMACHINE_HUB_DATA_DIR=str(work),
            SUPERMACHINE_HUB_PORT=str(port),
            SUPERMACHINE_HUB_HUB_PORT=str(hub_port),
            SUPERMACHINE_HUB_PROXY_API_PORT=str(api_port),
            SUPERMACHINE_HUB_CHP=hub_prerequisites,
            SUPERMACHINE_HUB_USERS=",".join(u.name for u in users),
            SUPERMACHINE_HUB_ACTIVITY_INTERVAL="5",
            SUPERMACHINE_SHARED_CACHE_DIR=shared_store,
            SUPERMACHINE_HUB_IDLE_TIMEOUT="30",
            SUPERMACHINE_HUB_CULL_EVERY="5",
            SUPERMACHINE_LIMITS_FILE=str(limits_file),
        )
        # Read the culler's command as the deploy config defines it.
        culler_command = json.loads(subprocess.run(
            [sys.executable, "-c", _PRINT_CULLER, str(DEPLOY_CONFIG)], env=env, check=True,
            capture_output=True, text=True).stdout)
        log = work / "hub.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [str(VENV / "bin" / "jupyterhub"), "-f", str(work / "test_config.py")],
                cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        api = HubApi(base, token)
        deadline = time.monotonic() + 120
        while True:
            try:
                api.hub("GET", "/")
                break
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Hub did not start:\n{log.read_text()[-4000:]}")
                time.sleep(0.5)
        for u in users:  # created at start-up from allowed_users
            assert api.user_model(u.name)["name"] == u.name
        culler_env = dict(env, JUPYTERHUB_API_TOKEN=culler_token,
                          JUPYTERHUB_API_URL=f"http://127.0.0.1:{hub_port}/hub/api")
        yield Hub(api, users, process, culler_command, culler_env, log)
    finally:
        if process is not None:
            process.terminate()  # cleanup_servers: the Hub stops the users' servers
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for u in users:
            _remove_user(u)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(limits_dir, ignore_errors=True)


_PRINT_CULLER = """
import json, sys
from traitlets.config import Config
c = Config()
ns = {"get_config": lambda: c, "load_subconfig": lambda path: None, "__file__": sys.argv[1]}
exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"), ns)
print(json.dumps(next(s for s in c.JupyterHub.services if s["name"] == "idle-culler")["command"]))
"""
