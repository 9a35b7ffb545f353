"""GPU readiness check (`tools/gpu_check.py`): the shipped CL-CLIP and SPA configs with random
CLIP weights on synthetic images, taken through a task switch and trained a few iterations on
one device, with a report a person can paste into an issue.

Per scenario (VOC CL-CLIP 10+10 task 2, COCO CL-CLIP 40+40 task 2 with per-RoI top-k experts,
VOC SPA 10+10 task 2): every parameter and buffer of the model, its teacher and the frozen CLIP
on the device after the task switch; finite losses and a gradient on every trainable parameter;
host syncs in one training forward/backward (`torch.cuda.set_sync_debug_mode`, CUDA only); the
losses under fp16 / bf16 autocast against fp32; iterations/s and peak memory per batch size;
a checkpoint round trip; a mid-task resume against the uninterrupted run; and which bit-exact
properties hold on the device (resume, frozen parameters, repeated inference). The "full"
profile is ViT-B-16 at 640 px, batches of 4 and 8; "small" runs the same checks with the tiny
CLIP at 64 px and a few classes (what the CPU test suite runs)."""
from __future__ import annotations

import contextlib
import copy
import os
import resource
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config.tiny_run import TINY_RUN
from ..data.continual import Task, build_continual_split, parse_task_string
from ..data.datasets import COCO_CLASSES, VOC_CLASSES
from ..engine import TaskTrainer, setup_cfg
from ..engine.hooks import HookBase
from ..modeling import build_model
from ..utils.checkpoint import DetectionCheckpointer
from .lifecycle import begin_task, end_task, needs_teacher, task_data

