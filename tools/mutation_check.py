#!/usr/bin/env python
"""Mutation check: break each mechanism with the one-line edit a real bug would make and check
that its mechanism tests fail.

    python tools/mutation_check.py                  # every mutant, 2 workers
    python tools/mutation_check.py -j 1 -m spa_ot_score_detached -m drift_student_detached
    python tools/mutation_check.py --list           # the mutants and the tests that must kill them
    python tools/mutation_check.py --baseline       # first run every listed test on the unmutated tree

Each mutant (the `MUTANTS` list below: file, an exact snippet of the original code, its
replacement, the tests that must catch it) is applied to a copy of the tree (without .git,
output folders and virtual environments); the listed tests run there (`python -m pytest -x`, the
copy first on PYTHONPATH). A mutant is *killed* when a test fails. The snippet must occur exactly
once in its file: code that moved makes the check fail naming the mutant, and the entry is then
updated (snippets are kept short, so a refactor around them leaves most entries valid).
Prints mutant | mechanism | killed by (the first failing test) | time; exit status 0 = every
mutant killed, 1 = some mutant survived or could not be applied or run.

Tests are pytest node ids (`tests/test_x.py::test_name`, `tests/test_x.py::test_p[a-b]`); a
mutant's tests run in one pytest call (`-x`: it stops at the first failure). Each call is a fork
of this process after torch & co. are imported, so a mutant costs its tests, not the imports.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY_IGNORE = shutil.ignore_patterns(".git", "output", "outputs", "venv", ".venv", ".ci", "__pycache__",
                                     ".pytest_cache", "*.pyc", "*.pth")


@dataclass(frozen=True)
class Mutant:
    name: str  # short, unique
    mechanism: str  # what the edit breaks, in a few words
    file: str  # relative to the repository root
    original: str  # occurs exactly once in `file`
    replacement: str
    tests: Tuple[str, ...]  # pytest node ids


def M(name: str, mechanism: str, file: str, original: str, replacement: str, *tests: str) -> Mutant:
    return Mutant(name, mechanism, file, original, replacement, tuple(tests))


ME = "clcl_det/modeling/roi_heads/multi_expert.py"
PRIOR = "clcl_det/modeling/roi_heads/class_prior.py"
CV = "clcl_det/modeling/cost_volume.py"
DRIFT = "clcl_det/modeling/losses/drift.py"
ORTH = "clcl_det/modeling/losses/orthogonality.py"
DIST = "clcl_det/modeling/losses/distillation.py"
SGAKT = "clcl_det/modeling/losses/sgakt.py"
SPA = "clcl_det/modeling/cls_heads/spa.py"
REPLAY = "clcl_det/modeling/cls_heads/gaussian_replay.py"
PROTO = "clcl_det/modeling/cls_heads/prototype.py"
CLS = "clcl_det/modeling/cls_heads/build.py"
FVIT_ROI = "clcl_det/modeling/roi_heads/fvit_roi_heads.py"
RPN = "clcl_det/modeling/proposal_generator/rpn.py"
POOL = "clcl_det/modeling/poolers.py"
LOOP = "clcl_det/continual/loop.py"
TRAINER = "clcl_det/engine/trainer.py"
VOC = "clcl_det/evaluation/voc_evaluation.py"
CM = "clcl_det/evaluation/continual_metrics.py"

T_CL = "tests/test_clclip.py::"
T_MC = "tests/test_mechanisms_clclip.py::"
T_MP = "tests/test_mechanisms_clclip_prior.py::"
T_MH = "tests/test_mechanisms_heads.py::"
T_CH = "tests/test_cls_heads.py::"
T_LOOP = "tests/test_continual_loop.py::"
T_EV = "tests/test_evaluation.py::"
T_POOL = "tests/test_poolers.py::"

MUTANTS: List[Mutant] = [
    # -- CL-CLIP: cost-volume prior and gating ------------------------------------------------------
    M("prior_gate_zero", "CL-CLIP residual gating: experts never see the prior", PRIOR,
      "return f * (1 + gamma * m[:, :, None])", "return f * (1 + 0 * gamma * m[:, :, None])",
      T_MC + "test_mechanism_expert_logits_follow_the_prior_through_every_gating"),
    M("gating_multiply_drops_prior", "CL-CLIP multiply gating ignores the prior", PRIOR,
      "return f * m[:, :, None]", "return f.expand(-1, m.shape[1], -1, -1, -1)",
      T_MC + "test_mechanism_expert_logits_follow_the_prior_through_every_gating"),
    M("gating_concat_drops_prior", "CL-CLIP concat gating: a zero prior channel", PRIOR,
      "m[:, :, None]], dim=2)", "torch.zeros_like(m[:, :, None])], dim=2)",
      T_MC + "test_mechanism_expert_logits_follow_the_prior_through_every_gating"),
    M("prior_over_later_classes", "CL-CLIP prior: a task's softmax over later classes too", PRIOR,
      "ctx.class_embeddings[lo:stop]", "ctx.class_embeddings[lo:]",
      T_CL + "test_mechanism_head_prior_unchanged_by_later_tasks"),
    M("prior_sigmoid_without_background", "cost-volume prior: sigmoid ignores the background", CV,
      "torch.sigmoid((cost[:, :-1] - cost[:, -1:]) / temperature)", "torch.sigmoid(cost[:, :-1] / temperature)",
      T_CL + "test_mechanism_prior_independent_of_later_classes"),
    M("prior_logit_term_removed", "CL-CLIP: the prior's level never reaches the logits", ME,
      "s = s + self.prior_logits(rois, ctx, K)", "s = s",
      T_MP + "test_mechanism_prior_level_over_a_roi_moves_its_class_logit"),
    M("prior_logit_without_background", "CL-CLIP prior term: log level, not the log-odds against background", ME,
      "(level - bg.repeat_interleave(sizes, dim=1))", "level",
      T_MP + "test_prior_level_is_the_clip_softmax_of_the_rois_inner_cosines"),
    M("prior_temperature_ignored", "CL-CLIP prior: a fixed T instead of the CLIP's own", PRIOR,
      "else 1.0 / ctx.clip_logit_scale", "else 0.01",
      T_MP + "test_prior_level_is_the_clip_softmax_of_the_rois_inner_cosines"),
    M("prior_level_inset_ignored", "CL-CLIP prior level: read over the whole RoI, context included", PRIOR,
      "inner = [inset_boxes(r, self.level_inset, ctx.clip_stride) for r in rois]", "inner = rois",
      T_MP + "test_prior_level_is_the_clip_softmax_of_the_rois_inner_cosines"),
    M("prior_over_own_task_only", "CL-CLIP prior VOCABULARY seen: normalised over its own task only", PRIOR,
      'lo = start if self.vocabulary == "task" else 0', "lo = start",
      T_MP + "test_one_class_task_prior_tells_its_class_from_earlier_objects[seen]"),
    M("gating_normalized_drops_prior", "CL-CLIP normalized gating ignores where the prior lies", PRIOR,
      "return f * (m / m.amax(dim=(2, 3), keepdim=True).clamp(min=_TINY))[:, :, None]",
      "return f.expand(-1, m.shape[1], -1, -1, -1)",
      T_MP + "test_mechanism_features_outside_a_class_prior_barely_move_its_logit"),
    # -- CL-CLIP: experts, freezing, background experts, box regressors -----------------------------
    M("experts_not_frozen", "CL-CLIP: old class experts keep training", ME,
      "self.experts.chunks.requires_grad_(False)", "self.experts.chunks.requires_grad_(True)",
      T_CL + "test_mechanism_task_background_trains_only_the_current_task"),
    M("bg_experts_not_frozen", "CL-CLIP: old background experts keep training", ME,
      "self.bg_experts.chunks.requires_grad_(False)", "self.bg_experts.chunks.requires_grad_(True)",
      T_CL + "test_mechanism_task_background_trains_only_the_current_task"),
    M("trunk_not_frozen", "CL-CLIP: the experts' box-head trunk keeps training", ME,
      "self.box_head.convs.requires_grad_(False)", "self.box_head.convs.requires_grad_(True)",
      T_CL + "test_mechanism_old_logits_invariant_to_later_tasks[False-True-task-box_head-0]"),
    M("experts_score_wrong_text", "CL-CLIP: expert k scored against another class's text", ME,
      "else text[None]", "else text.flip(0)[None]",
      T_CL + "test_mechanism_old_logits_invariant_to_later_tasks[False-True-task-own-0]"),
    M("bg_expert_of_latest_task", "CL-CLIP: every task's softmax closed by the latest background", ME,
      "bg[:, t:t + 1]], dim=1)", "bg[:, -1:]], dim=1)",
      T_CL + "test_mechanism_old_logits_invariant_to_later_tasks[False-True-task-own-0]"),
    M("task_box_reg_not_filled", "CL-CLIP: a task's box regressor not copied at its end", ME,
      "fcs.load_state_dict(self.box_head.fcs.state_dict())", "pass",
      T_CL + "test_mechanism_old_boxes_frozen_with_their_task[task]"),
    M("old_boxes_from_shared", "CL-CLIP: old classes take the shared regressor", ME,
      "deltas[:, a:b] = out[\"task_deltas\"][:, t:t + 1]", "pass",
      T_CL + "test_mechanism_old_boxes_frozen_with_their_task[task]"),
    M("topk_drops_own_label", "CL-CLIP top-k: a RoI's own class not kept in training", ME,
      "idx[missing, -1] = labels[missing]", "pass",
      T_MC + "test_mechanism_training_topk_keeps_each_rois_own_class"),
    M("bg_ignore_never", "CL-CLIP prior-guided background ignore switched off", ME,
      "return torch.where(ignore, torch.full_like(labels, -1), labels)", "return labels",
      T_MC + "test_mechanism_prior_guided_background_ignore"),
    M("bg_ignore_new_classes", "CL-CLIP background ignore reads the new classes' prior", ME,
      "[:, : task.start].amax(dim=1)", "[:, task.start:].amax(dim=1)",
      T_MC + "test_mechanism_prior_guided_background_ignore"),
    # -- CL-CLIP: drift and orthogonality -----------------------------------------------------------
    M("drift_student_detached", "FPN drift: the student detached", DRIFT,
      "(student[k] - teacher[k]).pow(2).mean()", "(student[k].detach() - teacher[k]).pow(2).mean()",
      T_CL + "test_mechanism_orthogonality_and_drift_gradients"),
    M("drift_summed_over_levels", "FPN drift: levels summed, not averaged", DRIFT,
      "for k in student]).mean()", "for k in student]).sum()",
      T_MC + "test_mechanism_drift_is_the_hand_computed_value"),
    M("drift_teacher_is_student", "FPN drift: the student compared with itself", DRIFT,
      "feature_drift(outputs[\"backbone\"][\"features\"], teacher.features())",
      "feature_drift(outputs[\"backbone\"][\"features\"], outputs[\"backbone\"][\"features\"])",
      T_MC + "test_mechanism_drift_is_the_hand_computed_value"),
    M("orth_maps_detached", "orthogonality: the expert maps detached", ME,
      "F.normalize(act, dim=-1)", "F.normalize(act.detach(), dim=-1)",
      T_CL + "test_mechanism_orthogonality_and_drift_gradients"),
    M("drift_weighted_by_new_prior", "prior-weighted drift reads the new classes' prior", DRIFT,
      "old = prior[:, :task.start].amax(dim=1, keepdim=True)", "old = prior[:, task.start:].amax(dim=1, keepdim=True)",
      T_MP + "test_prior_weighted_drift_holds_the_pyramid_where_old_objects_lie"),
    M("orth_over_frozen_pairs", "orthogonality: pairs of two frozen experts counted", ORTH,
      "pairs &= live | (live & own).any(dim=1, keepdim=True)", "pass",
      T_MP + "test_orthogonality_no_gradient_from_two_frozen_experts"),
    M("orth_frozen_maps_trained", "orthogonality: a frozen expert's map receives gradient", ORTH,
      "maps = torch.where(live[..., None], maps, maps.detach())", "pass",
      T_MP + "test_orthogonality_no_gradient_from_two_frozen_experts"),
    M("orth_counts_own_pair", "orthogonality: the labelled class's map paired with itself", ORTH,
      "pairs = ~own & own.any(dim=1, keepdim=True)", "pairs = own.any(dim=1, keepdim=True).expand_as(own).clone()",
      T_MP + "test_orthogonality_pairs_the_labelled_class_with_the_others"),
    M("orth_counts_diagonal", "orthogonality: a map's overlap with itself counted", ORTH,
      "off = ~torch.eye(S, dtype=torch.bool, device=maps.device)",
      "off = torch.ones(S, S, dtype=torch.bool, device=maps.device)",
      T_CL + "test_orthogonality_disjoint_and_identical"),
    # -- unbiased losses ----------------------------------------------------------------------------
    M("unbiased_ce_absorbs_nothing", "unbiased CE: background no longer absorbs old classes", CLS,
      "torch.cat([logits[:, :num_old], logits[:, bg:]], dim=1)", "logits[:, bg:]",
      T_CL + "test_unbiased_background_loss_matches_probability_sums"),
    M("unbiased_bg_never_on", "unbiased background: task 2 trains plain CE", FVIT_ROI,
      "ctx.background_absorbs = ctx.task.start", "ctx.background_absorbs = 0",
      T_CL + "test_unbiased_background_reaches_the_loss_only_after_task_1"),
    M("unbiased_distill_new_not_bg", "unbiased distillation: new classes not counted as background", DIST,
      "s[:, k_old:].logsumexp(dim=1, keepdim=True)", "s[:, -1:]",
      T_CL + "test_unbiased_distillation_matches_per_roi_loop"),
    M("unbiased_distill_no_t2", "unbiased distillation: the T^2 gain normalised away", DIST,
      "kl.mean() * temperature ** 2", "kl.mean()",
      T_CL + "test_unbiased_distillation_matches_per_roi_loop"),
    # -- Faster ILOD -----------------------------------------------------------------------------------
    M("ilod_student_fpn_detached", "Faster ILOD: the student's FPN features detached", DIST,
      "filtered_feature_distillation(s_feats, t_feats)",
      "filtered_feature_distillation({k: v.detach() for k, v in s_feats.items()}, t_feats)",
      T_MH + "test_mechanism_faster_ilod_feature_term_trains_the_students_pyramid"),
    M("ilod_feature_not_centred", "Faster ILOD feature term: the student's map not mean-subtracted", DIST,
      "F.relu((teacher[k] - teacher[k].mean()) - (student[k] - student[k].mean()))",
      "F.relu((teacher[k] - teacher[k].mean()) - student[k])",
      T_MH + "test_mechanism_faster_ilod_feature_term_trains_the_students_pyramid"),
    M("ilod_rpn_unfiltered", "Faster ILOD RPN term: boxes counted where the teacher is not better", DIST,
      "mask = (diff > box_threshold).to(sd.dtype)", "mask = torch.ones_like(diff).to(sd.dtype)",
      T_MH + "test_faster_ilod_rpn_and_roi_terms_are_the_hand_computed_values"),
    # -- SPA ------------------------------------------------------------------------------------------
    M("spa_ot_score_detached", "SPA: the OT score detached", SPA,
      "s_ot = self.ot_scores(patches, bank, self.candidates(cos[:, :K]))",
      "s_ot = self.ot_scores(patches, bank, self.candidates(cos[:, :K])).detach()",
      T_MH + "test_mechanism_spa_ot_term_trains_the_current_projector_through_the_logits"),
    M("spa_ot_weight_dropped", "SPA: the OT term left out of the logits", SPA,
      "F.pad(self.ot_weight * s_ot, (0, 1))", "F.pad(0 * s_ot, (0, 1))",
      T_CH + "test_spa_logits_match_a_per_pair_computation"),
    M("spa_scale_dropped", "SPA: its logits lose the learned scale tau", SPA,
      "return self.scale() * (cos + F.pad(", "return (cos + F.pad(",
      T_CH + "test_spa_logits_match_a_per_pair_computation"),
    M("spa_old_projector_trains", "SPA: earlier task projectors not frozen", SPA,
      "proj.requires_grad_(i == task.index)", "proj.requires_grad_(True)",
      T_MH + "test_mechanism_replay_around_spa_trains_the_current_projector_only"),
    # -- Gaussian replay ------------------------------------------------------------------------------
    M("replay_old_classes_only", "Gaussian replay: replayed features scored against old classes only", REPLAY,
      "[:, : ctx.num_classes]  # seen classes", "[:, : ctx.task.start]",
      T_MH + "test_mechanism_replay_scores_replayed_features_against_every_seen_class"),
    M("replay_weight_dropped", "Gaussian replay: MODEL.REPLAY.WEIGHT ignored", REPLAY,
      "self.weight * F.cross_entropy(replayed, labs)", "F.cross_entropy(replayed, labs)",
      T_MH + "test_mechanism_replay_scores_replayed_features_against_every_seen_class"),
    M("replay_biased_covariance", "Gaussian replay: covariance divided by n, not n - 1", REPLAY,
      "cov = scatter / denom[:, None, None]", "cov = scatter / n.clamp_min(1)[:, None, None]",
      T_CH + "test_replay_statistics_and_sampling_reproduce_moments[full]"),
    # -- SE-VPR ---------------------------------------------------------------------------------------
    M("sevpr_final_prototypes_updated", "SE-VPR: exact prototypes updated by later training", PROTO,
      "(labels < K) & ~self.proto_final[lab])", "(labels < K))",
      T_MH + "test_mechanism_sevpr_raw_prototypes_are_frozen_clip_means_unchanged_by_training"),
    M("sevpr_running_mean_overwrites_final", "SE-VPR: running means overwrite exact prototypes", PROTO,
      "upd = (self.proto_counts > 0) & ~self.proto_final", "upd = self.proto_counts > 0",
      T_MH + "test_mechanism_sevpr_raw_prototypes_are_frozen_clip_means_unchanged_by_training"),
    M("sevpr_reg_detached", "SE-VPR regulariser: the refined prototypes detached", PROTO,
      "F.cosine_similarity(self.refined_stored[:K][old], ref[old], dim=-1)",
      "F.cosine_similarity(self.refined_stored[:K][old], ref[old].detach(), dim=-1)",
      T_MH + "test_mechanism_sevpr_regulariser_pulls_refined_prototypes_to_their_stored_values"),
    # -- SG-AKT ---------------------------------------------------------------------------------------
    M("sgakt_teacher_not_detached", "SG-AKT: the aggregated teacher not detached", SGAKT,
      "F.normalize(teacher.detach(), dim=-1)", "F.normalize(teacher, dim=-1)",
      T_MH + "test_mechanism_sgakt_kl_is_the_hand_computed_value_at_temperature_20_without_t2"),
    M("sgakt_kl_swapped", "SG-AKT: KL with teacher and student swapped", SGAKT,
      "F.kl_div(q.log_softmax(dim=1), p.log_softmax(dim=1)", "F.kl_div(p.log_softmax(dim=1), q.log_softmax(dim=1)",
      T_MH + "test_mechanism_sgakt_kl_is_the_hand_computed_value_at_temperature_20_without_t2"),
    M("sgakt_evicts_most_relevant", "SG-AKT pool: the most relevant snapshot evicted", SGAKT,
      "int(self.accumulated.argmin())", "int(self.accumulated.argmax())",
      T_MH + "test_mechanism_sgakt_pool_evicts_the_least_relevant_snapshot"),
    M("sgakt_snapshot_shares_embed", "SG-AKT: the snapshot shares the live embedding layer", SGAKT,
      "self.embed = copy.deepcopy(heads.embed)", "self.embed = heads.embed",
      T_MH + "test_mechanism_sgakt_trains_aggregator_and_student_from_snapshots_of_the_feature_path"),
    # -- RPN ------------------------------------------------------------------------------------------
    M("rpn_not_frozen", "RPN.FREEZE_AFTER_FIRST_TASK ignored", RPN,
      "self.requires_grad_(False)", "self.requires_grad_(True)",
      T_CL + "test_mechanism_rpn_frozen_after_first_task[True]"),
    # -- RoI pooler's gradient -------------------------------------------------------------------------
    M("roi_grad_outside_samples", "RoIAlign gradient: samples outside the image still count", POOL,
      "valid = ((c >= -1.0) & (c <= size)).to(c.dtype)", "valid = torch.ones_like(c)",
      T_POOL + "test_grad_equals_torchvision_roi_align_backward"),
    M("roi_grad_ignores_levels", "multi-scale RoIAlign gradient: every RoI on every level", POOL,
      "idx = None if ctx.levels is None else torch.where(ctx.levels == level)[0]", "idx = None",
      T_POOL + "test_multiscale_equals_torchvision"),
    # -- the continual loop: teacher, resume ----------------------------------------------------------
    M("loop_no_teacher", "continual loop: no teacher for the next task", LOOP,
      "teacher = copy.deepcopy(self.model) if (t > 0 and needs_teacher) else None", "teacher = None",
      T_LOOP + "test_teacher_modes_give_the_losses_their_teacher"),
    M("teacher_mode_always", "CONTINUAL.TEACHER never read as always", LOOP,
      "return mode == \"always\"", "return True",
      T_LOOP + "test_teacher_modes_give_the_losses_their_teacher"),
    M("resume_teacher_not_loaded", "resume: the previous task's weights not loaded", LOOP,
      "if upto > 0:\n            self.load_final(upto - 1)", "if upto > 0:\n            pass",
      T_LOOP + "test_mid_task_resume_with_a_teacher_is_bit_identical"),
    M("resume_repeats_a_step", "resume: the checkpoint's iteration trained again", TRAINER,
      "self.start_iter = int(extra[\"iteration\"]) + 1", "self.start_iter = int(extra[\"iteration\"])",
      T_LOOP + "test_mid_task_resume_with_a_teacher_is_bit_identical"),
    M("resume_missing_key_refused", "resume: a key missing from the old config.yaml crashes", LOOP,
      "for k in b if k in a and k not in IDENTITY_EXCLUDED", "for k in b if k not in IDENTITY_EXCLUDED",
      T_LOOP + "test_resume_accepts_keys_missing_from_an_old_config_yaml"),
    # -- evaluators -------------------------------------------------------------------------------------
    M("voc_iou_strict", "VOC matching: IoU exactly at the threshold is a miss", VOC,
      "best] >= iou_thresh", "best] > iou_thresh",
      T_EV + "test_iou_convention_no_plus_one"),
    M("voc_duplicates_are_tp", "VOC matching: duplicate detections count as TP", VOC,
      "tp[cand_idx[first]] = True", "tp[cand_idx] = True",
      T_EV + "test_duplicate_detection_is_false_positive"),
    M("voc_difficult_counted", "VOC matching: detections of difficult GT counted", VOC,
      "ignored = hit & difficult[best]", "ignored = np.zeros_like(hit)",
      T_EV + "test_difficult_gt_neither_positive_nor_penalised"),
    M("voc07_ten_points", "VOC07 AP: 10 recall levels instead of 11", VOC,
      "np.arange(0.0, 1.1, 0.1)]", "np.arange(0.0, 1.0, 0.1)]",
      T_EV + "test_voc_evaluator_perfect_detector_is_100_and_no_gt_class_nan"),
    M("stage_old_includes_new", "stage groups: the new task counted as old", CM,
      "for r in task_ranges[:t] for c in r]", "for r in task_ranges[:t + 1] for c in r]",
      T_EV + "test_build_stage_table_and_summary"),
    M("map_b_over_new", "mAP@B computed over the new classes", CM,
      "out[\"mAP@B\"] = _nanmean(old_vals)", "out[\"mAP@B\"] = _nanmean(new_vals)",
      T_EV + "test_stage_metrics_by_hand"),
]


# -- running ------------------------------------------------------------------------------------------
class MutantError(RuntimeError):
    """A mutant that cannot be applied (its snippet is missing or not unique)."""


def check_snippet(m: Mutant, root: str = REPO) -> str:
    """The file's text; raises MutantError unless the snippet occurs exactly once."""
    path = os.path.join(root, m.file)
    if not os.path.isfile(path):
        raise MutantError(f"mutant {m.name}: file {m.file} not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    n = text.count(m.original)
    if n == 0:
        raise MutantError(f"mutant {m.name}: snippet not found in {m.file}: {m.original!r}")
    if n > 1:
        raise MutantError(f"mutant {m.name}: snippet occurs {n} times in {m.file} (make it unique): {m.original!r}")
    return text


def copy_tree(dest: str) -> str:
    shutil.copytree(REPO, dest, ignore=COPY_IGNORE)
    return dest


def apply(m: Mutant, root: str) -> None:
    text = check_snippet(m, root)
    with open(os.path.join(root, m.file), "w", encoding="utf-8") as f:
        f.write(text.replace(m.original, m.replacement, 1))


SLOW_TESTS = ("tests/test_continual_loop.py",)  # tests that run whole continual runs
_FAILED = re.compile(r"^(FAILED|ERROR) (\S+)", re.M)


def _preload() -> None:
    """Import the heavy libraries once; every pytest run is a fork of this process, so it starts
    with them imported (the package under test is not imported here: each fork imports its copy)."""
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401
    try:
        import open_clip  # noqa: F401
        import ot  # noqa: F401
        import fvcore  # noqa: F401
        import pycocotools  # noqa: F401
    except ImportError:  # the tests will say what is missing
        pass


def _start(root: str, tests: Sequence[str], log: str) -> int:
    """Fork a pytest run of `tests` inside the copy `root`, output to `log`; its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(root)
        sys.path.insert(0, root)
        os.environ["PYTHONPATH"] = root + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
        import pytest

        import clcl_det

        if not os.path.realpath(clcl_det.__file__).startswith(os.path.realpath(root) + os.sep):
            raise RuntimeError(f"clcl_det imported from {clcl_det.__file__}, not from the mutated copy {root}")
        code = int(pytest.main(["-q", "-x", "-rfE", "-p", "no:cacheprovider", *tests]))
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: B036 - a fork never returns into the parent's code
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


@dataclass
class Result:
    mutant: Mutant
    status: str  # killed | SURVIVED | BROKEN
    killed_by: str
    seconds: float
    detail: str = ""


def _finish(m: Mutant, code: int, log: str, seconds: float) -> Result:
    with open(log, errors="replace") as f:
        out = f.read()
    hit = _FAILED.search(out)
    if code == 1:
        return Result(m, "killed", hit.group(2) if hit else "(see log)", seconds)
    if code == 0:
        return Result(m, "SURVIVED", "-", seconds)
    # usage error, nothing collected, interrupted, timed out: the check itself is wrong
    return Result(m, "BROKEN", f"pytest exit {code}", seconds, "\n".join(out.strip().splitlines()[-15:]))


def run_mutants(todo: Sequence[Mutant], workdir: str, jobs: int, timeout: float,
                report=lambda r: None) -> List[Result]:
    """Every mutant in its own copy, at most `jobs` pytest forks at once (the ones whose tests run
    whole continual runs first, so that they do not finish last alone)."""
    pending = sorted(todo, key=lambda m: not any(t.startswith(SLOW_TESTS) for t in m.tests))
    running, results = {}, []
    while pending or running:
        while pending and len(running) < jobs:
            m = pending.pop(0)
            root = os.path.join(workdir, m.name)
            t0 = time.perf_counter()
            try:
                copy_tree(root)
                apply(m, root)
            except MutantError as e:
                results.append(Result(m, "BROKEN", "snippet", 0.0, str(e)))
                report(results[-1])
                continue
            log = os.path.join(workdir, f"{m.name}.log")
            running[_start(root, m.tests, log)] = (m, root, log, t0)
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.perf_counter()
            for p, (m, root, log, t0) in list(running.items()):
                if now - t0 > timeout:
                    os.kill(p, 9)
            time.sleep(0.2)
            continue
        m, root, log, t0 = running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        results.append(_finish(m, code, log, time.perf_counter() - t0))
        report(results[-1])
        shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-j", "--jobs", type=int, default=2, help="mutants run at once")
    ap.add_argument("-m", "--mutant", action="append", default=[], help="run only these mutants (by name)")
    ap.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    ap.add_argument("--baseline", action="store_true", help="first run every listed test on the unmutated tree")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest call")
    args = ap.parse_args(argv)

    names = [m.name for m in MUTANTS]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SystemExit(f"mutation check: duplicate mutant names {dup}")
    unknown = [n for n in args.mutant if n not in names]
    if unknown:
        raise SystemExit(f"mutation check: unknown mutant(s) {unknown}; see --list")
    todo = [m for m in MUTANTS if not args.mutant or m.name in args.mutant]
    if args.list:
        for m in todo:
            print(f"{m.name:32s} {m.mechanism}\n{'':32s} {m.file}: {m.original!r} -> {m.replacement!r}\n"
                  f"{'':32s} tests: {', '.join(m.tests)}")
        return 0
    problems = []
    for m in todo:  # every snippet first: code that moved fails here, before anything runs
        try:
            check_snippet(m)
        except MutantError as e:
            problems.append(str(e))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"mutation check: {len(problems)} mutant(s) no longer apply; update MUTANTS in tools/mutation_check.py",
              file=sys.stderr)
        return 1
    jobs = max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 2) // jobs)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CLCL_TEST_THREADS"):  # before torch is imported
        os.environ[k] = str(threads)
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    t0 = time.perf_counter()
    _preload()
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as workdir:
        if args.baseline:
            root = copy_tree(os.path.join(workdir, "_baseline"))
            log = os.path.join(workdir, "_baseline.log")
            _, status = os.waitpid(_start(root, sorted({t for m in todo for t in m.tests}), log), 0)
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                with open(log, errors="replace") as f:
                    print("\n".join(f.read().strip().splitlines()[-30:]), file=sys.stderr)
                print(f"mutation check: the listed tests fail on the unmutated tree (pytest exit {code})", file=sys.stderr)
                return 1
            shutil.rmtree(root, ignore_errors=True)
            print(f"baseline: the listed tests pass on the unmutated tree ({time.perf_counter() - t0:.0f} s)", flush=True)
        results = run_mutants(todo, workdir, jobs, args.timeout,
                              lambda r: print(f"  {r.status:8s} {r.mutant.name} ({r.seconds:.0f} s)", flush=True))
    order = {m.name: i for i, m in enumerate(todo)}
    results.sort(key=lambda r: order[r.mutant.name])
    w = max(len(m.name) for m in todo)
    wm = max(len(m.mechanism) for m in todo)
    print(f"\n| {'mutant':{w}s} | {'mechanism':{wm}s} | killed by | time |")
    print(f"| {'-' * w} | {'-' * wm} | --- | ---: |")
    for r in results:
        by = r.killed_by if r.status == "killed" else f"**{r.status}** {r.killed_by}"
        print(f"| {r.mutant.name:{w}s} | {r.mutant.mechanism:{wm}s} | {by} | {r.seconds:.0f} s |")
    bad = [r for r in results if r.status != "killed"]
    for r in bad:
        print(f"\n{r.status}: {r.mutant.name} ({r.mutant.file}: {r.mutant.original!r} -> {r.mutant.replacement!r})"
              f"\n  tests: {', '.join(r.mutant.tests)}" + (f"\n{r.detail}" if r.detail else ""), file=sys.stderr)
    killed = len(results) - len(bad)
    print(f"\nmutation check: {killed} of {len(results)} mutants killed, {len(bad)} not "
          f"({time.perf_counter() - t0:.0f} s, {jobs} workers)")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
