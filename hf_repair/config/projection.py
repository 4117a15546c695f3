"""Arguments of the one-shot clean-space projection: which layers, and the alpha grid it chooses from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

TARGET_KEYWORDS = ("all-linear", "all")


def _default_alphas() -> list[float]:
    # From a near-collapse (alpha=1: weights scaled by each direction's energy share) to a
    # near-identity: small models need small alphas, wide transformers need large ones.
    return [1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6, 1e7]


@dataclass
class ProjectionArguments:
    """Layers to project and how strongly (method "projection", and the "projection+" methods' first step)."""

    _argument_group_name = "projection"

    # `Union[list[str], None, str]`, in this order: HfArgumentParser reads the type before NoneType,
    # so on the command line these are lists (`--target_modules query value`); it takes the default
    # of a list field only from a default_factory.
    target_modules: Union[list[str], None, str] = field(
        default_factory=lambda: "all-linear",
        metadata={
            "help": "Layers to repair: a list of exact names or dotted suffixes, a regex (matched with "
            "re.fullmatch against the full module name), 'all-linear' (every nn.Linear and "
            "transformers Conv1D) or 'all' (also nn.Conv2d). A single value with regex characters "
            "(*+?()[]{}|^$\\) is a regex: module names never contain them."
        },
    )
    exclude_modules: Union[list[str], None, str] = field(
        default=None,
        metadata={"help": "Layers never repaired, with the same matching rules as target_modules."},
    )
    alphas: list[float] = field(
        default_factory=_default_alphas,
        metadata={
            "help": "Grid of importance-scaling strengths to choose from. alpha=1 scales each clean "
            "direction by its energy share; alpha -> infinity keeps every direction the verified "
            "data uses (identity on their span)."
        },
    )
    alpha_scope: str = field(
        default="global",
        metadata={
            "help": "'global': one alpha for every layer. 'layer': then, clean space by clean space, try every "
            "alpha and no projection, keeping a change only if the held-out score improves (costs one pass "
            "over the verified split per space and alpha).",
            "choices": ["global", "layer"],
        },
    )
    alpha_search: str = field(
        default="coarse_to_fine",
        metadata={
            "help": "How many alphas to score (one pass over the verified split each): 'grid' scores them all; "
            "'coarse_to_fine' every third and the last, then up to two steps towards the better neighbour of the "
            "best (6 to 9 of the default 14 passes; the grid's choice when the held-out curve has one peak). Either way "
            "an alpha's scoring stops once it cannot reach the best accuracy scored (metric_for_selection='accuracy' "
            "without compute_metrics).",
            "choices": ["coarse_to_fine", "grid"],
        },
    )
    gram_dtype: str = field(
        default="float64",
        metadata={
            "help": "Accumulation dtype of the per-layer Gram matrices. The Gram squares the condition "
            "number, so float64 unless memory forbids it.",
            "choices": ["float64", "float32"],
        },
    )

    def validate(self) -> None:
        # HfArgumentParser hands `--target_modules all-linear` (or a regex) over as a one-element list.
        self.target_modules = unwrap_keyword(self.target_modules)
        self.exclude_modules = unwrap_keyword(self.exclude_modules)
        if self.target_modules is None or (
            isinstance(self.target_modules, (list, tuple)) and len(self.target_modules) == 0
        ):
            raise ValueError("target_modules is empty; pass layer names, a regex, 'all-linear' or 'all'.")
        if not self.alphas:
            raise ValueError("alphas is empty; give at least one alpha >= 1.")
        self.alphas = sorted(float(a) for a in self.alphas)
        if self.alphas[0] < 1.0:
            raise ValueError(f"Every alpha must be >= 1 (alpha < 1 amplifies weak directions), got {self.alphas}.")
        if self.alpha_scope not in ("global", "layer"):
            raise ValueError(f"alpha_scope must be 'global' or 'layer', got {self.alpha_scope!r}.")
        if self.alpha_search not in ("coarse_to_fine", "grid"):
            raise ValueError(f"alpha_search must be 'coarse_to_fine' or 'grid', got {self.alpha_search!r}.")
        if self.gram_dtype not in ("float64", "float32"):
            raise ValueError(f"gram_dtype must be 'float64' or 'float32', got {self.gram_dtype!r}.")


def unwrap_keyword(value: Optional[Union[list[str], str]]) -> Optional[Union[list[str], str]]:
    """A one-element list holding a keyword or a regex is that string (how HfArgumentParser hands it over)."""
    if isinstance(value, (list, tuple)) and len(value) == 1 and (
        value[0] in TARGET_KEYWORDS or re.search(r"[*+?()\[\]{}|^$\\]", value[0])
    ):
        return value[0]
    if isinstance(value, tuple):
        return list(value)
    return value
