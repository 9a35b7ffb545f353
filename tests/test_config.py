"""Config: defaults, _BASE_, overrides, and one-line errors for unknown keys and wrong types."""
import glob
import inspect
import os

import pytest

from clcl_det.config import ConfigError, config_adders, get_cfg, resolve_config_path
from clcl_det.engine import default_argument_parser, setup_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def test_every_default_key_has_a_comment():
    files = {os.path.join(REPO, "clcl_det", "config", "defaults.py")}
    files |= {inspect.getsourcefile(add) for add in config_adders()}  # the methods' own keys
    assert len(files) >= 4, files
    for path in files:
        src = open(path).read().splitlines()
        bare = [line for line in src if line.strip().startswith("_C.") and " = " in line and "CN()" not in line
                and "#" not in line]
        assert not bare, f"keys without a comment in {path}: {bare}"


def test_method_keys_live_with_their_method_and_renamed_keys_point_to_their_new_place():
    core = open(os.path.join(REPO, "clcl_det", "config", "defaults.py")).read()
    for node in ("CLCLIP", "COST_VOLUME", "MULTI_EXPERT", "UNBIASED_DISTILL", "DISTILL", "SPA", "REPLAY", "SEVPR",
                 "SGAKT"):
        assert f"_C.MODEL.{node} " not in core, f"MODEL.{node} is a method's key: declare it next to its code"
    cfg = get_cfg()
    assert cfg.MODEL.CLCLIP.MULTI_EXPERT.TOPK == 0 and cfg.MODEL.CLCLIP.COST_VOLUME.ENABLED is True
    assert cfg.MODEL.CLCLIP.UNBIASED_DISTILL.ROI_WEIGHT == 0.5 and cfg.MODEL.SGAKT.TEMPERATURE == 20.0
    for old, new in [("MODEL.MULTI_EXPERT.TOPK", "MODEL.CLCLIP.MULTI_EXPERT.TOPK"),
                     ("MODEL.COST_VOLUME.ENABLED", "MODEL.CLCLIP.COST_VOLUME.ENABLED"),
                     ("MODEL.UNBIASED_DISTILL.ROI_WEIGHT", "MODEL.CLCLIP.UNBIASED_DISTILL.ROI_WEIGHT")]:
        with pytest.raises(ConfigError, match=f"'{old}'.*did you mean '{new}'"):
            get_cfg().merge_from_list([old, "1"])


def test_unknown_key_names_closest(tmp_path):
    cfg = get_cfg()
    with pytest.raises(ConfigError, match=r"'SOLVER.LR'.*did you mean 'SOLVER.BASE_LR'"):
        cfg.merge_from_list(["SOLVER.LR", "0.1"])
    f = tmp_path / "bad.yaml"
    f.write_text("MODEL:\n  ROI_HEAD:\n    NAME: x\n")
    with pytest.raises(ConfigError, match=r"MODEL.ROI_HEAD.NAME.*bad.yaml.*MODEL.ROI_HEADS.NAME"):
        get_cfg().merge_from_file(str(f))


def test_wrong_type_is_refused_and_ints_become_floats(tmp_path):
    cfg = get_cfg()
    with pytest.raises(ConfigError, match=r"SOLVER.BASE_LR.*expects a number.*'abc'"):
        cfg.merge_from_list(["SOLVER.BASE_LR", "abc"])
    f = tmp_path / "t.yaml"
    f.write_text("SOLVER:\n  MAX_ITER: many\n")
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITER.*t.yaml.*integer"):
        get_cfg().merge_from_file(str(f))
    cfg.merge_from_list(["SOLVER.BASE_LR", "1"])
    assert isinstance(cfg.SOLVER.BASE_LR, float) and cfg.SOLVER.BASE_LR == 1.0


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("SOLVER:\n  MAX_ITER: 7\n  BASE_LR: 0.5\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\nSOLVER:\n  MAX_ITER: 9\n")
    cfg = setup_cfg(str(tmp_path / "child.yaml"), ["SOLVER.BASE_LR", "0.25"])
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR) == (9, 0.25)
    assert cfg.is_frozen()


