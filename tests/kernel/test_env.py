"""No host secret (or any of the kernel's environment) reaches the guest."""
from __future__ import annotations

import os

from .harness import KERNEL, Kernel, stdout_of


def test_kernel_environment_does_not_leak():
    env = dict(os.environ)
    env.update({
        "JUPYTERHUB_API_TOKEN": "hub-token-must-not-leak",
        "JPY_API_TOKEN": "jpy-token-must-not-leak",
        "AWS_SECRET_ACCESS_KEY": "aws-must-not-leak",
        "SOME_HOST_ONLY_VAR": "host-only",
    })
    k = Kernel(KERNEL, env=env)
    try:
        reply, outputs = k.execute(
            "import os\n"
            "blob = open('/proc/self/environ', 'rb').read().decode(errors='replace')\n"
            "print(sorted(os.environ))\n"
            "print('LEAK' if any(s in blob or s in str(os.environ) for s in "
            "('must-not-leak', 'host-only')) else 'CLEAN')")
        assert reply["status"] == "ok", reply
        out = stdout_of(outputs)
        assert "CLEAN" in out, out
        for name in ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "AWS_SECRET_ACCESS_KEY",
                     "SOME_HOST_ONLY_VAR"):
            assert name not in out
    finally:
        k.shutdown()
