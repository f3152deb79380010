"""The phantom's subject classes: naming, diagnosis label and which sequences exist.

This is the single table that says, for each class, how a subject is named (the way
RadGenome-Brain MRI names its sources, so that name-based diagnosis scoring applies
unchanged), which disease label it carries, which MRI sequences its source dataset
provides and whether that source is skull-stripped (BraTS is; ISLES22 and the WMH
challenge are not).

    python -m unibrain_hf.data.phantom.classes
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_SEQUENCES = ("t1n", "t1c", "t2w", "t2f", "dwi", "adc")


@dataclass(frozen=True)
class PhantomClass:
    """One subject class of the synthetic cohort."""

    key: str
    id_template: str  # formatted with the 1-based subject number
    disease: str
    sequences: tuple[str, ...]
    skull_stripped: bool
    source: str  # the RadGenome source dataset the class imitates

    def subject_id(self, index: int) -> str:
        return self.id_template.format(number=index + 1)


PHANTOM_CLASSES: dict[str, PhantomClass] = {
    cls.key: cls for cls in (
        PhantomClass("glioma", "PHANTOM-GLI-{number:05d}", "Glioblastoma",
                     ("t1n", "t1c", "t2w", "t2f"), True, "BraTS-GLI"),
        PhantomClass("meningioma", "PHANTOM-MEN-{number:05d}", "Meningioma",
                     ("t1n", "t1c", "t2w", "t2f"), True, "BraTS-MEN"),
        PhantomClass("metastasis", "PHANTOM-MET-{number:05d}", "Metastatic tumor",
                     ("t1n", "t1c", "t2w", "t2f"), True, "BraTS-MET"),
        PhantomClass("stroke", "strokecase{number:05d}", "Acute ischemic infarct",
                     ("dwi", "adc", "t2f"), False, "ISLES22"),
        PhantomClass("wmh", "WMH-{number:05d}", "White matter degeneration",
                     ("t1n", "t2f"), False, "WMH"),
        PhantomClass("normal", "PHANTOM-NOR-{number:05d}", "Normal",
                     ("t1n", "t1c", "t2w", "t2f"), True, "BraTS-style normal control"),
    )
}

# Subjects cycle through the classes in this order, so any cohort of six or more
# subjects contains every class.
CLASS_ORDER = tuple(PHANTOM_CLASSES)


def resolve_class(lesion_class: str | None, index: int) -> PhantomClass:
    """The class of subject ``index``: ``lesion_class`` if given, else round-robin."""
    if lesion_class is None:
        return PHANTOM_CLASSES[CLASS_ORDER[index % len(CLASS_ORDER)]]
    key = str(lesion_class).lower()
    if key not in PHANTOM_CLASSES:
        raise ValueError(f"unknown lesion class {lesion_class!r}; choose from {', '.join(CLASS_ORDER)}")
    return PHANTOM_CLASSES[key]


if __name__ == "__main__":
    for cls in PHANTOM_CLASSES.values():
        print(f"{cls.key:11s} {cls.subject_id(0):20s} {cls.disease:27s} {','.join(cls.sequences):16s} "
              f"skull-stripped={cls.skull_stripped}")
