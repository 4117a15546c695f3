"""Head refit: the classification head refitted on the verified split, judged out-of-fold, gated by significance."""

from .head import HeadInputs, find_head, read_head_inputs, write_head
from .refit import fit_head, out_of_fold_logits, refit_and_predict
from .repair import refit_classification_head, repair_head

__all__ = [
    "HeadInputs",
    "find_head",
    "fit_head",
    "out_of_fold_logits",
    "read_head_inputs",
    "refit_and_predict",
    "refit_classification_head",
    "repair_head",
    "write_head",
]
