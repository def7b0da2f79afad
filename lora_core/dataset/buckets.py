"""Aspect-ratio buckets: train on images of mixed shapes without stretching or cropping away half of them.

Buckets are (width, height) pairs, multiples of ``steps``, between ``min_reso`` and ``max_reso`` on each side, whose
area is at most ``resolution²``. An image goes to the bucket whose aspect ratio is closest to its own; batches are
built per bucket so a batch never mixes sizes.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def ratio(self) -> float:
        return self.width / self.height


def make_buckets(resolution: int, min_reso: int, max_reso: int, steps: int) -> list[Bucket]:
    """Every width from min to max in ``steps``, each with the tallest height that keeps the area ≤ resolution²."""
    max_area = resolution * resolution
    found = {Bucket(resolution, resolution)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, (max_area // width) // steps * steps)
        if height >= min_reso:
            found.add(Bucket(width, height))
            found.add(Bucket(height, width))
        width += steps
    return sorted(found, key=lambda b: (b.ratio, b.width))


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket with the closest aspect ratio (compared in log space so 1:2 and 2:1 are equally far from 1:1)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.ratio) - ratio), -b.width * b.height))


def bucket_info(assigned: list[Bucket], image_ratios: list[float]) -> dict:
    """sd-scripts' ``ss_bucket_info`` form: resolutions with counts plus the mean aspect-ratio error."""
    counts = Counter(assigned)
    ordered = sorted(counts, key=lambda b: (b.ratio, b.width))
    errors = [abs(b.ratio - r) for b, r in zip(assigned, image_ratios)]
    return {
        "buckets": {str(i): {"resolution": [b.width, b.height], "count": counts[b]} for i, b in enumerate(ordered)},
        "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0,
    }


def format_bucket_table(info: dict) -> str:
    rows = [f"  {v['resolution'][0]:>5} x {v['resolution'][1]:<5} {v['count']:>5} images" for v in info["buckets"].values()]
    return "buckets:\n" + "\n".join(rows) + f"\n  mean aspect-ratio error {info['mean_img_ar_error']:.4f}"

