"""The digest cache: computed once per file identity, prehashed ahead of joins."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from bootcast import page
from bootcast.digests import DigestCache, compute, key_of


def test_compute_matches_hashlib_and_page_crcs() -> None:
    data = os.urandom(10_001)
    digests = compute(data, 1000)
    assert digests.sha256 == hashlib.sha256(data).hexdigest()
    assert list(digests.crcs)[1:] == [
        page.crc32c(data[o : o + 1000]) for o in range(0, 10_001, 1000)
    ]
    assert compute(b"", 1000).crcs.tolist() == [0]


def test_prehash_fills_the_cache_within_budget_and_skips_symlinks(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a" * 5000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"b" * 3000)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.write_bytes(b"secret")
    (tmp_path / "link").symlink_to(outside)
    cache = DigestCache()
    assert cache.prehash(tmp_path, 1400, budget_bytes=1 << 20) == 2
    for name in ("a", "sub/b"):
        key = key_of(os.stat(tmp_path / name), 1400)
        found = cache.get(key)
        assert found is not None
        assert found.sha256 == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    assert cache.get(key_of(os.stat(outside), 1400)) is None
    assert DigestCache().prehash(tmp_path, 1400, budget_bytes=4000) == 1  # stops at budget


def test_a_rewritten_file_gets_new_digests(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"one")
    cache = DigestCache()
    cache.prehash(tmp_path, 1400, budget_bytes=1 << 20)
    before = key_of(os.stat(path), 1400)
    path.write_bytes(b"two!")
    assert key_of(os.stat(path), 1400) != before
    assert cache.get(key_of(os.stat(path), 1400)) is None