__all__ = ["Check", "Profile", "PROFILES", "SCENARIOS", "run_gpu_check", "format_report", "synthetic_batch"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AMP_TOLERANCE = 1e-2  # |loss(autocast) - loss(fp32)| <= AMP_TOLERANCE * max(1, |loss(fp32)|)


@dataclass
class Check:
    """One line of the report: PASS / FAIL (a property that must hold), INFO (a measurement) or
    N/A (not measurable on this device)."""

    scenario: str
    name: str
    status: str
    detail: str


@dataclass
class Profile:
    image_size: int
    batches: Tuple[int, ...]  # images per GPU (per process) for the speed / memory runs
    timed_iters: int  # timed iterations after one warm-up iteration
    tasks: Dict[str, str]  # dataset -> CONTINUAL.TASKS
    opts: List[str] = field(default_factory=list)  # config overrides of every scenario
    scenario_opts: Dict[str, List[str]] = field(default_factory=dict)  # per scenario name


_SMALL = {k: v for k, v in TINY_RUN.items() if not k.startswith(("DATASETS.", "SOLVER.", "TEST."))}
PROFILES: Dict[str, Profile] = {
    "full": Profile(640, (4, 8), 3, {"VOC": "10+10", "COCO": "40+40"},
                    ["MODEL.CLIP.PRETRAINED", "", "MODEL.CLIP.TEMPLATES", "simple"]),
    "small": Profile(64, (1, 2), 1, {"VOC": "3+3", "COCO": "4+4"},
                     [*(str(x) for k, v in _SMALL.items() for x in (k, v)), "MODEL.CLIP.ARCH", "shapes-tiny",
                      "MODEL.CLIP.TAP_INDICES", "[]"],
                     {"coco_clclip": ["MODEL.CLCLIP.MULTI_EXPERT.TOPK", "3"]}),  # top-k below the 8 classes
}
# name -> (title, config under configs/, dataset, its class names)
SCENARIOS: Dict[str, Tuple[str, str, str, Sequence[str]]] = {
    "voc_clclip": ("VOC CL-CLIP task 2", "clclip/clclip_voc_10+10.yaml", "VOC", VOC_CLASSES),
    "coco_clclip": ("COCO CL-CLIP 40+40 task 2 (top-k experts)", "clclip/clclip_coco_40+40.yaml", "COCO", COCO_CLASSES),
    "voc_spa": ("VOC SPA task 2", "spa/spa_voc_10+10.yaml", "VOC", VOC_CLASSES),
}


def synthetic_batch(n: int, size: int, classes: Tuple[int, int], seed: int) -> List[Dict[str, Any]]:
    """`n` synthetic training samples (random pixels, 1-4 random boxes of `classes` [start, stop))."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        m = int(torch.randint(1, 5, (), generator=g))
        xy = torch.rand(m, 2, generator=g) * size * 0.7
        wh = (0.1 + torch.rand(m, 2, generator=g) * 0.2) * size
        out.append({"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
                    "boxes": torch.cat([xy, (xy + wh).clamp(max=size)], 1),
                    "classes": torch.randint(classes[0], classes[1], (m,), generator=g),
                    "height": size, "width": size, "image_id": seed * 1000 + i, "file_name": "",
                    "seed": seed * 1000 + i})
    return out


def _stream(n: int, size: int, task: Task) -> Callable[[int], Iterator[List[Dict[str, Any]]]]:
    """data_fn of a TaskTrainer: iteration i's batch depends on i only (a resume sees the same data)."""
    def data_fn(start: int) -> Iterator[List[Dict[str, Any]]]:
        i = start
        while True:
            yield synthetic_batch(n, size, (task.start, task.stop), seed=10_000 + i)
            i += 1
    return data_fn


def _tensors(module: Optional[nn.Module], prefix: str) -> Dict[str, torch.Tensor]:
    if module is None:
        return {}
    out = {f"{prefix}{n}": t for n, t in module.named_parameters()}
    out.update({f"{prefix}{n}": t for n, t in module.named_buffers()})
    return out


def _state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> Tuple[int, float]:
    """Tensors that differ and the largest absolute difference."""
    differ, worst = 0, 0.0
    for k, v in a.items():
        if not torch.equal(v, b[k]):
            differ += 1
            if v.is_floating_point():
                worst = max(worst, float((v.double() - b[k].double()).abs().max()))
    return differ, worst


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """The DETERMINISTIC settings (cuDNN fixed algorithms, deterministic kernels), restored after."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=True)


class _Clock(HookBase):
    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def after_step(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())


class _Scenario:
    """One config taken to task 2 on `device`: the model, its teacher and the task."""

    def __init__(self, key: str, profile: Profile, device: str, workdir: str):
        title, config, dataset, names = SCENARIOS[key]
        self.title, self.profile, self.workdir = title, profile, workdir
        tasks = profile.tasks[dataset]
        num = sum(parse_task_string(tasks))
        self.cfg = setup_cfg(os.path.join(REPO, "configs", config), [
            *profile.opts, *profile.scenario_opts.get(key, []), "CONTINUAL.TASKS", tasks,
            "INPUT.IMAGE_SIZE", str(profile.image_size), "MODEL.DEVICE", device, "HOOKS", "[]",
            "SOLVER.CHECKPOINT_PERIOD", "1000000", "SOLVER.LOG_PERIOD", "1000000", "SOLVER.WARMUP_ITERS", "0",
            "OUTPUT_DIR", workdir])
        torch.manual_seed(0)
        self.model = build_model(self.cfg)
        self.device = self.model.device
        split = build_continual_split(self.cfg, tuple(names[:num]))
        first, self.task = split.task(0), split.task(1)
        size = profile.image_size
        begin_task(self.model, first)
        end_task(self.model, first)
        task_data(self.model, first, lambda: [synthetic_batch(2, size, (first.start, first.stop), seed=s) for s in range(2)])
        self.teacher = copy.deepcopy(self.model) if needs_teacher(self.model) else None
        begin_task(self.model, self.task)
        self.model.set_teacher(self.teacher)
        self.model.train()

    def batch(self, n: int, seed: int = 0) -> List[Dict[str, Any]]:
        return synthetic_batch(n, self.profile.image_size, (self.task.start, self.task.stop), seed)

    def copy(self) -> nn.Module:
        m = copy.deepcopy(self.model)  # shares the frozen CLIP; the teacher is set again
        m.set_teacher(self.teacher)
        return m

    def trainer(self, model: nn.Module, n: int, iters: int, out: str, period: int = 1000000,
                hooks: Sequence[HookBase] = ()) -> TaskTrainer:
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.CHECKPOINT_PERIOD = n, iters, period
        cfg.freeze()
        return TaskTrainer(cfg, model, _stream(n, self.profile.image_size, self.task), out, hooks=list(hooks))


def _check_placement(s: _Scenario) -> Check:
    dev = s.device
    found = {**_tensors(s.model, "model."), **_tensors(s.teacher, "teacher."),
             **_tensors(s.model.clip, "clip."), **_tensors(getattr(s.model.backbone, "encoder", None), "encoder.")}
    wrong = [f"{n} ({t.device})" for n, t in found.items() if t.device != dev]
    return Check(s.title, "placement", "FAIL" if wrong else "PASS",
                 f"{len(found) - len(wrong)}/{len(found)} parameters and buffers of model, teacher and CLIP on {dev}"
                 + (f"; elsewhere: {', '.join(wrong[:5])}" if wrong else ""))


def _check_gradients(s: _Scenario) -> Check:
    model = s.copy()
    torch.manual_seed(0)
    losses = model(s.batch(s.profile.batches[0]))
    bad = [k for k, v in losses.items() if not bool(torch.isfinite(v).all())]
    sum(losses.values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    nonfinite = [n for n, p in trainable if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    ok = not (bad or missing or nonfinite)
    detail = (f"{len(losses)} losses finite" if not bad else f"non-finite: {', '.join(bad)}") + \
        f"; gradient on {len(trainable) - len(missing)}/{len(trainable)} trainable parameters" + \
        (f" (none on {', '.join(missing[:5])})" if missing else "") + \
        (f"; non-finite gradients on {', '.join(nonfinite[:5])}" if nonfinite else "")
    return Check(s.title, "losses and gradients", "PASS" if ok else "FAIL", detail)


def _check_syncs(s: _Scenario) -> Check:
    if s.device.type != "cuda":
        return Check(s.title, "host syncs", "N/A", "torch.cuda.set_sync_debug_mode needs CUDA")
    model = s.copy()
    batch = s.batch(s.profile.batches[0])
    model(batch)  # warm-up: lazily built banks and caches
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            sum(model(batch).values()).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where: Dict[str, int] = {}
    for w in syncs:
        loc = f"{os.path.relpath(w.filename, REPO)}:{w.lineno}"
        where[loc] = where.get(loc, 0) + 1
    top = ", ".join(f"{k} x{v}" for k, v in sorted(where.items(), key=lambda kv: -kv[1])[:8])
    return Check(s.title, "host syncs", "INFO", f"{len(syncs)} in one training forward+backward"
                 + (f" ({top})" if top else "") + "; the trainer adds 2 per iteration (non-finite flag, loss log)")


def _check_autocast(s: _Scenario) -> Check:
    dtypes = [torch.float16, torch.bfloat16] if s.device.type == "cuda" else [torch.bfloat16]
    model, batch = s.copy(), s.batch(s.profile.batches[0])
    state = _state(model)
    # the RoIs fp32 samples are given to the autocast passes too: the comparison is then of the
    # arithmetic, not of which proposals a near-tie let into the sample
    heads, sampled = model.roi_heads, []
    sample = heads.sample

    def losses(dtype: Optional[torch.dtype]) -> Dict[str, float]:
        model.load_state_dict(state)
        torch.manual_seed(0)
        with torch.no_grad(), torch.autocast(s.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return {k: float(v) for k, v in model(batch).items()}

    heads.sample = lambda *a, **k: sampled.append(sample(*a, **k)) or sampled[-1]  # type: ignore[method-assign]
    ref = losses(None)
    heads.sample = lambda *a, **k: sampled[0]  # type: ignore[method-assign]
    parts, ok = [], True
    for dt in dtypes:
        got = losses(dt)
        worst = max(ref, key=lambda k: abs(got[k] - ref[k]) / max(1.0, abs(ref[k])))
        err = abs(got[worst] - ref[worst]) / max(1.0, abs(ref[worst]))
        ok &= err <= AMP_TOLERANCE and all(map(torch.isfinite, map(torch.tensor, got.values())))
        parts.append(f"{str(dt).split('.')[1]} worst {worst} {got[worst]:.4f} vs {ref[worst]:.4f} ({err:.1e})")
    if s.device.type != "cuda":
        parts.append("float16 autocast needs CUDA")
    return Check(s.title, "autocast losses", "PASS" if ok else "FAIL",
                 f"within {AMP_TOLERANCE:g} of fp32: " + "; ".join(parts))


def _check_speed(s: _Scenario) -> Check:
    parts = []
    for n in s.profile.batches:
        model, clock = s.copy(), _Clock(s.device)
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(s.device)
        try:
            with tempfile.TemporaryDirectory(dir=s.workdir) as tmp:
                s.trainer(model, n, 1 + s.profile.timed_iters, tmp, hooks=[clock]).train()
        except torch.cuda.OutOfMemoryError:
            parts.append(f"{n} images: out of memory")
            continue
        finally:
            del model
        its = s.profile.timed_iters / (clock.times[-1] - clock.times[0])
        peak = f"{torch.cuda.max_memory_allocated(s.device) / 2**30:.2f} GiB" if s.device.type == "cuda" else \
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process)"
        parts.append(f"{n} images: {its:.2f} it/s, peak {peak}")
    return Check(s.title, "speed and memory", "INFO", "; ".join(parts))


def _outputs(model: nn.Module, images: List[Dict[str, Any]]) -> List[Dict[str, torch.Tensor]]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(images)
    finally:
        model.train(was)


def _same_outputs(a: List[Dict[str, torch.Tensor]], b: List[Dict[str, torch.Tensor]]) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("boxes", "scores", "labels"))


def _check_checkpoint(s: _Scenario) -> List[Check]:
    images = [{k: v for k, v in x.items() if k in ("image", "height", "width")} for x in s.batch(2, seed=7)]
    with tempfile.TemporaryDirectory(dir=s.workdir) as tmp:
        path = DetectionCheckpointer(s.model, tmp).save("round_trip")
        fresh = s.copy()
        with torch.no_grad():
            for p in fresh.parameters():
                p.add_(1.0)
        DetectionCheckpointer(fresh, tmp).load(path)
    differ, _ = _max_diff(_state(s.model), _state(fresh))
    first, again = _outputs(s.model, images), _outputs(s.model, images)
    same = _same_outputs(first, _outputs(fresh, images))
    return [Check(s.title, "checkpoint round trip", "PASS" if not differ and same else "FAIL",
                  f"{len(s.model.state_dict()) - differ}/{len(s.model.state_dict())} tensors restored; "
                  f"detections after loading {'bit-identical' if same else 'differ'}"),
            Check(s.title, "bit-exact: repeated inference", "PASS" if _same_outputs(first, again) else "FAIL",
                  "the same images twice give bit-identical detections"
                  if _same_outputs(first, again) else "the same images twice give different detections")]


def _check_resume(s: _Scenario) -> List[Check]:
    iters, n = 4, s.profile.batches[0]
    start = s.copy()
    frozen = {k: p.detach().clone() for k, p in start.named_parameters() if not p.requires_grad}
    with _deterministic(), tempfile.TemporaryDirectory(dir=s.workdir) as tmp:
        whole = s.copy()
        s.trainer(whole, n, iters, tmp, period=2).train()  # checkpoints after iterations 1 and 3
        resumed = s.copy()
        tr = s.trainer(resumed, n, iters, tmp, period=2)
        tr.resume(os.path.join(tmp, "model_0000001.pth"))
        tr.train()
    differ, worst = _max_diff(_state(whole), _state(resumed))
    moved = [k for k, p in whole.named_parameters() if k in frozen and not torch.equal(p, frozen[k])]
    trained = _max_diff(_state(start), _state(whole))[0] > 0
    return [Check(s.title, "bit-exact: mid-task resume", "PASS" if not differ and trained else "FAIL",
                  f"{iters} iterations vs resumed after iteration 2: "
                  + ("bit-identical" if not differ else f"{differ} tensors differ (max |diff| {worst:.2e})")
                  + ("" if trained else "; the model did not change")),
            Check(s.title, "bit-exact: frozen parameters", "FAIL" if moved else "PASS",
                  f"{len(frozen)} frozen parameters after {iters} iterations: "
                  + (f"changed: {', '.join(moved[:5])}" if moved else "bit-identical"))]


def run_gpu_check(profile: str = "auto", device: str = "auto", scenarios: Sequence[str] = tuple(SCENARIOS),
                  log: Callable[[str], None] = lambda line: None) -> List[Check]:
    """Run every check of `scenarios` ("auto" profile: full on a GPU, small on a CPU); `log` gets
    each report line as it is made."""
    if profile == "auto":
        profile = "full" if (device == "auto" and torch.cuda.is_available()) or device.startswith("cuda") else "small"
    prof = PROFILES[profile]
    checks: List[Check] = []
    with tempfile.TemporaryDirectory() as workdir:
        for key in scenarios:
            t0 = time.perf_counter()
            s = _Scenario(key, prof, device, workdir)
            log(f"### {s.title} ({SCENARIOS[key][1]}, CONTINUAL.TASKS {s.cfg.CONTINUAL.TASKS})")
            for fn in (_check_placement, _check_gradients, _check_syncs, _check_autocast, _check_speed,
                       _check_checkpoint, _check_resume):
                out = fn(s)
                for c in (out if isinstance(out, list) else [out]):
                    checks.append(c)
                    log(f"- [{c.status}] {c.name}: {c.detail}")
            log(f"  ({time.perf_counter() - t0:.0f} s)")
            del s
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return checks


def header(profile: str, device: str) -> str:
    """The report's first lines: what ran where."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    cuda = f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if dev.type == "cuda" else ""
    return (f"## clcl_det gpu_check: profile {profile}, device {dev} ({name}), torch {torch.__version__}{cuda}\n"
            f"Random CLIP weights, synthetic images; each scenario is task 2 of its config after task 1's "
            f"life cycle (experts, statistics, teacher).")


def format_report(checks: Sequence[Check]) -> str:
    """A one-line-per-check summary (after the per-scenario lines)."""
    counts = {s: sum(c.status == s for c in checks) for s in ("PASS", "FAIL", "INFO", "N/A")}
    failed = [f"{c.scenario}: {c.name}" for c in checks if c.status == "FAIL"]
    return (f"**{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['INFO']} INFO, {counts['N/A']} N/A**"
            + (f"; failed: {'; '.join(failed)}" if failed else ""))
