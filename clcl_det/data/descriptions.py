"""Class descriptions: short factual sentences per class, read from JSON files in the repository's
`datasets/descriptions/` folder (`voc.json`, `coco.json`, `shapes.json`).

A file maps class names to lists of sentences; keys starting with "_" are notes and are skipped::

    {"_about": "...", "dog": ["a dog has four legs, a tail and fur.", "..."], ...}

`MODEL.SPA.DESCRIPTIONS` picks the file: a *name* (letters, digits, "_", "-") is a file of the
descriptions folder and can never resolve outside it; a value ending in ".json" or containing a
path separator is a *path* used as given; "" derives the name from the training dataset
(`MetadataCatalog` key `descriptions`, else the dataset name up to its first "_", e.g.
`voc_2007_trainval` -> `voc`). A class without sentences falls back to a template.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..utils.errors import UserError

__all__ = [
    "DescriptionError", "descriptions_dir", "resolve_descriptions_file", "load_descriptions",
    "load_class_descriptions", "class_sentences", "DEFAULT_TEMPLATE",
]

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of a {}."
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_REPO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "datasets", "descriptions")
_INSTALLED_DIR = os.path.join(sys.prefix, "share", "clcl_det", "descriptions")  # setup.py data_files


class DescriptionError(UserError, ValueError):
    """A description file or name is wrong; the message names the key, file and class."""


def descriptions_dir() -> str:
    """The folder that holds the named description files: the repository's datasets/descriptions
    (editable install), else the copy a regular install puts in <prefix>/share/clcl_det."""
    return _REPO_DIR if os.path.isdir(_REPO_DIR) or not os.path.isdir(_INSTALLED_DIR) else _INSTALLED_DIR


def _is_path(spec: str) -> bool:
    return spec.endswith(".json") or "/" in spec or os.sep in spec or bool(os.altsep and os.altsep in spec)


def _named_file(name: str, key: str) -> str:
    """`<descriptions_dir>/<name>.json` for a sanitised name; never a file outside the folder."""
    if not _NAME_RE.fullmatch(name):
        raise DescriptionError(
            f"{key} '{name}' is not a description name (letters, digits, '_' and '-' only, e.g. 'voc'); "
            f"give a path ending in .json for a file elsewhere"
        )
    root = os.path.realpath(descriptions_dir())
    path = os.path.realpath(os.path.join(root, name + ".json"))
    if os.path.commonpath([root, path]) != root:  # e.g. a symlink in the folder pointing elsewhere
        raise DescriptionError(f"{key} '{name}' resolves outside {root}; refusing to read it")
    return path


def resolve_descriptions_file(spec: str, dataset_names: Sequence[str] = (),
                              key: str = "MODEL.SPA.DESCRIPTIONS") -> Optional[str]:
    """The description file for `spec` (name, path or "" = derived from `dataset_names`), or None
    when "" finds no file. A name or path that does not exist is an error."""
    spec = str(spec).strip()
    if spec:
        if _is_path(spec):
            if not os.path.isfile(spec):
                raise DescriptionError(f"{key}: description file '{spec}' does not exist")
            return spec
        path = _named_file(spec, key)
        if not os.path.isfile(path):
            known = sorted(os.path.splitext(f)[0] for f in os.listdir(descriptions_dir()) if f.endswith(".json")) \
                if os.path.isdir(descriptions_dir()) else []
            raise DescriptionError(f"{key} '{spec}': no {spec}.json in {descriptions_dir()} "
                                   f"(known: {', '.join(known) or 'none'})")
        return path
    from .catalog import MetadataCatalog

    for dataset in dataset_names:
        derived = MetadataCatalog.get(dataset).get("descriptions") or dataset.split("_")[0].lower()
        if not _NAME_RE.fullmatch(derived):
            continue
        path = _named_file(derived, key)
        if os.path.isfile(path):
            return path
    return None


def load_descriptions(path: str) -> Dict[str, List[str]]:
    """{class name: [sentence, ...]} of a description file, checked."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise DescriptionError(f"cannot read description file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DescriptionError(f"description file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DescriptionError(f"description file {path} must hold an object {{class name: [sentences]}}, "
                               f"got {type(data).__name__}")
    out: Dict[str, List[str]] = {}
    for name, sentences in data.items():
        if name.startswith("_"):
            continue
        if not isinstance(sentences, list) or not all(isinstance(s, str) and s.strip() for s in sentences):
            raise DescriptionError(f"description file {path}: class '{name}' must map to a list of non-empty "
                                   f"sentences")
        out[name] = [s.strip() for s in sentences]
    return out


def load_class_descriptions(value: str, train_datasets: Sequence[str],
                            key: str = "MODEL.SPA.DESCRIPTIONS") -> Dict[str, List[str]]:
    """The descriptions named by `value` (the config key `key`): a name, a .json path, or "" for
    the file of `train_datasets` ({} when none is found for "")."""
    path = resolve_descriptions_file(value, train_datasets, key)
    if path is None:
        logger.warning(f"no class-description file for DATASETS.TRAIN {tuple(train_datasets)} in "
                       f"{descriptions_dir()}; every class uses the template (set {key})")
        return {}
    logger.info(f"class descriptions from {path}")
    return load_descriptions(path)


def class_sentences(names: Sequence[str], descriptions: Mapping[str, Sequence[str]],
                    template: str = DEFAULT_TEMPLATE) -> Tuple[List[List[str]], List[str]]:
    """Per class its sentences (the template filled with the name when it has none), and the
    classes that fell back to the template."""
    sentences, missing = [], []
    for n in names:
        given = list(descriptions.get(n, ()))
        if not given:
            missing.append(n)
            given = [template.format(n)]
        sentences.append(given)
    return sentences, missing
