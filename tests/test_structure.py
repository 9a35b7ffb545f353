"""Who may do what: user errors share one base found by subclassing, data does not read method
keys, and every seed follows one rule."""
from __future__ import annotations

import ast
import logging
import os

import clcl_det.continual  # noqa: F401  (defines the error types of every layer)
from clcl_det.config import ConfigError
from clcl_det.utils import seed as seed_mod
from clcl_det.utils.errors import UserError, user_errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project_imports(path: str) -> set:
    """Modules a file imports from the package (absolute names)."""
    pkg = os.path.relpath(os.path.dirname(path), REPO).replace(os.sep, ".")
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
            out.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clcl_det"):
            out.add(node.module)
    return out


def test_user_errors_share_one_base_and_errors_py_imports_nothing_above_config():
    names = {t.__name__ for t in user_errors()}
    assert {"ConfigError", "SplitError", "DatasetMissingError", "COCOFormatError", "ImageReadError", "CheckpointError",
            "RunStateError", "NonFiniteLossError", "DescriptionError", "HookNameError", "LifeCycleError"} <= names
    assert all(issubclass(t, UserError) for t in user_errors())
    assert issubclass(ConfigError, ValueError), "existing `except ValueError` still catch it"
    imports = _project_imports(os.path.join(REPO, "clcl_det", "utils", "errors.py"))
    assert imports == {"clcl_det.config.errors"}, imports


def test_descriptions_take_values_not_the_config():
    src = open(os.path.join(REPO, "clcl_det", "data", "descriptions.py")).read()
    assert "cfg." not in src and "cfg:" not in src


def test_one_seed_rule(monkeypatch, caplog):
    # non-negative: the seed itself, and (seed * 1000 + s) % 2^31 per stream (what a task creates)
    assert seed_mod.derive_seed(7) == 7
    assert seed_mod.derive_seed(7, 2) == 7002
    assert seed_mod.derive_seed(2**30, 5) == (2**30 * 1000 + 5) % 2**31
    # negative: one drawn seed for every stream of the run, logged once
    monkeypatch.setattr(seed_mod, "_drawn", None)
    monkeypatch.setattr(seed_mod.os, "urandom", lambda n: (123456789).to_bytes(4, "little"))
    with caplog.at_level(logging.INFO, logger="clcl_det"):
        assert seed_mod.derive_seed(-1) == 123456789 == seed_mod.resolve_seed(-5)
        assert seed_mod.derive_seed(-1, 3) == (123456789 * 1000 + 3) % 2**31
    assert caplog.text.count("this run uses seed 123456789") == 1


def test_negative_seed_is_random_for_data_order_too(monkeypatch):
    from clcl_det.config import get_cfg
    from clcl_det.data.build import build_train_loader

    cfg = get_cfg()
    cfg.merge_from_list(["SEED", "-1", "SOLVER.IMS_PER_BATCH", "2"])
    dicts = [{"file_name": str(i)} for i in range(8)]
    orders = []
    for drawn in (11, 12):
        monkeypatch.setattr(seed_mod, "_drawn", drawn)
        loader = build_train_loader(cfg, dicts, mapper=lambda d, rng: d["file_name"])
        it = iter(loader)
        orders.append([x for _ in range(4) for x in next(it)])
        assert loader.dataset.seed == drawn
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(str(i) for i in range(8))
    assert orders[0] != orders[1], "two random seeds, two data orders (fixed seeds: the same)"
