"""A snapshot whose metadata.json was edited is refused with the field named (issue 16 item 5):
an edited memory size used to be reported as a bare "QEMU command line fingerprint" mismatch.
The memory size shapes the QEMU command line the restore would use, and the snapshot records
the command line it was taken with, so the refusal names the option, both values and the
field. Real microVMs."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from supermachine_kernel import api

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> str:
    img = api.Image.build(progress=False)
    seed = img._take_seed()
    if seed is not None:
        seed.release()
    path = str(tmp_path_factory.mktemp("meta") / "snap")
    with img.boot() as vm:
        vm.snapshot(path)
    return path


def edited_copy(src: str, dst: str, edit) -> str:
    """`src` with an edited metadata.json (its data files hard-linked, not copied)."""
    os.mkdir(dst)
    for name in os.listdir(src):
        if name != "metadata.json":
            os.link(os.path.join(src, name), os.path.join(dst, name))
    meta_path = os.path.join(dst, "metadata.json")
    shutil.copyfile(os.path.join(src, "metadata.json"), meta_path)
    with open(meta_path) as f:
        meta = json.load(f)
    edit(meta)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return dst


def test_edited_memory_size_is_refused_naming_the_field(snapshot, tmp_path):
    with open(os.path.join(snapshot, "metadata.json")) as f:
        meta = json.load(f)
    mib = meta["machine"]["memory_mib"]
    assert meta["machine"]["cmdline"][:2] == ["-M", meta["machine"]["cmdline"][1]]  # recorded
    bad = edited_copy(snapshot, str(tmp_path / "bigger"),
                      lambda m: m["machine"].__setitem__("memory_mib", mib * 2))
    image = api.Image.from_snapshot(bad)  # the files themselves are intact
    with pytest.raises(api.SnapshotError) as info:
        image.boot()
    message = str(info.value)
    assert "machine.memory_mib" in message, message
    assert f"-m {mib}M" in message and f"-m {mib * 2}M" in message, message
    assert "fingerprint" not in message
    with pytest.raises(api.SnapshotError, match="machine.memory_mib"):
        api._core.snapshot_info(bad, check_host=True)


def test_edited_vcpus_name_their_field_too(snapshot, tmp_path):
    bad = edited_copy(snapshot, str(tmp_path / "vcpus"),
                      lambda m: m["machine"].__setitem__("vcpus", m["machine"]["vcpus"] + 1))
    with pytest.raises(api.SnapshotError, match=r"option -smp .*machine\.vcpus"):
        api.Image.from_snapshot(bad).boot()


def test_the_unedited_snapshot_still_restores(snapshot):
    with api.Image.from_snapshot(snapshot).boot() as vm:
        assert vm.exec(["true"]).exit_code == 0
