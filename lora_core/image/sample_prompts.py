"""Sample prompts in sd-scripts' form: one per line, options after the prompt.

``a red circle --n blurry --w 512 --h 768 --s 28 --l 7.5 --d 42`` — ``--n`` negative prompt, ``--w``/``--h`` size,
``--s`` steps, ``--l`` CFG scale, ``--d`` seed. Lines starting with ``#`` and blank lines are ignored. A bad option is
an error naming the prompt's line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

OPTION = re.compile(r"\s--(n|w|h|s|l|d)\s+")


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance: float = 7.0
    seed: Optional[int] = None


def parse_line(line: str, width: int, height: int, steps: int, guidance: float, where: str) -> SamplePrompt:
    parts = OPTION.split(" " + line.strip())
    p = SamplePrompt(parts[0].strip(), width=width, height=height, steps=steps, guidance=guidance)
    for flag, value in zip(parts[1::2], parts[2::2]):
        value = value.strip()
        try:
            if flag == "n":
                p.negative = value
            elif flag in ("w", "h"):
                size = int(value)
                if size < 64 or size % 8:
                    raise ValueError("must be a multiple of 8, at least 64")
                setattr(p, "width" if flag == "w" else "height", size)
            elif flag == "s":
                p.steps = max(1, min(1000, int(value)))
            elif flag == "l":
                p.guidance = float(value)
            elif flag == "d":
                p.seed = int(value)
        except ValueError as e:
            raise ValueError(f"sample.sample_prompts: {where}: --{flag} {value!r}: {e}") from None
    return p


def parse_sample_prompts(source: Any, cfg) -> list[SamplePrompt]:
    """From a list of strings or a .txt file path; sizes default to the training resolution."""
    if not source:
        return []
    if isinstance(source, str) and Path(source).is_file():
        lines = [(f"{Path(source).name} line {n}", text)
                 for n, text in enumerate(Path(source).read_text(encoding="utf-8").splitlines(), start=1)]
    elif isinstance(source, str):
        lines = [("prompt 1", source)]
    else:
        lines = [(f"prompt {n}", str(text)) for n, text in enumerate(source, start=1)]
    res = cfg.data.resolution
    return [parse_line(text, res, res, cfg.sample.sample_steps, cfg.sample.sample_guidance_scale, where)
            for where, text in lines if text.strip() and not text.strip().startswith("#")]
