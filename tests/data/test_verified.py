"""The verified split's folds: variable-length samples ordered longest first within a fold, the folds unchanged."""

import datasets
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_repair import RepairConfig, Repairer
from hf_repair.data import VerifiedSplit, stratified_folds

from helpers import PadCollator


def reviews(n=90, padded_to=None, seed=0):
    """Token lists of 3-30 tokens, as a tokenizer without padding gives; `padded_to`: padded with a mask instead."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 31, size=n)
    labels = np.arange(n) % 2
    ids = [(rng.integers(3, 30, size=k) + 29 * y).tolist() for k, y in zip(lengths, labels, strict=True)]
    columns = {"input_ids": ids, "labels": labels.tolist()}
    if padded_to is not None:
        columns["attention_mask"] = [[1] * len(i) + [0] * (padded_to - len(i)) for i in ids]
        columns["input_ids"] = [i + [0] * (padded_to - len(i)) for i in ids]
    return datasets.Dataset.from_dict(columns)


def split_of(dataset, batch_size=8):
    return VerifiedSplit(dataset, num_folds=3, batch_size=batch_size, seed=0, collate_fn=PadCollator(),
                         input_names={"input_ids", "attention_mask"})


def test_each_fold_holds_the_same_samples_longest_first_and_pads_less():
    dataset = reviews()
    split = split_of(dataset)
    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    for fold, members in zip(split.fold_indices, stratified_folds(np.array(dataset["labels"]), 3, seed=0), strict=True):
        assert sorted(fold.tolist()) == members.tolist()
        assert np.all(np.diff(lengths[fold]) <= 0)
    labels = torch.cat([b.labels for b in split.batches()])
    assert labels.tolist() == [dataset["labels"][i] for fold in split.fold_indices for i in fold]
    padded = sum(b.inputs["input_ids"].numel() for b in split.batches())
    assert padded < 1.2 * lengths.sum()  # random batches of 8 from 3-30 tokens pad to about 1.5x


def test_samples_of_one_length_keep_the_folds_index_order():
    split = split_of(reviews(padded_to=30))
    assert all(np.all(np.diff(fold) > 0) for fold in split.fold_indices)


def test_the_projection_is_the_same_as_on_the_padded_split():
    """Length order changes batching, not the repair: the same alpha, weights equal to float tolerance."""
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, num_labels=2, max_position_embeddings=32)
    results, models = [], []
    for dataset, collate_fn in ((reviews(), PadCollator()), (reviews(padded_to=30), None)):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
        repair = RepairConfig(alphas=[1.0, 10.0, 100.0, 1e3, 1e4], min_improvement=-1.0, significance_test="none",
                              batch_size=8, seed=0, repair_disable_tqdm=True)
        results.append(Repairer(model, repair, collate_fn=collate_fn).repair(dataset))
        models.append(model)
    ordered, padded = results
    assert ordered.metrics["alpha"] == padded.metrics["alpha"]
    assert [scores for _, scores in ordered.selection] == pytest.approx([scores for _, scores in padded.selection])
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_variable_lengths_without_a_padding_collator_are_refused_before_any_batch():
    with pytest.raises(ValueError, match=r"different lengths \(3 to 30\).*DataCollatorWithPadding"):
        VerifiedSplit(reviews(), num_folds=3, batch_size=8, seed=0, input_names={"input_ids"})
