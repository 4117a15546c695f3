import pytest

from hf_repair.config.projection import _default_alphas
from hf_repair.projection.search import search_alphas

ALPHAS = _default_alphas()


def _search(curve: list[float], strategy: str = "coarse_to_fine") -> tuple[float, int]:
    """The alpha chosen from the held-out values `curve` (one per alpha), and how many alphas were scored."""
    calls: list[float] = []

    def cross_validate(alpha: float) -> dict[str, float]:
        calls.append(alpha)
        return {"accuracy": curve[ALPHAS.index(alpha)]}

    scored = search_alphas(ALPHAS, cross_validate, lambda scores: scores["accuracy"], strategy)
    assert len(calls) == len(set(calls)) == len(scored)  # no alpha scored twice
    best_alpha, _ = max(scored, key=lambda item: (item[1]["accuracy"], item[0]))
    return best_alpha, len(calls)


def _grid_choice(curve: list[float]) -> float:
    return max(zip(curve, ALPHAS, strict=True))[1]


@pytest.mark.parametrize("peak", range(len(ALPHAS)))
@pytest.mark.parametrize("plateau", [0, 1, 3])
def test_coarse_to_fine_chooses_the_grids_alpha_on_one_peak_with_at_most_nine_passes(peak, plateau):
    # One peak, optionally flat for `plateau` alphas to its right (ties go to the larger alpha).
    curve = [-max(0, peak - i, i - peak - plateau) for i in range(len(ALPHAS))]
    alpha, passes = _search(curve)
    assert alpha == _grid_choice(curve)
    assert passes <= 9


def test_a_flat_curve_costs_the_coarse_passes_only_and_keeps_the_largest_alpha():
    alpha, passes = _search([0.5] * len(ALPHAS))
    assert alpha == ALPHAS[-1]
    assert passes == 6  # every third alpha and the last


def test_the_walk_goes_towards_the_better_neighbour_only():
    curve = [-abs(i - 4) for i in range(len(ALPHAS))]  # coarse best at index 3, peak one step right
    scored = search_alphas(ALPHAS, lambda alpha: {"accuracy": curve[ALPHAS.index(alpha)]},
                           lambda scores: scores["accuracy"])
    coarse = {0, 3, 6, 9, 12, 13}
    assert {ALPHAS.index(alpha) for alpha, _ in scored} == coarse | {2, 4, 5}  # 2 is worse: no step to 1
    assert max(scored, key=lambda item: item[1]["accuracy"])[0] == ALPHAS[4]


def test_the_grid_scores_every_alpha():
    curve = [float(i % 5) for i in range(len(ALPHAS))]  # several peaks: only the grid is sure to find the best
    assert _search(curve, "grid") == (_grid_choice(curve), len(ALPHAS))


@pytest.mark.parametrize("strategy", ["coarse_to_fine", "grid"])
@pytest.mark.parametrize("peak", [0, 4, 9, 13])
def test_alphas_stopped_below_the_best_change_no_choice(strategy, peak):
    # cross_validate gives up (None) on any alpha worse than the best scored before it, as a scoring stopped early does.
    curve = [-abs(i - peak) for i in range(len(ALPHAS))]
    order: list[float] = []
    best = [-float("inf")]

    def cross_validate(alpha: float) -> dict[str, float] | None:
        order.append(alpha)
        value = curve[ALPHAS.index(alpha)]
        if value < best[0]:
            return None
        best[0] = value
        return {"accuracy": value}

    scored = search_alphas(ALPHAS, cross_validate, lambda scores: scores["accuracy"], strategy)
    assert max(scored, key=lambda item: (item[1]["accuracy"], item[0]))[0] == _grid_choice(curve)
    assert order[0] == ALPHAS[-1]  # the near-identity alpha first: a trained model's best is usually there
    assert [alpha for alpha, _ in scored] == sorted(alpha for alpha, _ in scored)
    if peak > 0:  # something below the peak came after it: stopped, and not in the curve
        assert len(scored) < len(order)
