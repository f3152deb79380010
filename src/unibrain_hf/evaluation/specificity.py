"""Does an imputation follow its input? The same noise, fed with different subjects' slices.

An imputation that reproduces the subject's anatomy matches *its own* true target better than the
true targets of other subjects. A model that learned only what a brain looks like matches its own
truth no better than anyone else's, and, started from the same noise, gives nearly the same image
whatever the input. :func:`input_specificity` measures both on the evaluation slices of a set of
subjects, with one flow-noise seed shared by every call:

* ``own_vs_other_truths``: per subject, PSNR(imputed, own truth) − mean PSNR(imputed, other
  subjects' truths), with a bootstrap interval (> 0: the imputation carries the subject's anatomy);
* ``imputations_similarity`` vs ``truths_similarity``: mean PSNR between the imputations of two
  different subjects, and between their true targets (imputations far more alike than the truths:
  the output is set by the noise, not by the input).

    python -c "from unibrain_hf.evaluation.specificity import input_specificity; help(input_specificity)"
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch

from . import calls
from .cohort import evaluation_slices
from .metrics import psnr as _psnr
from .results import cap_psnr
from .statistics import paired_difference


def psnr(truth, image) -> float:
    return cap_psnr(_psnr(truth, image))  # identical images would otherwise give infinity


def input_specificity(pipe, cohort, split: str, subjects: list[str], source: str, targets: list[str],
                      num_inference_steps: int, seed: int = 0, **settings) -> dict:
    """Per target: the own-vs-other-truths paired difference and the two similarities (module docstring).

    Every subject is imputed with the generation task from ``source`` alone, with the flow noise of
    ``torch.Generator().manual_seed(seed)``; pairs of slices of different shapes are left out.
    """
    slices = list(evaluation_slices(cohort, split, subjects, [source, *targets]).values())
    if len(slices) < 2:
        raise ValueError(f"input_specificity needs at least two subjects with {source} and {targets}, "
                         f"got {len(slices)}")
    imputed = []
    for subject in slices:
        rgb, _ = calls.impute_slice(pipe, {source: subject[source]}, targets, torch.Generator().manual_seed(seed),
                                    num_inference_steps, task="generation", **settings)
        imputed.append({t: calls.reference_ensemble([rgb[t]]) for t in targets})
    out = {"subjects": len(slices), "seed": seed}
    for target in targets:
        truths = [subject[target] for subject in slices]
        outputs = [images[target] for images in imputed]
        own, other = [], []
        for i, output in enumerate(outputs):
            others = [psnr(truths[j], output) for j in range(len(slices))
                      if j != i and truths[j].shape == output.shape]
            if others:
                own.append(psnr(truths[i], output))
                other.append(float(np.mean(others)))
        pairs = [(i, j) for i, j in combinations(range(len(slices)), 2) if outputs[i].shape == outputs[j].shape]
        out[target] = {
            "own_truth_psnr": float(np.mean(own)),
            "other_truths_psnr": float(np.mean(other)),
            "own_vs_other_truths": paired_difference(own, other).to_dict(),
            "imputations_similarity": float(np.mean([psnr(outputs[i], outputs[j]) for i, j in pairs])),
            "truths_similarity": float(np.mean([psnr(truths[i], truths[j]) for i, j in pairs])),
        }
    return out


__all__ = ["input_specificity"]
