"""Arguments of every adoption decision: when is a held-out gain more than noise?"""

from __future__ import annotations

from dataclasses import dataclass, field

SIGNIFICANCE_TESTS = ("mcnemar", "bootstrap", "none")


@dataclass
class SelectionArguments:
    """The paired test a repair must pass against the model it would replace, on the same held-out samples."""

    _argument_group_name = "selection (when a repair is adopted)"

    significance_test: str = field(
        default="mcnemar",
        metadata={
            "help": "Paired test of the held-out predictions of a repair against those of the model it would replace: "
            "'mcnemar' (exact one-sided binomial test on the samples where exactly one of them is right), "
            "'bootstrap' (the one-sided paired bootstrap bound of the accuracy gain must lie above zero) or 'none' "
            "(any gain above min_improvement is adopted). One-sided: a repair no better than the model is adopted at "
            "most significance_level of the time. The test is on accuracy, whatever metric_for_selection chooses "
            "among candidates; min_improvement stays an additional margin.",
            "choices": list(SIGNIFICANCE_TESTS),
        },
    )
    significance_level: float = field(
        default=0.05,
        metadata={"help": "Significance level of the one-sided test (and 1 - the confidence of the reported two-sided gain "
                  "interval)."},
    )

    def validate(self) -> None:
        if self.significance_test not in SIGNIFICANCE_TESTS:
            raise ValueError(
                f"Unknown significance_test {self.significance_test!r}; choose one of {list(SIGNIFICANCE_TESTS)}."
            )
        if not 0.0 < self.significance_level < 1.0:
            raise ValueError(f"significance_level must be in (0, 1), got {self.significance_level}.")
