"""Diagnosis accuracy with UniBrain's class-word rule, as an ``evaluate`` metric.

Thin wrapper over :func:`unibrain_hf.evaluation.diagnosis.score_diagnoses`: the true class
comes from each subject id (``-GLI-`` → "Gli", ...), and a generated diagnosis is correct
when it contains that word, case-insensitively:

    python -c "import evaluate; m = evaluate.load('src/unibrain_hf/evaluation/metric_modules/unibrain_diagnosis_accuracy'); print(m.compute(predictions=['Glioblastoma.'], references=['BraTS-GLI-00001-000']))"
"""

import datasets
import evaluate
from unibrain_hf.evaluation.diagnosis import DEFAULT_FALLBACK_CLASS
from unibrain_hf.evaluation.diagnosis import DiagnosisRules
from unibrain_hf.evaluation.diagnosis import score_diagnoses

_DESCRIPTION = """Accuracy of generated diagnoses. References are subject ids; each id's class word comes
from the first matching rule (-GLI- Gli, -MEN- Mening, -MET- Meta, strokecase Infarct, -NOR- Normal,
else Degeneration). A prediction is correct when the lower-cased class word is a substring of the
lower-cased prediction, the rule of the UniBrain evaluation."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated diagnosis texts.
    references: subject ids, one per prediction (e.g. "BraTS-GLI-00001-000").
    class_rules: optional ordered mapping {subject-id substring: class word} replacing the defaults.
    fallback_class: class of ids no rule matches when class_rules is given (default "Degeneration").
Returns:
    accuracy: correct / total; correct; total; per_item: ground truth, parsed label and correctness.
"""

_CITATION = """@misc{unibrain,
  title={UniBrain: unified brain MRI imputation and reasoning}, note={evaluation protocol, diagnosis task}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class UnibrainDiagnosisAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, class_rules=None, fallback_class=DEFAULT_FALLBACK_CLASS):
        rules = None if class_rules is None else DiagnosisRules.from_mapping(class_rules, fallback_class)
        records = score_diagnoses(list(references), list(predictions), rules)
        correct = sum(record["correct"] for record in records)
        return {"accuracy": correct / len(records), "correct": correct, "total": len(records), "per_item": records}
