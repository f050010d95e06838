"""Every file name a node resolves in the input folder, whatever its input's
marker, under one rule.

How the class is found: ComfyUI's nodes turn a file-name input into a path
with ``folder_paths.get_annotated_filepath`` (to open it) and check it with
``folder_paths.exists_annotated_filepath`` (in their VALIDATE_INPUTS);
both go through ``annotated_filepath``, which joins the name with the input
folder (an absolute name wins) or, for a ``[output]`` / ``[temp]`` suffix,
with that folder. LoadImage, LoadImageMask, LoadAudio and LoadVideo carry
an upload marker and are checked before ComfyUI sees the request, but
WebcamCapture (``WEBCAM``), RecordAudio (``AUDIO_RECORD``), Load3D
(``LOAD_3D``), LoadLatent and packs' nodes carry none: so :func:`install`
wraps these two functions, and every such input, marked or not, gets the
same rule:

* the name must resolve (links followed) inside the input folder: absolute
  paths elsewhere, ``..`` and the ``[output]`` / ``[temp]`` annotations are
  refused (ComfyUI's own nodes pass an absolute path inside the input folder
  on to LoadImage, so such a path is judged by where it leads);
* inside ``serverless/`` (other callers' materialised inputs) only the
  folders granted to the graph being validated or run (:func:`granting`:
  those its upload inputs were materialised into) may be read.

A refused name fails as a missing one does, whether or not it exists:
``exists_annotated_filepath`` answers False (VALIDATE_INPUTS' "Invalid image
file: ...", a 400 naming node and input), ``get_annotated_filepath`` raises.
The check is a few string tests and one ``realpath``.
"""

from __future__ import annotations

import contextlib
import os
import re
from contextvars import ContextVar
from types import ModuleType
from typing import Any, Callable, Iterator

from comfy_embed.inputs.fetch import MAX_NAME_BYTES, SUBFOLDER

__all__ = ["install", "granting", "granted_folders", "FileNameRefused"]

#: ``serverless/<folder>`` prefixes the graph now validated or run may read.
_granted: ContextVar[frozenset[str]] = ContextVar("comfy_embed_granted_inputs",
                                                   default=frozenset())
#: What the preparer writes into an upload input: ``serverless/<folder>/<sha256>.<ext>``.
_MATERIALISED = re.compile(rf"({SUBFOLDER}/[A-Za-z0-9._-]{{1,160}})/[0-9a-f]{{64}}\.[a-z0-9]{{1,8}}")


class FileNameRefused(ValueError):
    """A node was given a file name outside what a request may read."""


def granted_folders(values: Iterator[str]) -> frozenset[str]:
    """The ``serverless/<folder>`` of every materialised name among ``values``
    (the upload inputs of a prepared graph: requests cannot name ``serverless/``
    there, so such a value was written by the preparer)."""
    out = set()
    for value in values:
        m = _MATERIALISED.fullmatch(value)
        if m and ".." not in m.group(1).split("/"):
            out.add(m.group(1))
    return frozenset(out)


@contextlib.contextmanager
def granting(folders: frozenset[str]) -> Iterator[None]:
    """Let the code run inside (ComfyUI's validation or execution of one
    graph: its tasks inherit the context) read ``folders`` of ``serverless/``."""
    token = _granted.set(folders)
    try:
        yield
    finally:
        _granted.reset(token)


def refusal(name: Any, annotated: Callable[[str], tuple[str, str | None]],
            input_dir: str, default_dir: str | None = None) -> str | None:
    """Why ``name`` may not be read (None: it may). An unannotated name is
    judged in ``default_dir`` when a node gives one, as ComfyUI joins it."""
    if not isinstance(name, str):
        return None  # ComfyUI fails on it by itself
    if len(name) > MAX_NAME_BYTES or "\x00" in name:
        return "not a usable file name"
    bare, base = annotated(name)
    if base is not None and os.path.realpath(base) != os.path.realpath(input_dir):
        return "only files in the input folder may be used"
    if not bare.strip() or ".." in bare.split("/"):
        return "may not leave the input folder"
    root = os.path.realpath(base or default_dir or input_dir)
    try:
        path = os.path.realpath(os.path.join(root, bare))
    except (OSError, ValueError):
        return "not a usable file name"
    if path == root or not path.startswith(root + os.sep):
        return "only files in the input folder may be used"
    relative = path[len(root) + 1:]
    if relative.split(os.sep, 1)[0] == SUBFOLDER:
        if not any(relative.startswith(folder + "/") for folder in _granted.get()):
            return f"the {SUBFOLDER}/ folder is reserved for inputs sent inline or by URL"
    return None


def install(folder_paths: ModuleType) -> None:
    """Wrap ``folder_paths``' two resolving functions with :func:`refusal`
    (once; a second call is a no-op)."""
    if getattr(folder_paths, "_comfy_embed_guarded", False):
        return
    annotated = folder_paths.annotated_filepath
    original_get = folder_paths.get_annotated_filepath
    original_exists = folder_paths.exists_annotated_filepath

    def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
        why = refusal(name, annotated, folder_paths.get_input_directory(), default_dir)
        if why is not None:
            shown = name if len(name) <= 120 else name[:120] + "..."
            raise FileNameRefused(f"file name {shown!r} refused: {why}")
        return str(original_get(name, default_dir))

    def exists_annotated_filepath(name: str) -> bool:
        if refusal(name, annotated, folder_paths.get_input_directory()) is not None:
            return False  # as a missing file: no answer tells what exists outside
        return bool(original_exists(name))

    setattr(folder_paths, "get_annotated_filepath", get_annotated_filepath)
    setattr(folder_paths, "exists_annotated_filepath", exists_annotated_filepath)
    setattr(folder_paths, "_comfy_embed_guarded", True)
