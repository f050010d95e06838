"""comfy_embed.tasks: how a failed run's error reads to clients (issue 25, items 12 and 14)."""

from __future__ import annotations

from pathlib import Path

from comfy_embed.errors import ExecutionFailed, StorageUnavailable
from comfy_embed.outcome import Outcome
from comfy_embed.tasks import _outcome_error, scrub_paths

FOLDERS = {"<output>": Path("/srv/data/output"), "<input>": Path("/srv/data/input"),
           "<base>": Path("/srv/data")}


def failed(exception_type: str, message: str) -> Outcome:
    return Outcome(success=False, interrupted=False, outputs={},
                   error={"node_id": "9", "node_type": "SaveImage", "exception_type": exception_type,
                          "exception_message": message,
                          "traceback": [f"  File x, in save: {message}"]})


def test_an_output_write_failure_is_storage_unavailable_without_path() -> None:
    for kind, msg in (("FileExistsError", "[Errno 17] File exists: '/srv/data/output/t1'"),
                      ("OSError", "[Errno 30] Read-only file system: '/mnt/elsewhere/x.png'"),
                      ("OSError", "[Errno 28] No space left on device")):
        e = _outcome_error(failed(kind, msg), None, FOLDERS)
        assert isinstance(e, StorageUnavailable) and e.type == "storage_unavailable", e
        assert "/srv" not in e.message and "/mnt" not in e.message
        assert "output folder" in e.message


def test_other_errors_name_server_folders_by_role() -> None:
    e = _outcome_error(failed("FileNotFoundError",
                              "[Errno 2] No such file: '/srv/data/input/a.png'"), None, FOLDERS)
    assert isinstance(e, ExecutionFailed)
    text = repr(e.to_dict())
    assert "/srv" not in text and "<input>/a.png" in e.message
    e = _outcome_error(failed("ValueError", "bad size"), None, FOLDERS)
    assert isinstance(e, ExecutionFailed) and "bad size" in e.message


def test_scrub_paths_longest_folder_first() -> None:
    assert scrub_paths({"a": ["/srv/data/output/t/x.png", 3]}, FOLDERS) == {"a": ["<output>/t/x.png", 3]}
    assert scrub_paths("/srv/data/models/m", FOLDERS) == "<base>/models/m"
