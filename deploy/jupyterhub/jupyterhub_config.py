"""JupyterHub on one host: every user's notebooks run in "Python (microVM)" kernels.

Local users (PAM), the stock LocalProcessSpawner (each user's server and its kernels and QEMU
processes run as that user), only the microVM kernelspecs offered, and jupyterhub-idle-culler
stopping idle servers (which ends their VMs). The guide is README.md beside this file.

Settings an admin changes are read from the environment so that the tests can run this very
file (tests/hub/): SUPERMACHINE_HUB_VENV (the virtualenv that holds jupyterhub, the kernel and
its kernelspec; default: the one running the Hub), SUPERMACHINE_HUB_IP / _PORT, _DATA_DIR
(database and cookie secret), SUPERMACHINE_HUB_IDLE_TIMEOUT (seconds), SUPERMACHINE_HUB_USERS
(comma-separated allowed users; empty: members of the group jupyterhub-users).
SUPERMACHINE_LIMITS_FILE names the limits file when it is not /etc/supermachine-kernel/limits.py.
"""
import os
import sys

c = get_config()  # noqa: F821 - provided by JupyterHub when it loads this file

env = os.environ.get
venv = env("SUPERMACHINE_HUB_VENV") or sys.prefix
data_dir = env("SUPERMACHINE_HUB_DATA_DIR") or "/srv/jupyterhub"

# -- the Hub and its proxy ------------------------------------------------------------------
c.JupyterHub.ip = env("SUPERMACHINE_HUB_IP", "127.0.0.1")
c.JupyterHub.port = int(env("SUPERMACHINE_HUB_PORT", "8000"))
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.db_url = f"sqlite:///{os.path.join(data_dir, 'jupyterhub.sqlite')}"
c.JupyterHub.cookie_secret_file = os.path.join(data_dir, "jupyterhub_cookie_secret")
if env("SUPERMACHINE_HUB_HUB_PORT"):
    c.JupyterHub.hub_port = int(env("SUPERMACHINE_HUB_HUB_PORT"))
if env("SUPERMACHINE_HUB_PROXY_API_PORT"):
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{env('SUPERMACHINE_HUB_PROXY_API_PORT')}"
if env("SUPERMACHINE_HUB_CHP"):  # configurable-http-proxy, if not on PATH
    c.ConfigurableHTTPProxy.command = [env("SUPERMACHINE_HUB_CHP")]

# -- who may log in: local accounts --------------------------------------------------------
c.JupyterHub.authenticator_class = "jupyterhub.auth.PAMAuthenticator"
users = [u for u in (env("SUPERMACHINE_HUB_USERS") or "").split(",") if u]
if users:
    c.Authenticator.allowed_users = set(users)
else:
    c.PAMAuthenticator.allowed_groups = {"jupyterhub-users"}

# -- each user's server: their own uid, only the microVM kernels ---------------------------
c.JupyterHub.spawner_class = "jupyterhub.spawner.LocalProcessSpawner"
c.Spawner.cmd = [os.path.join(venv, "bin", "jupyterhub-singleuser")]
c.Spawner.default_url = "/lab"
c.Spawner.args = [
    # The unisolated ipykernel ("python3") is neither listed nor startable: jupyter_client's
    # allowlist only filters the listing; this package's manager also refuses to start others.
    "--ServerApp.kernel_spec_manager_class=supermachine_kernel.hub.AllowlistKernelSpecManager",
    "--KernelSpecManager.ensure_native_kernel=False",
    "--KernelSpecManager.allowed_kernelspecs=python-microvm",
    "--MappingKernelManager.default_kernel_name=python-microvm",
    # A terminal would be a shell on the host, outside any VM.
    "--ServerApp.terminals_enabled=False",
]
# The kernel hands its guest only what `c.MicroVMKernel.guest_env` names: JUPYTERHUB_API_TOKEN,
# JPY_API_TOKEN and the other JUPYTERHUB_* variables stay in the user's server and kernel
# process (as that user), never in the VM. The host-wide image store is found through this
# variable (default /var/cache/supermachine-kernel; see the guide).
c.Spawner.env_keep = ["PATH", "LANG", "LC_ALL", "SUPERMACHINE_SHARED_CACHE_DIR", "SUPERMACHINE_ACCEL"]
c.Spawner.environment = {
    "PATH": os.path.join(venv, "bin") + ":/usr/local/bin:/usr/bin:/bin",
    # How often the server reports its last activity (kernel messages included) to the Hub,
    # where the culler reads it (jupyterhub's default: 300 s).
    "JUPYTERHUB_ACTIVITY_INTERVAL": env("SUPERMACHINE_HUB_ACTIVITY_INTERVAL", "60"),
}
c.Spawner.start_timeout = int(env("SUPERMACHINE_HUB_START_TIMEOUT", "120"))
c.Spawner.http_timeout = int(env("SUPERMACHINE_HUB_START_TIMEOUT", "120"))

# -- limits per user and per host (limits.md): on when the admin's limits file exists -----------
# The Hub reads the same file as every kernel. Before each server starts, the hook (as root)
# makes the user's cgroup with its memory ceiling and CPU share and hands it to the user; the
# spawner starts the server inside it, so the user's kernels and QEMU processes stay below it.
from supermachine_kernel import limits as _limits  # noqa: E402 - imports nothing heavy

if _limits.active():
    load_subconfig(_limits.limits_file())  # noqa: F821 - provided by JupyterHub
    from supermachine_kernel.limits.hub import pre_spawn_hook  # noqa: E402

    c.Spawner.pre_spawn_hook = pre_spawn_hook
    c.JupyterHub.spawner_class = "supermachine_kernel.limits.hub.LimitedLocalProcessSpawner"
    c.Spawner.env_keep.append(_limits.FILE_ENV)

# -- idle servers are stopped, and with them their kernels and VMs ---------------------------
idle_timeout = env("SUPERMACHINE_HUB_IDLE_TIMEOUT", "3600")
c.JupyterHub.services = [
    {
        "name": "idle-culler",
        "command": [
            os.path.join(venv, "bin", "python"), "-m", "jupyterhub_idle_culler",
            f"--timeout={idle_timeout}",
            f"--cull-every={env('SUPERMACHINE_HUB_CULL_EVERY', '300')}",
        ],
    }
]
c.JupyterHub.load_roles = [
    {
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    }
]
