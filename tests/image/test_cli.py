"""`supermachine-kernel image build|list|rm` on a throw-away cache, and the build's progress
output (bars on a TTY, lines otherwise). Pruning: test_housekeeping.py."""
import io
from pathlib import Path

import pytest

from supermachine_kernel import cli
from supermachine_kernel import images


def run(capfd, *argv: str):
    code = cli.main(list(argv))
    out = capfd.readouterr()
    return code, out.out, out.err


def test_list_empty_cache_says_how_to_build(cache: Path, capfd):
    code, out, _ = run(capfd, "image", "list", "--cache-dir", str(cache))
    assert code == 0
    assert "no images" in out and "image build" in out


def test_unknown_image_name_lists_known_ones(cache: Path, capfd):
    code, _, err = run(capfd, "image", "build", "no-such-image", "--cache-dir", str(cache))
    assert code == 1
    assert "unknown image 'no-such-image'" in err.replace('"', "'")
    assert "default" in err and "minimal" in err


def test_unknown_image_raises_typed_error(cache: Path):
    with pytest.raises(images.ImageError, match="default, minimal") as e:
        images.ensure_image("no-such-image", cache_dir=cache, progress=False)
    assert isinstance(e.value, RuntimeError)


def test_missing_directory_is_a_clear_error(cache: Path, tmp_path: Path):
    with pytest.raises(images.ImageError, match="no such directory"):
        images.ensure_image(str(tmp_path / "nope"), cache_dir=cache, progress=False)


def test_build_list_rm_directory_image(cache: Path, tiny_root: Path, have_kernel, capfd):
    code, out, err = run(capfd, "image", "build", str(tiny_root), "--name", "tiny",
                         "--cache-dir", str(cache))
    assert code == 0, err
    assert "image tiny" in out and "mkfs.erofs" in err

    code, out, _ = run(capfd, "image", "list", "--cache-dir", str(cache))
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:4] == ["NAME", "REF", "DIGEST", "SIZE"]
    assert row.split()[:3] == ["tiny", str(tiny_root), ("recipe:" + images.list_images(cache)[0].hash)[:19]]

    # Built by name later: the cached image follows its directory.
    again = images.ensure_image("tiny", cache_dir=cache, progress=False, require_agent=False)
    assert again.name == "tiny" and Path(again.rootfs).is_file()

    code, out, _ = run(capfd, "image", "rm", "tiny", "--cache-dir", str(cache))
    assert code == 0 and "removed image tiny" in out and "freed" in out
    code, _, err = run(capfd, "image", "rm", "tiny", "--cache-dir", str(cache))
    assert code == 1 and "no image named 'tiny'" in err
    assert images.list_images(cache) == []


def test_changed_directory_rebuilds(cache: Path, tiny_root: Path, have_kernel):
    a = images.ensure_image(str(tiny_root), cache_dir=cache, progress=False, require_agent=False)
    assert a.name == "tiny-root"
    same = images.ensure_image(str(tiny_root), cache_dir=cache, progress=False,
                               require_agent=False)
    assert same.hash == a.hash
    (tiny_root / "etc" / "motd").write_text("changed\n")
    b = images.ensure_image(str(tiny_root), cache_dir=cache, progress=False, require_agent=False)
    assert b.hash != a.hash
    # The old version stays while recently used (another install may still want it).
    assert sorted(i.hash for i in images.list_images(cache)) == sorted([a.hash, b.hash])


def test_initrd_built_with_given_agent(cache: Path, tiny_root: Path, have_kernel, tmp_path):
    agent = tmp_path / "agent"
    agent.write_bytes(b"\x7fELF fake agent")
    p = images.ensure_image(str(tiny_root), cache_dir=cache, progress=False, agent=agent)
    assert p.initrd and Path(p.initrd).is_file()
    assert "virtio_blk" in p.modules and p.modules[-1] == "overlay"
    data = Path(p.initrd).read_bytes()
    assert data.startswith(b"070701") and b"\x7fELF fake agent" in data


def test_missing_agent_is_an_error_when_required(cache: Path, tiny_root: Path, have_kernel,
                                                  tmp_path):
    with pytest.raises(images.ImageError, match="agent"):
        images.ensure_image(str(tiny_root), cache_dir=cache, progress=False,
                            agent=tmp_path / "no-agent")


def test_module_entry_point_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "supermachine_kernel", "image", "--help"],
                         capture_output=True, text=True, check=True)
    assert "build" in out.stdout and "list" in out.stdout and "rm" in out.stdout


def test_build_sends_progress_events_to_a_callable(cache: Path, tiny_root: Path, have_kernel):
    events: list = []
    images.ensure_image(str(tiny_root), cache_dir=cache, progress=events.append,
                        require_agent=False)
    starts = [e["step"] for e in events if e["event"] == "start"]
    ends = {e["step"]: e for e in events if e["event"] == "end"}
    assert "mkfs.erofs" in starts and ends["mkfs.erofs"]["ok"] is True
    assert ends["mkfs.erofs"]["secs"] >= 0
    assert any(e["event"] == "note" and "building rootfs" in e["text"] for e in events)


def test_build_progress_off_sends_nothing(cache: Path, tiny_root: Path, have_kernel, capfd):
    images.ensure_image(str(tiny_root), cache_dir=cache, progress=False, require_agent=False)
    assert capfd.readouterr().err == ""


PULL = [
    {"event": "note", "text": "pull oci:/x ..."},
    {"event": "advance", "task": "download", "done": 0, "total": 2_000_000, "unit": "bytes"},
    {"event": "advance", "task": "download", "done": 2_000_000, "total": 2_000_000, "unit": "bytes"},
    {"event": "advance", "task": "pull", "done": 0, "total": 3_000_000, "unit": "bytes"},
    {"event": "advance", "task": "pull", "done": 1_000_000, "total": 3_000_000, "unit": "bytes"},
    {"event": "advance", "task": "pull", "done": 3_000_000, "total": 3_000_000, "unit": "bytes"},
    {"event": "start", "step": "mkfs.erofs"},
    {"event": "end", "step": "mkfs.erofs", "secs": 1.25, "ok": True},
    {"event": "start", "step": "pip install"},
    {"event": "end", "step": "pip install", "secs": 0.5, "ok": False},
]


def test_progress_lines_without_a_tty():
    from supermachine_kernel.cli.progress import Bars

    out = io.StringIO()
    with Bars("image x", stream=out, tty=False) as bars:
        for e in PULL:
            bars(e)
    assert out.getvalue().splitlines() == [
        "[image x] pull oci:/x ...",
        "[image x] pull: 3.0 MB done",
        "[image x] mkfs.erofs ...",
        "[image x] mkfs.erofs ... 1.2 s",
        "[image x] pip install ...",
        "[image x] pip install ... failed after 0.5 s",
    ]


def test_progress_bars_on_a_tty():
    from supermachine_kernel.cli.progress import Bars, spinner

    out = io.StringIO()
    with Bars("image x", stream=out, tty=True) as bars:
        bars(PULL[1])
        assert "0.00/2.00M" in out.getvalue()  # a blob's download, in bytes
        bars(PULL[2])
        bars(PULL[3])
        bars(PULL[4])
        assert "1.00M/3.00M" in out.getvalue()  # the whole pull
        for e in PULL[5:]:
            bars(e)
    text = out.getvalue()
    assert "[image x] pull: 3.0 MB done" in text and "mkfs.erofs ... 1.2 s" in text
    assert "download: 2.0 MB done" not in text
    with spinner("bake snapshot", stream=out, tty=False):
        pass
    assert "bake snapshot ..." in out.getvalue().splitlines()[-2]
