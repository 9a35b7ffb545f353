"""Every class built `from_config` has constructor defaults equal to the config defaults: building it
directly with its defaults gives the same hyper-parameters as building it from get_cfg()."""
import importlib
import inspect
import pkgutil

import clcl_det
from clcl_det.config import get_cfg

# tiny values for the arguments `from_config` takes besides the config (not hyper-parameters)
FROM_CONFIG_ARGS = {"in_channels": 8, "level_names": ("p2", "p3"), "embed_dim": 16, "is_train": True}


def _configurable_classes():
    """Every class of the package that defines its own `from_config`."""
    for info in pkgutil.walk_packages(clcl_det.__path__, "clcl_det."):
        importlib.import_module(info.name)
    seen = {}
    for info in pkgutil.walk_packages(clcl_det.__path__, "clcl_det."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if inspect.isclass(obj) and obj.__module__ == module.__name__ and "from_config" in vars(obj):
                seen[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return seen


def _init_params(cls):
    """The keyword parameters of cls.__init__, following **kwargs into the base classes' __init__."""
    params = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        own = inspect.signature(klass.__init__).parameters
        for name, p in own.items():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params.setdefault(name, p)
        if not any(p.kind == p.VAR_KEYWORD for p in own.values()):
            break
    return params


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


def test_constructor_defaults_equal_config_defaults():
    classes = _configurable_classes()
    # the registered heads, cls heads and continual losses, and the dataset mapper, are all found
    for name in ("MultiExpertRoIHeads", "FViTRoIHeads", "TextClassifier", "SPAHead", "GaussianReplay",
                 "SemanticPrototypeHead", "Orthogonality", "FPNDrift", "UnbiasedDistill", "FasterILODDistill",
                 "SGAKTDistill", "DatasetMapper"):
        assert any(k.endswith("." + name) for k in classes), f"{name} not found among {sorted(classes)}"
    cfg = get_cfg()
    wrong = []
    for qualname, cls in sorted(classes.items()):
        args = list(inspect.signature(cls.from_config).parameters)[1:]  # after cfg
        unknown = [a for a in args if a not in FROM_CONFIG_ARGS]
        assert not unknown, f"{qualname}.from_config takes {unknown}: add a tiny value to FROM_CONFIG_ARGS"
        kwargs = cls.from_config(cfg, **{a: FROM_CONFIG_ARGS[a] for a in args})
        params = _init_params(cls)
        for key, value in kwargs.items():
            assert key in params, f"{qualname}.from_config gives '{key}', which __init__ does not take"
            default = params[key].default
            if default is not inspect.Parameter.empty and not _same(default, value):
                wrong.append(f"{qualname}({key}={default!r}) but get_cfg() gives {value!r}")
    assert not wrong, "constructor defaults differ from the config defaults:\n" + "\n".join(wrong)
