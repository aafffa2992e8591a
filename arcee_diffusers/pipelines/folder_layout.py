"""The layout of a saved pipeline folder: re-export files that let plain diffusers find our classes.

diffusers 0.42 resolves a pipeline class only in its own namespace (``_class_name``) or in a file inside the
folder, so ``ArceeZigmaPipeline.save_pretrained`` writes one-line re-export files that import the real
classes from ``arcee_diffusers``, and ``model_index.json`` names them:

- ``pipeline_arcee_zigma.py`` -> ``ArceeZigmaPipeline`` (``_class_name``)
- ``transformer/modeling_arcee_zigma.py`` -> ``ArceeZigmaTransformer``
- ``scheduler/scheduling_gvp_flow.py`` -> ``FlowMatchGVPScheduler`` (only when the scheduler is ours)

``DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)`` then returns our real classes.
``ArceeZigmaPipeline.from_pretrained`` reads this layout and the native one (module paths, as diffusers'
``save_pretrained`` writes them) without running any file of the folder (``to_native_layout``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..models import ArceeZigmaTransformer
from ..schedulers import FlowMatchGVPScheduler

# model_index.json key -> (re-export module, class name)
REEXPORTS: dict[str, tuple[str, str]] = {
    "_class_name": ("pipeline_arcee_zigma", "ArceeZigmaPipeline"),
    "transformer": ("modeling_arcee_zigma", "ArceeZigmaTransformer"),
    "scheduler": ("scheduling_gvp_flow", "FlowMatchGVPScheduler"),
}
# the module that defines each component class, as diffusers' save_pretrained records it
DEFINING_MODULES = {cls.__name__: cls.__module__ for cls in (ArceeZigmaTransformer, FlowMatchGVPScheduler)}
REEXPORT_SOURCE = '''"""Loads {class_name} from the arcee-diffusers package; no other code here runs."""

from arcee_diffusers import {class_name}  # noqa: F401
'''


def _entry_class(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        return entry[1]
    return None


def write_reexport_layout(folder: str | os.PathLike) -> None:
    """Turn a saved pipeline folder into the re-export layout (files, and `model_index.json` naming them)."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    for key, (module, class_name) in REEXPORTS.items():
        if _entry_class(index.get(key)) != class_name:
            continue
        target = folder if key == "_class_name" else folder / key
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{module}.py").write_text(REEXPORT_SOURCE.format(class_name=class_name))
        index[key] = [module, class_name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def to_native_layout(config: dict[str, Any]) -> dict[str, Any]:
    """Map a re-export `model_index.json` dict back to our own modules, in place (and return it).

    Components get the defining module, as diffusers' `save_pretrained` writes it: diffusers finds a
    component's base class (hence its loading method) among the names of that module.
    """
    for key, (module, class_name) in REEXPORTS.items():
        entry = config.get(key)
        if isinstance(entry, (list, tuple)) and list(entry) == [module, class_name]:
            config[key] = class_name if key == "_class_name" else [DEFINING_MODULES[class_name], class_name]
    return config
