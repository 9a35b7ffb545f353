"""The continual splitter: task strings, class order, per-task data and its errors."""
import pytest

from clcl_det.config import get_cfg
from clcl_det.data import SplitError, build_continual_split, parse_task_string
from clcl_det.data.datasets import VOC_CLASSES


def _dicts():
    # image i holds classes listed; VOC order ids
    content = {"a": [0, 12], "b": [15], "c": [3, 15, 19], "d": [11], "e": [5, 5]}
    return [{"image_id": k, "file_name": k, "height": 10, "width": 10,
             "annotations": [{"bbox": [0, 0, 5, 5], "bbox_mode": 0, "category_id": c} for c in v]}
            for k, v in content.items()]


def _split(tasks, order=(), image_filter="contains_current"):
    cfg = get_cfg()
    cfg.merge_from_list(["CONTINUAL.TASKS", tasks, "CONTINUAL.IMAGE_FILTER", image_filter])
    cfg.CONTINUAL.CLASS_ORDER = list(order)
    return build_continual_split(cfg, VOC_CLASSES)


@pytest.mark.parametrize("s,sizes", [("10+10", [10, 10]), ("19+1", [19, 1]), ("10+5+5", [10, 5, 5]),
                                     ("15+1x5", [15, 1, 1, 1, 1, 1]), ("15+1×5", [15] + [1] * 5),
                                     ("40+10x4", [40, 10, 10, 10, 10]), ("20", [20])])
def test_parse(s, sizes):
    assert parse_task_string(s) == sizes


@pytest.mark.parametrize("bad", ["10+", "ten", "10+0", "+5", "10-10", "5x0"])
def test_parse_errors(bad):
    with pytest.raises(SplitError, match="task string"):
        parse_task_string(bad)


def test_ranges_and_groups():
    sp = _split("10+5+5")
    assert sp.num_tasks == 3 and sp.task_ranges() == [range(0, 10), range(10, 15), range(15, 20)]
    t = sp.task(1)
    assert list(t.old_classes) == list(range(10)) and list(t.new_classes) == list(range(10, 15))
    assert list(t.future_classes) == list(range(15, 20)) and t.class_names == VOC_CLASSES[:15]


def test_sum_must_match_dataset():
    with pytest.raises(SplitError, match="adds up to 15 classes.*has 20"):
        _split("10+5")


def test_unknown_class_in_order():
    order = list(VOC_CLASSES)
    order[3] = "boats"
    with pytest.raises(SplitError, match="'boats'.*not in dataset"):
        _split("10+10", order)


def test_task_data_only_current_labels():
    sp = _split("10+10")
    t1 = sp.task_train_dicts(_dicts(), 0)
    assert {d["image_id"]: [a["category_id"] for a in d["annotations"]] for d in t1} == \
        {"a": [0], "c": [3], "e": [5, 5]}
    t2 = sp.task_train_dicts(_dicts(), 1)
    assert {d["image_id"]: [a["category_id"] for a in d["annotations"]] for d in t2} == \
        {"a": [12], "b": [15], "c": [15, 19], "d": [11]}
    # the input dicts are not modified
    assert [a["category_id"] for a in _dicts()[0]["annotations"]] == [0, 12]


def test_exclusive_filter():
    sp = _split("10+10", image_filter="exclusive")
    assert sorted(d["image_id"] for d in sp.task_train_dicts(_dicts(), 0)) == ["e"]
    assert sorted(d["image_id"] for d in sp.task_train_dicts(_dicts(), 1)) == ["b", "d"]


def test_class_order_remaps_ids():
    order = list(reversed(VOC_CLASSES))
    sp = _split("10+10", order)
    # VOC id 19 (tvmonitor) is first in this order -> task 1 class 0
    d = {d["image_id"]: d for d in sp.task_train_dicts(_dicts(), 0)}
    assert [a["category_id"] for a in d["c"]["annotations"]] == [4, 0]  # person (15) -> 4, tvmonitor -> 0
