"""The node classes a pack declares, read from its source (never imported)."""

from __future__ import annotations

from pathlib import Path

from comfy_embed.environment.nodes import declared_nodes


def test_mappings_by_literal_by_key_and_merged_from_modules(tmp_path: Path) -> None:
    pack = tmp_path / "pack"
    (pack / "sub").mkdir(parents=True)
    (pack / "__init__.py").write_text(
        "from .image import IMAGE_CLASS_MAPPINGS\n"
        "NODE_CLASS_MAPPINGS = {'Top': object, **IMAGE_CLASS_MAPPINGS}\n"
        "NODE_CLASS_MAPPINGS['ByKey'] = object\n"
        "NODE_DISPLAY_NAME_MAPPINGS = {'NotANode': 'x'}\n"
        "raise ImportError('fails at import: still read')\n")
    (pack / "sub" / "image.py").write_text("IMAGE_CLASS_MAPPINGS: dict = {'Img+': object}\n"
                                           "pattern = '\\d'  # an invalid escape: a warning\n")
    (pack / "broken.py").write_text("def (:\n")
    assert declared_nodes(pack) == {"Top", "ByKey", "Img+"}
    assert declared_nodes(pack / "sub" / "image.py") == {"Img+"}
    assert declared_nodes(tmp_path / "absent") == frozenset()
