"""Cache behaviour: concurrent builders share one build; interrupted builds leave nothing."""
import threading
from pathlib import Path

from supermachine_kernel import images


def test_concurrent_builders_share_one_build(cache: Path, tiny_root: Path, have_kernel):
    results, errors = [], []

    def build():
        try:
            results.append(images.ensure_image(str(tiny_root), cache_dir=cache, progress=False,
                                               require_agent=False))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len({(r.hash, r.rootfs) for r in results}) == 1
    assert len(images.list_images(cache)) == 1


def test_leftovers_of_an_interrupted_build_are_ignored_and_cleaned(cache: Path, tiny_root: Path,
                                                                  have_kernel):
    # What a build killed half-way leaves: a .tmp dir next to the final place, a scratch tree.
    name_dir = cache / "images" / "tiny-root"
    (name_dir / ".tmp-0123456789abcdef-99999").mkdir(parents=True)
    (name_dir / ".tmp-0123456789abcdef-99999" / "rootfs.erofs").write_bytes(b"half")
    (cache / "tmp" / "build-tiny-root-99999" / "root").mkdir(parents=True)
    assert images.list_images(cache) == []
    p = images.ensure_image(str(tiny_root), cache_dir=cache, progress=False, require_agent=False)
    assert sorted(x.name for x in name_dir.iterdir()) == [p.hash]
    assert not (cache / "tmp" / "build-tiny-root-99999").exists()