def test_yaml_only_no_code(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("SEED: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception) as e:
        get_cfg().merge_from_file(str(f))
    assert "pwned" not in str(e.value)
    py = tmp_path / "cfg.py"
    py.write_text("print('hi')\n")
    with pytest.raises(ConfigError, match="YAML only"):
        get_cfg().merge_from_file(str(py))


def test_config_path_as_users_write_it():
    assert resolve_config_path("VOC_10+10.yaml").endswith(os.path.join("configs", "VOC_10+10.yaml"))
    assert resolve_config_path("clclip/clclip_shapes_10+10.yaml").endswith(os.path.join("clclip", "clclip_shapes_10+10.yaml"))
    assert resolve_config_path("clclip_shapes_10+10.yaml") == resolve_config_path("clclip/clclip_shapes_10+10.yaml")
    with pytest.raises(ConfigError, match="not found"):
        resolve_config_path("VOC_10+11.yaml")
    args = default_argument_parser().parse_args(["--config", "VOC_10+10.yaml", "SOLVER.MAX_ITER", "3"])
    assert args.config_file == "VOC_10+10.yaml" and args.opts == ["SOLVER.MAX_ITER", "3"]
    args = default_argument_parser().parse_args(["--config-file", "x.yaml", "--resume", "--num-gpus", "2"])
    assert args.config_file == "x.yaml" and args.resume and args.num_gpus == 2


@pytest.mark.parametrize("path", SHIPPED_CONFIGS)
def test_every_shipped_config_parses(path):
    cfg = setup_cfg(path)
    assert cfg.CONTINUAL.TASKS


@pytest.mark.parametrize("path", SHIPPED_CONFIGS)
def test_clclip_configs_freeze_boxes_and_rpn_baselines_do_not(path):
    """CL-CLIP's configs keep each finished task's box regressor and freeze the RPN after the first
    task (the no_freeze ablations excepted); every other config trains both as before."""
    cfg = setup_cfg(path)
    if cfg.MODEL.ROI_HEADS.NAME != "MultiExpertRoIHeads":
        assert not cfg.MODEL.RPN.FREEZE_AFTER_FIRST_TASK
        return
    frozen = cfg.MODEL.CLCLIP.MULTI_EXPERT.FREEZE
    assert frozen != path.endswith("_no_freeze.yaml")
    assert cfg.MODEL.RPN.FREEZE_AFTER_FIRST_TASK == frozen
    assert cfg.MODEL.CLCLIP.MULTI_EXPERT.BOX_REG == "task"


# -- the layout of configs/: _base_/, one folder per method, names that say what a config is ----------------
CONFIGS_DIR = os.path.join(REPO, "configs")
METHOD_FOLDERS = {"fvit", "faster_ilod", "clclip", "clclip_plus", "replay", "spa", "seca"}
EXPERIMENTS = [p for p in SHIPPED_CONFIGS if os.path.basename(os.path.dirname(p)) in METHOD_FOLDERS]


def test_configs_layout_base_and_method_folders_each_with_a_readme():
    top = {n for n in os.listdir(CONFIGS_DIR) if not n.startswith(".")}
    assert top == METHOD_FOLDERS | {"_base_", "README.md", "VOC_10+10.yaml"}, top
    for folder in METHOD_FOLDERS:
        assert os.path.isfile(os.path.join(CONFIGS_DIR, folder, "README.md")), f"configs/{folder}/README.md missing"
    bases = os.listdir(os.path.join(CONFIGS_DIR, "_base_"))
    assert bases and all(n.startswith("Base-") and n.endswith(".yaml") for n in bases), bases
    assert len(EXPERIMENTS) + len(bases) + 1 == len(SHIPPED_CONFIGS)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: os.path.relpath(p, CONFIGS_DIR))
def test_config_name_says_method_dataset_and_output_folder(path):
    """<method>_<dataset>_<split>[_variant].yaml: the name's method prefix is its folder's, the dataset
    is the one it trains on, CL-CLIP configs build on CL-CLIP alone and clclip_plus_* on our additions,
    and OUTPUT_DIR is ./output/<name>."""
    folder, stem = os.path.basename(os.path.dirname(path)), os.path.splitext(os.path.basename(path))[0]
    cfg = setup_cfg(path)
    assert cfg.OUTPUT_DIR == f"./output/{stem}"
    dataset = next(d for d in ("shapes", "voc", "coco", "clutter") if f"_{d}" in stem)
    assert cfg.DATASETS.TRAIN[0].startswith(dataset), (stem, cfg.DATASETS.TRAIN)
    multi_expert = cfg.MODEL.ROI_HEADS.NAME == "MultiExpertRoIHeads"
    assert multi_expert == folder.startswith("clclip"), stem
    assert stem.startswith(folder if folder.startswith("clclip") else ""), stem
    if multi_expert:
        plus = cfg.MODEL.CLCLIP.MULTI_EXPERT.SHARED_CLASS_LOGITS or cfg.MODEL.ROI_HEADS.UNBIASED_BACKGROUND
        assert plus == stem.startswith("clclip_plus_"), f"{stem}: the name must say whether it builds on CL-CLIP+"


def test_no_config_only_reproduces_another():
    """Two shipped experiments never merge to the same config (OUTPUT_DIR aside); VOC_10+10.yaml is the
    short name of clclip_voc_10+10.yaml."""
    seen = {}
    for path in EXPERIMENTS:
        cfg = setup_cfg(path).clone()
        cfg.defrost()
        cfg.OUTPUT_DIR = ""
        dump = cfg.dump()
        assert dump not in seen, f"{path} reproduces {seen.get(dump)}"
        seen[dump] = path
    alias = setup_cfg(os.path.join(CONFIGS_DIR, "VOC_10+10.yaml"))
    assert alias.dump() == setup_cfg(os.path.join(CONFIGS_DIR, "clclip", "clclip_voc_10+10.yaml")).dump()


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: os.path.relpath(p, CONFIGS_DIR))
def test_yaml_comments_report_no_measurement(path):
    """A YAML comment explains a value; what was measured for it lives in the folder's README."""
    import re

    measured = re.compile(r"\d+\.\d+ mAP|mAP\S*( \w+)? \d+\.\d|AP50 \d|seeds \d+/\d|\d+(\.\d+)?x (slower|faster)"
                          r"|\d\.\d+x F-ViT|\d+\.\d+/\d+\.\d+|\d+\.\d+ (without|at|here)\b")
    for n, line in enumerate(open(path).read().splitlines(), 1):
        comment = line.split("#", 1)[1] if "#" in line else ""
        assert not measured.search(comment), f"{os.path.relpath(path, REPO)}:{n}: {comment.strip()}"


