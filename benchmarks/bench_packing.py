"""CPU throughput of the packed training stream (``PackedDataset``) with 0 and 2 DataLoader workers.

Workload: a synthetic cohort of 16 subjects, each with 4 sequences (t1n, t1c, t2w, t2f) of
48×160×160 float32 voxels (a bright ellipsoid "brain" with a cube lesion and its mask); the
stage-2/3 unified task at UniBrain's slice size (slices padded to 256×256), UniBrain's processor
geometry (VAE 512/256/16 → 16×16 = 256 latent tokens per image, ViT 980/224/14 → 18×18 = 324
tokens), condition dropout 0.1 / 0.3 / 0.3 and the token budget 8192 / 10240 / 8192
(expected / max / max per sample). The stream is endless (the deployment setting); for each
worker count the first pack (worker start-up + warm-up) is timed separately, then packs are
drawn until ``--seconds`` have passed.

The tokenizer is the BAGEL test fixture's (converted into a temporary directory): it splits
text into many more tokens than Qwen2's, so text-heavy samples are longer than in real training.

Run from the repository root (about 1.5 minutes on a 2-core machine):

    python benchmarks/bench_packing.py --seconds 30 --json runs/bench/packing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from unibrain_hf import UniBrainProcessor  # noqa: E402
from unibrain_hf.data.packed_dataset import PackedDataset, TokenBudget, packed_dataloader  # noqa: E402
from unibrain_hf.data.schema import SubjectRecord  # noqa: E402
from unibrain_hf.processing.packing import DropoutProbabilities  # noqa: E402

DEFAULT_FIXTURE = str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "bagel_tiny")
CODES = ("t1n", "t1c", "t2w", "t2f")
SHAPE_ZYX = (48, 160, 160)


def synthetic_subject(number: int) -> SubjectRecord:
    """An ellipsoid head with sequence-specific contrast, noise and a cube lesion (with its mask)."""
    rng = np.random.default_rng(number)
    z, y, x = np.ogrid[:SHAPE_ZYX[0], :SHAPE_ZYX[1], :SHAPE_ZYX[2]]
    inside = ((z - 24) / 22.0) ** 2 + ((y - 80) / 70.0) ** 2 + ((x - 80) / 60.0) ** 2 <= 1.0
    mask = np.zeros(SHAPE_ZYX, np.float32)
    cz, cy, cx = 18 + number % 12, 60 + number % 30, 55 + number % 40
    mask[cz:cz + 8, cy:cy + 16, cx:cx + 16] = 1
    volumes = {}
    for i, code in enumerate(CODES):
        volume = rng.normal(300 + 80 * i, 40, SHAPE_ZYX).astype(np.float32)
        volume[mask > 0] *= 1.6 if i % 2 else 0.6
        volume[~np.broadcast_to(inside, SHAPE_ZYX)] = 0
        volumes[code] = np.clip(volume, 0, None)
    findings = {code: f"On {code} a lesion of 16 x 16 x 8 mm in the left frontal lobe." for code in CODES}
    return SubjectRecord(f"bench-{number:03d}", volumes, findings=findings, impression="Left frontal mass.",
                         disease=["Glioma"], mask=mask)


def fixture_tokenizer(fixture: str, tmp: str):
    from transformers import AutoTokenizer

    from unibrain_hf.convert import convert_bagel_checkpoint

    convert_bagel_checkpoint(Path(fixture), Path(tmp) / "model")
    return AutoTokenizer.from_pretrained(str(Path(tmp) / "model" / "tokenizer"))


def measure(dataset: PackedDataset, num_workers: int, seconds: float) -> dict:
    started = time.perf_counter()
    loader = iter(packed_dataloader(dataset, num_workers=num_workers, prefetch_factor=2))
    first = next(loader)
    first_s = time.perf_counter() - started
    packs, samples, tokens = 0, 0, 0
    timed_start = time.perf_counter()
    while time.perf_counter() - timed_start < seconds:
        batch = next(loader)
        packs, samples, tokens = packs + 1, samples + batch.num_samples, tokens + batch.sequence_length
    elapsed = time.perf_counter() - timed_start
    del loader  # stops the workers
    return {"num_workers": num_workers, "first_pack_s": round(first_s, 2), "timed_s": round(elapsed, 2),
            "packs": packs, "samples": samples, "packs_per_s": round(packs / elapsed, 3),
            "samples_per_s": round(samples / elapsed, 2), "tokens_per_s": round(tokens / elapsed),
            "mean_pack_tokens": round(tokens / max(packs, 1)),
            "mean_samples_per_pack": round(samples / max(packs, 1), 2),
            "first_pack_tokens": first.sequence_length}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="timed duration per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--fixture", default=DEFAULT_FIXTURE)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    torch.set_num_threads(1)  # packing is per-sample Python/PIL work; workers, not threads, parallelise it

    t0 = time.perf_counter()
    records = [synthetic_subject(i) for i in range(16)]
    cohort_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = fixture_tokenizer(args.fixture, tmp)
    processor = UniBrainProcessor(tokenizer)  # UniBrain's geometry: 512/256/16 and 980/224/14
    budget = TokenBudget(expected_num_tokens=8192, max_num_tokens=10240, max_num_tokens_per_sample=8192)
    dropout = DropoutProbabilities(text=0.1, vit=0.3, vae=0.3)

    results = []
    for num_workers in args.workers:
        dataset = PackedDataset(records, "unified", processor, dropout, budget, seed=42)
        load_before = os.getloadavg()[0]
        result = measure(dataset, num_workers, args.seconds)
        # Other processes on a small machine change these numbers a lot; record how busy it was.
        result["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        if num_workers == 0:
            result["stats"] = dataset.stats
        results.append(result)
        print(json.dumps(result), flush=True)
    # Single-sample cost, for reading the pack rates: build + count + pack one sample, no DataLoader.
    dataset = PackedDataset(records, "unified", processor, dropout, budget, seed=7)
    t0 = time.perf_counter()
    list(islice(iter(dataset), 3))
    report = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
              "cpus": os.cpu_count(), "cohort_build_s": round(cohort_s, 2), "results": results,
              "three_packs_in_process_s": round(time.perf_counter() - t0, 2)}
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
