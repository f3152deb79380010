"""ROUGE-1/2/L F-measures of generated reports, computed offline with ``rouge_score``.

Thin ``evaluate`` wrapper over :func:`unibrain_hf.evaluation.metrics.rouge_scores`; use it
where ``evaluate.load("rouge")`` cannot reach the Hub:

    python -c "import evaluate; m = evaluate.load('src/unibrain_hf/evaluation/metric_modules/unibrain_rouge'); print(m.compute(predictions=['the cat sat'], references=['the cat ran']))"
"""

import datasets
import evaluate
from unibrain_hf.evaluation.metrics import DEFAULT_ROUGE_TYPES
from unibrain_hf.evaluation.metrics import rouge_scores

_DESCRIPTION = """ROUGE F-measures (default rouge1, rouge2, rougeL) between generated and reference reports,
from Google's rouge_score package with Porter stemming. Text is lower-cased and reduced to [a-z0-9]
tokens. Scores are arithmetic means over pairs (no bootstrap aggregation)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated texts.
    references: reference texts, one per prediction.
    rouge_types: ROUGE variants to report (default ["rouge1", "rouge2", "rougeL"]).
    use_stemmer: Porter-stem tokens before matching (default True).
Returns:
    one mean F-measure per ROUGE type, and per_item: the F-measures of each pair.
"""

_CITATION = """@inproceedings{lin-2004-rouge,
  title={{ROUGE}: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew}, booktitle={Text Summarization Branches Out}, pages={74--81}, year={2004}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class UnibrainRouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, rouge_types=DEFAULT_ROUGE_TYPES, use_stemmer=True):
        return rouge_scores(list(predictions), list(references), rouge_types=rouge_types, use_stemmer=use_stemmer)
