"""Task folders made ahead (comfy_embed.tasklog.spares): a claim renames a
spare into place, still exclusive across instances, its lease renewed and
indexed; where renames cannot be used, claims make folders as before; spares
of dead instances are swept. Real files on disk."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from comfy_embed.tasklog import spares as spares_module
from comfy_embed.tasklog.log import TaskLog
from comfy_embed.tasklog.spares import SPARE_FOLDER
from tests.tasklog.test_log import ev, final

pytestmark = pytest.mark.skipif(spares_module._renameat2 is None, reason="no renameat2 here")


def _spares(root: Path) -> list[str]:
    folder = root / SPARE_FOLDER
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def test_a_claim_renames_a_spare_with_its_lease_into_place(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    assert tl.wants_spares
    tl.prepare_claims()
    assert not tl.wants_spares  # enough ready: no thread hop after the next answer
    made = _spares(tmp_path)
    assert len(made) == 2  # kept ready: two claims in a row find one
    inodes = {os.stat(tmp_path / SPARE_FOLDER / n).st_ino: n for n in made}
    old = time.time() - 600
    for name in made:  # made long ago: the claim renews the lease
        os.utime(tmp_path / SPARE_FOLDER / name / "owner.json", (old, old))
    assert tl.claim("t")
    assert tl.wants_spares  # one taken: the next answer makes one
    folder = tmp_path / "t"
    assert os.stat(folder).st_ino in inodes  # a spare, renamed
    assert len(_spares(tmp_path)) == 1
    lease = folder / "owner.json"
    assert tl.owner("t") == "i1" and time.time() - lease.stat().st_mtime < 60
    assert os.stat(tmp_path / "@index" / "open" / "t").st_ino == lease.stat().st_ino
    assert tl.task_ids() == ["t"]  # spares are no tasks
    # Still exclusive: a second claim of the name fails and keeps its spare.
    assert not tl.claim("t") and not TaskLog(tmp_path, "i2").claim("t")
    assert len(_spares(tmp_path)) == 1
    # The task runs and ends as any other.
    tl.extend("t", [(1, {"type": "serverless_api", "data": {"status": "success"}})])
    assert TaskLog(tmp_path, "reader").read("t")[-1][0] == 1
    assert tl.recover_orphans() == [] and tl.open_index.names() == []
    # With none ready, a claim makes its folder.
    assert tl.claim("u") and tl.claim("v") and tl.owner("v") == "i1"
    assert _spares(tmp_path) == []
    tl.prepare_claims()
    tl.close()  # the instance stops: its spares go
    assert _spares(tmp_path) == []


def test_two_instances_with_spares_claim_one_name_once(tmp_path: Path) -> None:
    a, b = TaskLog(tmp_path, "a"), TaskLog(tmp_path, "b")
    a.prepare_claims()
    b.prepare_claims()
    results = [a.claim(f"t{i}") if i % 2 else b.claim(f"t{i}") for i in range(4)]
    assert results == [True] * 4
    for i in range(4):
        assert not a.claim(f"t{i}") and not b.claim(f"t{i}")
        assert a.owner(f"t{i}") == ("a" if i % 2 else "b")


def test_where_the_rename_is_refused_claims_make_folders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(src: str, dst: str) -> None:
        raise OSError(errno.EINVAL, "Invalid argument", dst)
    monkeypatch.setattr(spares_module, "rename_noreplace", refused)
    tl = TaskLog(tmp_path, "i1")
    tl.prepare_claims()
    assert tl.claim("t") and tl.owner("t") == "i1"
    assert len(_spares(tmp_path)) == 1  # the refused one is gone
    assert not tl.wants_spares
    tl.prepare_claims()  # and no more are made
    assert len(_spares(tmp_path)) == 1
    assert tl.claim("u") and not tl.claim("u")


def test_spares_of_dead_instances_are_swept(tmp_path: Path) -> None:
    dead, alive = TaskLog(tmp_path, "dead"), TaskLog(tmp_path, "alive")
    dead.prepare_claims()
    alive.prepare_claims()
    old = time.time() - 7200
    for name in _spares(tmp_path):
        os.utime(tmp_path / SPARE_FOLDER / name, (old, old))
    alive.recover_orphans()  # sweeps: not its own ready ones
    left = _spares(tmp_path)
    assert len(left) == 2 and all(n.startswith("alive-") for n in left)
    alive.recover_orphans(now=time.time())
    assert len(_spares(tmp_path)) == 2
    # An instance whose spares were swept (idle for an hour) makes folders again.
    assert dead.claim("t") and dead.owner("t") == "dead"


def test_the_final_is_written_into_the_file_its_spare_folder_holds(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.prepare_claims()
    assert tl.claim("t")
    inode = os.stat(tmp_path / "t" / ".tmp-final").st_ino
    tl.extend("t", [(1, ev(1)), (2, final())], settle_later=True)
    assert os.stat(tmp_path / "t" / "final").st_ino == inode  # that file, now named
    assert sorted(os.listdir(tmp_path / "t")) == ["final", "owner.json"]
    assert TaskLog(tmp_path, "reader").read("t") == [(1, ev(1)), (2, final())]
    # A task released without its final, or refused, leaves no spare file behind.
    tl.prepare_claims()
    assert tl.claim("released") and tl.claim("discarded")
    tl.release("released")
    tl.discard("discarded")
    assert os.listdir(tmp_path / "released") == ["owner.json"]
    assert not (tmp_path / "discarded").exists()
    # A final that lost to another writer's leaves its file unused, and deleted.
    tl.prepare_claims()
    assert tl.claim("raced")
    TaskLog(tmp_path, "recovery").append("raced", final("error"))
    tl.extend("raced", [(3, final())], settle_later=True)
    assert TaskLog(tmp_path, "reader").read("raced")[-1][1]["data"]["status"] == "error"
    assert ".tmp-final" not in os.listdir(tmp_path / "raced")


def test_where_hard_links_are_refused_the_claim_still_indexes_and_stops_using_spares(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.prepare_claims()
    real = os.link

    def link(src: object, dst: object, *a: object, **kw: object) -> None:
        if "@index" in str(dst):
            raise OSError(errno.EPERM, "Operation not permitted", str(dst))
        real(src, dst, *a, **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(os, "link", link)
    assert tl.claim("t") and tl.owner("t") == "i1"
    assert tl.open_index.names() == ["t"]  # an entry of its own
    assert tl.claim("u") and len(_spares(tmp_path)) == 1  # a folder made: the spare waits
    tl.prepare_claims()
    assert len(_spares(tmp_path)) == 1  # and no more are made
