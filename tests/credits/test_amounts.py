"""One rule for what counts as a whole number of thousandths of a credit, wherever an amount is read."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.prices import _price_problems
from orchestrator.schemas import Budget
from tiers.base import whole_thousandths


def price_file_says(price: float) -> list[str]:
    return list(_price_problems({"fal": {"fal-ai/nano-banana-2": {"1K": price}}}))


@pytest.mark.parametrize("credits", [0.0, 0.001, 1.001, 8.5, 0.1 + 0.2, 543_210_987.601, 999_999_999.999])
def test_whole_thousandths_are_taken_by_the_api_and_the_price_file_alike(credits: float) -> None:
    # A large price passed the API's check and failed the price file's (an absolute 1e-6 is below
    # what a float can tell at 1e11 millicredits).
    assert whole_thousandths(credits)
    assert Budget(limit=credits).limit == round(credits, 3)  # as the ledger counts it: 0.1 + 0.2 is 0.3
    assert price_file_says(credits) == []


@pytest.mark.parametrize("credits", [0.0004, 1.0005, 123_456_789.1234])
def test_finer_amounts_are_refused_by_both(credits: float) -> None:
    assert not whole_thousandths(credits)
    with pytest.raises(ValidationError, match="at most 3 decimals"):
        Budget(limit=credits)
    assert any("whole number of thousandths" in told for told in price_file_says(credits))
