"""The limits file (supermachine_kernel/limits/config.py): read from the admin's file only,
sizes parsed, bad values refused with the file's name."""
from __future__ import annotations

import pytest

from supermachine_kernel.limits.config import (
    ConfigError,
    MicroVMLimits,
    load,
    parse_mib,
)


def test_no_file_means_no_limits(tmp_path):
    assert load(str(tmp_path / "absent.py")) is None


def test_file_sets_the_traits(tmp_path):
    path = tmp_path / "limits.py"
    path.write_text("c.MicroVMLimits.vms_per_user = 3\n"
                    "c.MicroVMLimits.memory_per_user = '4G'\n"
                    "c.MicroVMLimits.cpu_weight = 50\n"
                    "c.MicroVMKernel.memory_mib = 4096  # other sections are ignored\n")
    limits = load(str(path))
    assert limits is not None
    assert limits.vms_per_user == 3 and limits.memory_per_user_mib == 4096
    assert limits.summary() == {"vms_per_user": 3, "memory_per_user": "4G", "cpu_weight": 50}
    assert limits.any_set()
    assert not MicroVMLimits().any_set()


@pytest.mark.parametrize("text, match", [
    ("c.MicroVMLimits.memory_per_user = 'lots'", "expected a size"),
    ("c.MicroVMLimits.cpu_weight = 20000", "1-10000"),
    ("c.MicroVMLimits.vms_per_user = 'two'", "limits.py"),
    ("c.MicroVMLimits.cgroups = 'v3'", "limits.py"),
    ("this is not python", "cannot be loaded"),
])
def test_bad_values_are_refused_naming_the_file(tmp_path, text, match):
    path = tmp_path / "limits.py"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=match):
        load(str(path))


def test_sizes():
    assert parse_mib(512) == 512
    assert parse_mib("512M") == 512 and parse_mib("2G") == 2048 and parse_mib("1.5GiB") == 1536
    assert parse_mib("0") == 0 and parse_mib("1T") == 1024 * 1024
    with pytest.raises(ValueError):
        parse_mib("12 parsecs")