# -- the COCO protocols on Clutter: every method on IOR's four settings and 40+10x4, plus joint training -----
CLUTTER_SETTINGS = {"ior_40+40": "40+40", "ior_50+30": "50+30", "ior_60+20": "60+20", "ior_70+10": "70+10",
                    "40+10x4": "40+10x4"}
CLUTTER_METHODS = ["clclip/clclip", "fvit/finetune", "faster_ilod/distill", "fvit/finetune_unbiased"]


def test_clutter_grid_is_complete_and_uses_the_coco_protocols():
    """Each method has each Clutter setting; IOR's settings filter by non-co-occurrence, 40+10x4 does not;
    every config trains clutter_train on 80 classes and evaluates in COCO AP with scaled size thresholds;
    CL-CLIP runs all its experts and every method samples Shapes' 32 RoIs per image (the step-time budget)."""
    from clcl_det.data.catalog import MetadataCatalog
    from clcl_det.data.continual import build_continual_split
    from clcl_det.embedded.clutter import CLUTTER_CLASSES, ClutterSpec

    paths = {f"{m}_clutter_{s}": s for m in CLUTTER_METHODS for s in CLUTTER_SETTINGS}
    shipped = {os.path.relpath(p, CONFIGS_DIR)[:-5] for p in SHIPPED_CONFIGS if "_clutter" in p}
    ablations = {n for n in shipped if "_no_" in n}  # checked against their parent by test_config_runs
    assert {n.split("_no_")[0] for n in ablations} <= set(paths), ablations
    shipped -= ablations
    assert shipped == set(paths) | {"fvit/joint_clutter"}, shipped ^ (set(paths) | {"fvit/joint_clutter"})
    for name, setting in paths.items():
        cfg = setup_cfg(os.path.join(CONFIGS_DIR, name + ".yaml"))
        assert cfg.CONTINUAL.TASKS == CLUTTER_SETTINGS[setting]
        assert (cfg.CONTINUAL.IMAGE_FILTER == "non_cooccurrence") == setting.startswith("ior_"), name
        assert cfg.DATASETS.TRAIN == ("clutter_train",) and cfg.MODEL.CLIP.TINY.DATASET == "clutter"
        assert len(build_continual_split(cfg, CLUTTER_CLASSES).class_names) == 80
        assert cfg.MODEL.CLCLIP.MULTI_EXPERT.TOPK == 0 and cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 32, name
        assert (cfg.MODEL.ROI_HEADS.NAME == "MultiExpertRoIHeads") == name.startswith("clclip/"), name
    meta = MetadataCatalog.get("clutter_test")
    assert meta.evaluator_type == "coco" and meta.area_thresholds == ClutterSpec().area_thresholds()
    joint = setup_cfg(os.path.join(CONFIGS_DIR, "fvit", "joint_clutter.yaml"))
    assert joint.CONTINUAL.TASKS == "80" and joint.SOLVER.MAX_ITER == 2 * setup_cfg(
        os.path.join(CONFIGS_DIR, "fvit", "finetune_clutter_ior_40+40.yaml")).SOLVER.MAX_ITER
