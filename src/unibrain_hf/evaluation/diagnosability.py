"""How diagnosable is a subject from its images at all? A supervised classifier as the reference point.

The model's diagnosis is text generated after images; when it scores near the best constant answer,
either the model has not learnt to read the images or the images do not carry the class. This module
separates the two: it fits a small convolutional classifier with cross-entropy on a cohort's training
slices (the chosen sequences stacked as channels, every lesion slice of a subject, or the middle half
of a subject without a lesion) and scores it on the evaluation slices of held-out subjects — the same
slice the model's evaluation reads.

Given ``replaced_by`` (a directory of ``<subject>-<code>.png``, e.g. the ``images/`` of a unified
imputation run), the same classifier is also scored with those sequences replaced by the images found
there. That measures whether imputed images carry the class information of the real ones. It also
bounds what imputation can add at all: an imputation is a function of its input (and of noise), so a
diagnosis made after imputing from T1n cannot know more about the class than T1n itself carries.

    python -c "from unibrain_hf.evaluation.diagnosability import classifier_baseline as f; \\
print(f('runs/demo/cohort', ['t1n', 't1c', 't2w', 't2f'], eval_split='val')['summary'])"
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.intensity import lesion_slice_indices
from ..data.radgenome import iter_subject_records
from ..protocol.diagnosis import RulesLike, as_rules
from .cohort import check_codes, evaluation_slices, index_cohort, scaled_volumes, select_subjects
from .predictability import canvas_side, check_fit_settings, network_batch
from .statistics import best_constant_answer, bootstrap_mean, paired_difference


def _network(channels: int, width: int, classes: int) -> torch.nn.Sequential:
    # Three conv + pool stages (a 64² slice becomes 8²) and a global average: a lesion anywhere in the
    # slice reaches the decision, at a few thousand parameters, so a CPU fits it in about a minute.
    layers, previous = [], channels
    for out in (width, width, 2 * width):
        layers += [torch.nn.Conv2d(previous, out, 3, padding=1), torch.nn.GELU(), torch.nn.MaxPool2d(2)]
        previous = out
    layers += [torch.nn.Conv2d(previous, previous, 3, padding=1), torch.nn.GELU(),
               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(previous, classes)]
    return torch.nn.Sequential(*layers)


def _training_slices(cohort, sources: list[str], split: str, rules) -> tuple[list[np.ndarray], list[str]]:
    stacks, labels = [], []
    for record in iter_subject_records(cohort, split=split):
        if not all(code in record.volumes for code in sources):
            continue
        volumes = scaled_volumes(record, sources)
        lesion = lesion_slice_indices(record.mask)
        depth = volumes[sources[0]].shape[0]
        # Every slice the lesion touches; without a lesion, the middle half (the scored slice of a normal
        # subject is its middle slice, and the edges of the volume hold little brain).
        chosen = list(lesion) if len(lesion) else list(range(depth // 4, max(depth // 4 + 1, 3 * depth // 4)))
        label = rules.classify(record.subject_id)
        for index in chosen:
            stacks.append(np.stack([volumes[code][int(index)] for code in sources]))
            labels.append(label)
    if not stacks:
        raise ValueError(f"no {split} subject of {cohort} has every one of {sources}")
    return stacks, labels


def _replacements(directory, subjects: list[str], sources: list[str], held_out: dict) -> dict[str, dict]:
    from .tasks import replacement_images, resolve_replacement_dir

    folder = resolve_replacement_dir(directory)
    found = {subject: replacement_images(folder, subject, sources) for subject in subjects}
    if not any(found.values()):
        raise ValueError(f"replaced_by {folder} holds no <subject>-<code>.png for any scored subject and any of "
                         f"{sources}")
    for subject, images in found.items():
        for code, image in images.items():
            if image.shape != held_out[subject][code].shape:
                raise ValueError(f"{folder / f'{subject}-{code}.png'} is {image.shape}, but the scored slice "
                                 f"is {held_out[subject][code].shape}")
    return found


def classifier_baseline(cohort, sources, *, eval_split: str = "test", subjects: list[str] | None = None,
                        train_split: str = "train", steps: int = 3000, batch_size: int = 32, width: int = 16,
                        learning_rate: float = 2e-3, seed: int = 0, replaced_by=None,
                        rules: RulesLike = None) -> dict:
    """Fit the classifier on ``train_split`` and score it on the evaluation slices of ``eval_split``.

    ``subjects`` defaults to every subject of ``eval_split`` with all ``sources``. Returns
    ``{"per_subject": [{subject_id, ground_truth, predicted, correct[, replaced, replaced_predicted,
    replaced_correct]}], "summary": {accuracy, accuracy_interval, best_constant, vs_best_constant[,
    replaced_accuracy, replaced_accuracy_interval, replaced_vs_best_constant, replaced_vs_real]},
    "settings": {...}}``; intervals are paired percentile-bootstrap dicts over subjects.
    """
    sources = check_codes(sources, "sources")
    check_fit_settings(steps=steps, batch_size=batch_size, width=width)
    resolved = as_rules(rules)
    eligible = select_subjects(index_cohort(cohort, eval_split), sources, [])
    if subjects is None:
        subjects = eligible
    known = set(eligible)
    lacking = [subject for subject in subjects if subject not in known]
    if lacking:
        raise ValueError(f"subjects {lacking[:5]} of {eval_split!r} do not have every one of {sources}")
    held_out = evaluation_slices(cohort, eval_split, subjects, sources)
    if not held_out:
        raise ValueError(f"no subject of {eval_split!r} in {cohort} has every one of {sources}")
    subjects = list(held_out)
    replaced = _replacements(replaced_by, subjects, sources, held_out) if replaced_by is not None else None

    stacks, labels = _training_slices(cohort, sources, train_split, resolved)
    classes = [word for word in resolved.class_words if word in set(labels)]
    side = canvas_side(stacks + [image for images in held_out.values() for image in images.values()])
    x = network_batch(stacks, side)
    y = torch.tensor([classes.index(label) for label in labels])

    torch_rng = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = _network(len(sources), width, len(classes))
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-2)
    for _ in range(steps):
        batch = torch.randint(len(x), (batch_size,), generator=torch_rng)
        images = x[batch]
        # Left-right flips: a lesion's hemisphere is not part of its class.
        flip = torch.rand(batch_size, generator=torch_rng) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        loss = torch.nn.functional.cross_entropy(network(images), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def predict(stacks_by_subject: list[np.ndarray]) -> list[str]:
        with torch.no_grad():
            return [classes[i] for i in network(network_batch(stacks_by_subject, side)).argmax(-1).tolist()]

    truths = [resolved.classify(subject) for subject in subjects]
    real = predict([np.stack([held_out[s][code] for code in sources]) for s in subjects])
    rows = [{"subject_id": s, "ground_truth": t, "predicted": p, "correct": p == t}
            for s, t, p in zip(subjects, truths, real)]
    constant_class, _ = best_constant_answer(truths)
    constant_correct = [float(t == constant_class) for t in truths]
    correct = [float(row["correct"]) for row in rows]
    summary = {"accuracy": float(np.mean(correct)), "accuracy_interval": bootstrap_mean(correct).to_dict(),
               "best_constant": {"class": constant_class, "accuracy": float(np.mean(constant_correct))},
               "vs_best_constant": paired_difference(correct, constant_correct).to_dict()}
    if replaced is not None:
        swapped = predict([np.stack([replaced[s].get(code, held_out[s][code]) for code in sources])
                           for s in subjects])
        for row, prediction in zip(rows, swapped):
            row.update(replaced=sorted(replaced[row["subject_id"]]), replaced_predicted=prediction,
                       replaced_correct=prediction == row["ground_truth"])
        after = [float(row["replaced_correct"]) for row in rows]
        summary.update(replaced_accuracy=float(np.mean(after)),
                       replaced_accuracy_interval=bootstrap_mean(after).to_dict(),
                       replaced_vs_best_constant=paired_difference(after, constant_correct).to_dict(),
                       replaced_vs_real=paired_difference(after, correct).to_dict())
    settings = dict(sources=sources, train_split=train_split, eval_split=eval_split, steps=steps,
                    batch_size=batch_size, width=width, learning_rate=learning_rate, seed=seed, classes=classes,
                    training_slices=len(stacks), canvas=side, final_training_loss=float(loss.detach()),
                    replaced_by=None if replaced_by is None else str(replaced_by))
    return {"per_subject": rows, "summary": summary, "settings": settings}


__all__ = ["classifier_baseline"]
