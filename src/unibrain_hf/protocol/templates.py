"""Every prompt string UniBrain was trained and evaluated with, kept as data in one place.

The model learned these exact phrasings, so they are reproduced character for character
from the reference (UniBrain ``data/interleave_datasets/utils.py``, ``MRI_dataset.py``,
``evaluate_metrics.py`` and ``data/consts.py``); changing a single space changes what the
model sees. Nothing here draws random numbers — the sequence builder picks among these.

Contents:

* ``MODALITY_SYNONYMS`` — sequence code -> the spellings a prompt may use for it.
* ``DESCRIPTION_NOUNS`` / ``PLURAL_DESCRIPTION_NOUNS`` / ``GENERIC_DESCRIPTION_NOUNS`` — the
  word that follows a modality name ("T2w *scan*").
* ``TRANSLATION_QUESTION_TEMPLATES`` / ``TRANSLATION_THINK_TEMPLATES`` — ``{d_in}`` / ``{d_out}``
  placeholders; ``IMPRESSION_QUESTION_TEMPLATES`` / ``DIAGNOSIS_QUESTION_TEMPLATES`` — ``{nouns}``.
* ``GEN_THINK_SYSTEM_PROMPT``, the answer prefixes, and the evaluation prompts of the
  generation / diagnosis / unified tasks.
* ``RECON_PROMPTS`` — the 364 generic "describe the image" instructions of the stage-1
  self-alignment task, loaded from ``recon_prompts.json`` next to this file (the reference
  list has duplicates; they are kept, because sampling is uniform over the list *with* them).

    python -c "from unibrain_hf.protocol import templates as t; print(len(t.RECON_PROMPTS), t.TRANSLATION_QUESTION_TEMPLATES[0])"
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType

from . import tokens

# --------------------------------------------------------------------------------------
# Modality names
# --------------------------------------------------------------------------------------

_T1_SYNONYMS = ("T1-weighted", "t1-weighted", "T1W", "T1w", "T1", "t1", "T1n", "t1n")
_FLAIR_SYNONYMS = ("T2-FLAIR", "t2-flair", "T2 FLAIR", "t2 FLAIR", "FLAIR", "flair", "t2f")

#: Canonical BraTS-style codes plus the two spellings other source datasets use
#: (``T1`` for WMH, ``FLAIR`` for ISLES22/WMH). Order inside each tuple is the reference's.
MODALITY_SYNONYMS: MappingProxyType = MappingProxyType({
    "T1": _T1_SYNONYMS,
    "t1n": _T1_SYNONYMS,
    "t1c": ("T1C", "t1c", "T1-CE", "t1-ce"),
    "t2w": ("T2-weighted", "t2-weighted", "T2W", "T2w", "T2", "t2"),
    "t2f": _FLAIR_SYNONYMS,
    "FLAIR": _FLAIR_SYNONYMS,
    "adc": ("ADC", "adc"),
    "dwi": ("DWI", "dwi"),
})

#: The codes this package treats as first-class sequences (the parquet's file suffixes).
CANONICAL_MODALITIES = ("t1n", "t1c", "t2w", "t2f", "dwi", "adc")

# --------------------------------------------------------------------------------------
# Description nouns
# --------------------------------------------------------------------------------------

DESCRIPTION_NOUNS = ("image", "scan", "MRI", "MR image", "MRI scan", "MR scan", "representation")
PLURAL_DESCRIPTION_NOUNS = tuple(noun + "s" for noun in DESCRIPTION_NOUNS)
#: Uncountable nouns that are valid after one modality name or several.
GENERIC_DESCRIPTION_NOUNS = ("data", "information")

#: What follows a single modality name, and what follows a joined list of several.
SINGULAR_NOUN_CHOICES = DESCRIPTION_NOUNS + GENERIC_DESCRIPTION_NOUNS
PLURAL_NOUN_CHOICES = PLURAL_DESCRIPTION_NOUNS + GENERIC_DESCRIPTION_NOUNS

# --------------------------------------------------------------------------------------
# Modality translation (instruction, no loss) and its "thinking" restatement (with loss)
# --------------------------------------------------------------------------------------

TRANSLATION_QUESTION_TEMPLATES = (
    "Translate the given {d_in} into the corresponding {d_out}.",
    "Given the provided {d_in}, generate the equivalent {d_out}.",
    "Transform the following {d_in} to its {d_out} counterpart.",
    "Using the supplied {d_in}, create the matching {d_out}.",
    "Convert the given {d_in} into accurate {d_out} depiction.",
    "Translate the attached {d_in} into its {d_out}.",
    "From the provided {d_in}, synthesize the corresponding {d_out}.",
    "Generate the {d_out} based on the given {d_in}.",
    "Create accurate {d_out} from the supplied {d_in}.",
    "Please produce the {d_out} that corresponds to the provided {d_in}.",
)

TRANSLATION_THINK_TEMPLATES = (
    "I need to translate the given {d_in} into the corresponding {d_out}.",
    "to generate the equivalent {d_out}, I will use the provided {d_in}.",
    "I will transform the above {d_in} to its {d_out} counterpart.",
    "using the supplied {d_in}, I can create the matching {d_out}.",
    "I should convert the given {d_in} into accurate {d_out} depiction.",
    "I will translate the attached {d_in} into its {d_out}.",
    "from the provided {d_in}, I can synthesize the corresponding {d_out}.",
    "I need to generate the {d_out} based on the given {d_in}.",
    "I will create accurate {d_out} from the supplied {d_in}.",
    "I should produce the {d_out} that corresponds to the provided {d_in}.",
    "the current task is to translate {d_in} into {d_out}.",
    "my goal is to convert the {d_in} into {d_out} while preserving essential details.",
)

THINK_OPEN, THINK_CLOSE = tokens.THINK_OPEN, tokens.THINK_CLOSE

#: System text placed before the input image when a sample both generates and thinks.
#: Note the space before the newline: it is part of what the model was trained on.
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> image here"
)

# --------------------------------------------------------------------------------------
# Understanding tail: impression and diagnosis (question without loss, answer with loss)
# --------------------------------------------------------------------------------------

IMPRESSION_QUESTION_TEMPLATES = (
    "Based on the provided {nouns}, please describe the key observations and any notable findings.",
    "Examine the given {nouns} and summarize the main features and abnormalities present.",
    "Analyze the attached {nouns} and provide a detailed impression of the observed structures and any potential issues.",
    "Review the supplied {nouns} and outline the significant observations along with any clinical implications.",
    "Interpret the provided {nouns} and convey the essential findings and their relevance to patient care.",
    "Assess the given {nouns} and articulate the primary impressions, highlighting any areas of concern.",
    "Evaluate the attached {nouns} and summarize the critical observations, including any pathological findings.",
    "Consider the supplied {nouns} and describe the main features, noting any abnormalities or significant details.",
    "Look at the provided {nouns} and present a comprehensive impression of the observed anatomical structures.",
    "Study the given {nouns} and communicate the key findings, emphasizing any noteworthy observations.",
)

DIAGNOSIS_QUESTION_TEMPLATES = (
    "Based on the {nouns}, what is the most likely clinical diagnosis?",
    "Identify the primary pathology or condition demonstrated in these {nouns}.",
    "Analyze the {nouns} and provide a definitive diagnostic conclusion.",
    "What is the final assessment of the findings observed in the provided {nouns}?",
    "Based on the imaging features in the {nouns}, classify the observed abnormality.",
    "What pathological condition do these {nouns} suggest?",
    "Provide a final diagnosis for the patient based on the attached {nouns}.",
    "Determine the most probable nature of the lesion or finding shown in these {nouns}.",
    "Synthesize the findings from the {nouns} into a single final diagnosis.",
    "Evaluate the {nouns} and state the specific disease or condition present.",
)

IMPRESSION_ANSWER_PREFIX = "Impression: "
DIAGNOSIS_ANSWER_PREFIX = "Final Diagnosis: "

#: Which understanding questions follow the images, indexed by ``instruction_idx``.
INSTRUCTION_KINDS = ("generation_only", "impression", "diagnosis", "impression_and_diagnosis")

# --------------------------------------------------------------------------------------
# Evaluation prompts (fixed strings, no randomness)
# --------------------------------------------------------------------------------------

#: Generation task and the first instruction of the unified task; ``{target}`` is the raw
#: code with the substring ``t2f`` replaced by ``T2-FLAIR``.
EVAL_GENERATION_PROMPT_TEMPLATE = "Translate the attached MRI into its {target} image."
EVAL_GENERATION_TARGET_RENAMES = (("t2f", "T2-FLAIR"),)

EVAL_DIAGNOSIS_PROMPT = (
    "Based on the provided information, provide a detailed impression of the observed structures "
    "and any potential issues, and tell me what is the most likely clinical diagnosis?"
)

#: Unified task: instruction before every target after the first (raw code, no renaming).
UNIFIED_NEXT_TARGET_PROMPT_TEMPLATE = "Translate the attached MRI images into {target} image."
UNIFIED_IMPRESSION_PROMPT = (
    "Assess the given data and present a comprehensive impression of the observed anatomical structures."
)
UNIFIED_DIAGNOSIS_PROMPT = (
    "Based on the provided information, what is the most likely clinical diagnosis? "
    "Answer with Glioblastoma, Meningioma, or Metastatic tumor."
)

# --------------------------------------------------------------------------------------
# Stage-1 self-alignment prompts
# --------------------------------------------------------------------------------------

RECON_PROMPTS_FILE = Path(__file__).with_name("recon_prompts.json")
EXPECTED_RECON_PROMPT_COUNT = 364


def _load_recon_prompts() -> tuple[str, ...]:
    prompts = json.loads(RECON_PROMPTS_FILE.read_text(encoding="utf-8"))
    # A truncated or hand-edited file would silently change the training distribution.
    if len(prompts) != EXPECTED_RECON_PROMPT_COUNT or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(
            f"{RECON_PROMPTS_FILE} must hold {EXPECTED_RECON_PROMPT_COUNT} non-empty strings, "
            f"found {len(prompts)} entries")
    return tuple(prompts)


RECON_PROMPTS: tuple[str, ...] = _load_recon_prompts()
