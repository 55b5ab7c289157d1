"""Pruning: specs, schedules, scores, masks (unstructured, N:M, structured); the training
callback that follows the schedule is qat.lightning.callbacks.PruningCallback."""
from qat.prune.masks import (apply_masks, check_nm, global_masks, mask_sparsity, nm_mask,
                             sparsity_report, target_linears, unstructured_mask)
from qat.prune.pruner import calibration_norms, compute_masks, prune
from qat.prune.schedule import gradual_sparsity, last_update_at, sparsity_at
from qat.prune.scores import collect_input_norms, magnitude_score, wanda_score
from qat.prune.spec import PruneSpec, parse_nm
from qat.prune.structured import channel_masks, head_masks, shrink

__all__ = ["PruneSpec", "apply_masks", "calibration_norms", "channel_masks",
           "check_nm", "collect_input_norms", "compute_masks", "global_masks", "gradual_sparsity",
           "head_masks", "last_update_at", "magnitude_score", "mask_sparsity", "nm_mask", "parse_nm",
           "prune", "shrink", "sparsity_at", "sparsity_report", "target_linears",
           "unstructured_mask", "wanda_score"]
