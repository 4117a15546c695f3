"""Test helpers shared by several test modules."""

import numpy as np
import torch


class PadCollator:
    """DataCollatorWithPadding without a tokenizer file: pads input_ids with 0 and builds the mask."""

    def __call__(self, rows):
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), longest, dtype=torch.long)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.as_tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([int(r["labels"]) for r in rows])}


def with_image_transform(dataset):
    """The `run_image_classification.py` layout: raw `image`/`label` columns, `set_transform` builds `pixel_values`."""
    raw = dataset.with_format(None).rename_columns({"pixel_values": "image", "labels": "label"})

    def transform(batch):
        return {"pixel_values": [torch.tensor(np.asarray(im, dtype=np.float32)) for im in batch["image"]],
                "label": batch["label"]}

    raw.set_transform(transform)
    return raw


def image_collate(rows):
    """A hand-written image collator that needs the `label` key, as such collators do."""
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "labels": torch.tensor([int(r["label"]) for r in rows])}
