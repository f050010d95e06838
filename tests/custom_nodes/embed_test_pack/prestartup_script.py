"""Runs before ComfyUI imports any node, as native main.py runs it: registers
a model folder, as packs do here (the node reports that it exists)."""

import folder_paths

folder_paths.folder_names_and_paths["embed_test_prestartup"] = ([], {".txt"})
