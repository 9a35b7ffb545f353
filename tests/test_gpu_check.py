"""tools/gpu_check.py at its small size on the CPU: every check of every scenario runs and the
properties hold (placement, finite losses and gradients, bf16 against fp32, checkpoint round trip,
mid-task resume, frozen parameters, repeated inference); a misplaced tensor is caught."""
import importlib.util
import os

import torch

from clcl_det.continual.gpu_check import PROFILES, SCENARIOS, _check_placement, _Scenario

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUST_PASS = ("placement", "losses and gradients", "autocast losses", "checkpoint round trip",
             "bit-exact: repeated inference", "bit-exact: mid-task resume", "bit-exact: frozen parameters")


def test_gpu_check_small_profile_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check_tool", os.path.join(REPO, "tools", "gpu_check.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "report.md"
    assert tool.main(["--profile", "small", "--device", "cpu", "--out", str(out)]) == 0
    report = out.read_text().splitlines()
    assert report[0].startswith("## clcl_det gpu_check: profile small, device cpu")
    sections = [i for i, line in enumerate(report) if line.startswith("### ")]
    assert len(sections) == len(SCENARIOS)
    for start, stop in zip(sections, sections[1:] + [len(report)]):
        lines = report[start:stop]
        status = {name: line[3:].split("]")[0] for line in lines for name in (*MUST_PASS, "host syncs")
                  if line.startswith("- [") and f"] {name}: " in line}
        for name in MUST_PASS:
            assert status.get(name) == "PASS", (lines[0], name, lines)
        assert status["host syncs"] == "N/A"  # set_sync_debug_mode needs CUDA
        speed = next(line for line in lines if "speed and memory" in line)
        assert all(f"{n} images: " in speed for n in PROFILES["small"].batches) and "it/s" in speed
    assert report[-1].startswith(f"**{len(MUST_PASS) * len(SCENARIOS)} PASS, 0 FAIL")


def test_gpu_check_placement_finds_a_tensor_off_the_device(tmp_path):
    s = _Scenario("voc_clclip", PROFILES["small"], "cpu", str(tmp_path))
    assert _check_placement(s).status == "PASS"
    s.teacher.register_buffer("stray", torch.zeros(1, device="meta"))
    c = _check_placement(s)
    assert c.status == "FAIL" and "teacher.stray (meta)" in c.detail
