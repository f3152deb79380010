"""SSIM of generated MRI slices or volumes, as UniBrain's evaluation computes it.

Thin ``evaluate`` wrapper over :func:`unibrain_hf.evaluation.metrics.ssim` (images / 255,
scikit-image ``structural_similarity`` with ``data_range=1`` and default 7-wide window,
7×7×7 for volumes):

    python -c "import evaluate; m = evaluate.load('src/unibrain_hf/evaluation/metric_modules/unibrain_ssim'); print(m.compute(predictions=[[[9] * 7] * 7], references=[[[9] * 7] * 7]))"
"""

import evaluate
from unibrain_hf.evaluation.metric_modules import image_pair_features
from unibrain_hf.evaluation.metric_modules import score_image_pairs
from unibrain_hf.evaluation.metrics import ssim

_DESCRIPTION = """Structural similarity between a generated and a ground-truth MRI slice (y, x) or volume
(z, y, x). Both are divided by `max_value` (255 by default: uint8 intensities) and compared with
scikit-image's structural_similarity at data_range=1 with its defaults (uniform 7-wide window, K1 0.01,
K2 0.03, sample covariance) over the whole array, background included. Every side must be >= 7."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated images, each a 2-D or 3-D array of intensities in [0, max_value].
    references: ground-truth images, same shapes.
    max_value: intensity that maps to 1.0 (default 255). Use 1.0 for float images in [0, 1].
Returns:
    ssim: mean SSIM over the pairs.
    per_item: the SSIM of each pair.
"""

_CITATION = """@article{wang2004image,
  title={Image quality assessment: from error visibility to structural similarity},
  author={Wang, Zhou and Bovik, Alan C and Sheikh, Hamid R and Simoncelli, Eero P},
  journal={IEEE Transactions on Image Processing}, volume={13}, number={4}, pages={600--612}, year={2004}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class UnibrainSsim(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # One schema per accepted rank: 2-D slices and 3-D volumes.
            features=image_pair_features(),
        )

    def _compute(self, predictions, references, max_value=255.0):
        mean, per_item = score_image_pairs(ssim, predictions, references, max_value)
        return {"ssim": mean, "per_item": per_item}
