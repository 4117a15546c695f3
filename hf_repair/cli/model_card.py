"""The model card written next to the repaired model: MODEL_DIR's card, tagged, with a section on the repair."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..results import RepairResult

REPAIR_SUBDIR = "repair"  # OUT/repair: the saved projection, re-appliable to MODEL_DIR
TAG = "hf-repair"


def model_card(model_dir: Path, result: RepairResult, model_name: str) -> ModelCard:
    """MODEL_DIR's model card (or a new one) with the `hf-repair` tag and a section on the repair."""
    readme = model_dir / "README.md"
    if readme.is_file():
        card = ModelCard.load(readme, ignore_metadata_errors=True)
    else:
        card = ModelCard(f"---\n{ModelCardData(library_name='transformers').to_yaml()}\n---\n\n# {model_dir.name}\n")
    tags = list(card.data.tags or [])
    card.data.tags = tags + [TAG] if TAG not in tags else tags
    m = result.metrics
    projection = result.config.method == "projection"
    if not projection and "num_flagged" not in m:  # head refit, auto
        outcome = (
            f"Method {result.config.method!r}"
            + (f" chose {m['chosen']!r}" if m.get("chosen") else "")
            + f"; held-out verified accuracy {m['accuracy_before']:.4f} -> {m['accuracy_after']:.4f}; the repair was "
            + ("adopted." if result.adopted else "not adopted (nothing beat the trained model), so the weights are unchanged.")
        )
    elif not projection:
        outcome = (
            f"{m['num_flagged']} of {m['num_train']} training samples were flagged as harmful and the model was "
            f"fine-tuned for {m['steps']} steps; the repair was "
            + ("adopted." if result.adopted else "not adopted (nothing beat the trained model), so the weights are unchanged.")
        )
    elif result.adopted:
        outcome = (
            f"The repair was adopted: {m['num_layers']} layers ({m['num_clean_spaces']} clean spaces) were projected "
            f"with alpha = {m['alpha']:g}."
        )
    else:
        outcome = "No projection beat the unrepaired model on held-out verified samples, so the weights are unchanged."
    saved = (
        f"\nThe saved repair is in `{REPAIR_SUBDIR}/`: `RepairResult.from_pretrained(\"{REPAIR_SUBDIR}\").apply_to(model)`\n"
        f"re-creates these weights from the original checkpoint, and `.undo()` on its result reverts them.\n"
        if projection else ""
    )
    card.text = card.text.rstrip() + f"""

## Repaired with hf_repair

This {model_name} was repaired with hf_repair ({result.config.method}) using {m['num_verified']} verified
samples. {outcome}

| held-out verified accuracy | before | after |
|---|---|---|
| {result.config.method} | {m['accuracy_before']:.4f} | {m['accuracy_after']:.4f} |
{saved}"""
    return card
