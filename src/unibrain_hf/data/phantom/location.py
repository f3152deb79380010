"""Name a brain location (hemisphere and lobe or region) from its MNI coordinates.

Radiology reports localise a lesion as e.g. "right frontal lobe". The phantom knows every
lesion's position in MNI space, and coarse MNI landmarks are enough to name it: the
central sulcus runs from about y = -8 at the Sylvian level to y = -30 at the vertex, the
temporal lobe lies below the Sylvian fissure, the occipital lobe behind y = -70, the
cerebellum and brainstem below the tentorium.

    python -m unibrain_hf.data.phantom.location 30 10 40
"""

from __future__ import annotations

import sys


def hemisphere(x_mm: float) -> str:
    """MNI +x is the subject's right."""
    if abs(x_mm) < 3.0:
        return "midline"
    return "right" if x_mm > 0 else "left"


def region(x_mm: float, y_mm: float, z_mm: float) -> str:
    """Lobe or region containing the MNI point (x, y, z)."""
    ax = abs(x_mm)
    if z_mm < -18 and y_mm < -42:
        return "cerebellar hemisphere" if ax >= 8 else "vermis"
    if ax < 14 and z_mm < -8 and -42 <= y_mm < -8:
        return "brainstem"
    if ax < 26 and -32 < y_mm < 18 and -6 < z_mm < 18:
        return "basal ganglia" if y_mm > -12 else "thalamus"
    if ax >= 30 and -70 < y_mm < 25 and z_mm < -2 - 0.3 * y_mm:
        return "temporal lobe"
    if y_mm < -70 or (y_mm < -58 and z_mm < 12):
        return "occipital lobe"
    if y_mm > -8 - 0.3 * z_mm:
        return "frontal lobe"
    return "parietal lobe"


def describe_location(point_mm) -> str:
    """E.g. ``"right frontal lobe"``, ``"left cerebellar hemisphere"``, ``"brainstem"``."""
    x, y, z = (float(v) for v in point_mm)
    name = region(x, y, z)
    side = hemisphere(x)
    if name in ("brainstem", "vermis") or side == "midline":
        return name if name in ("brainstem", "vermis") else f"midline {name.replace(' lobe', '')} region"
    return f"{side} {name}"


if __name__ == "__main__":
    print(describe_location([float(v) for v in sys.argv[1:4]] if len(sys.argv) >= 4 else (30.0, 10.0, 40.0)))
