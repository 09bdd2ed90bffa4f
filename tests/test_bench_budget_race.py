"""bench/budget_race.py judges a round exactly: K admitted, K upstream calls, nothing but
429 budget_exceeded for the rest, one ledger row per admitted request, spend within budget."""
from __future__ import annotations

import importlib.util
from decimal import Decimal
from types import ModuleType

import pytest

from tests.harness import ROOT


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("budget_race", ROOT / "bench" / "budget_race.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFUSED = "429:budget_exceeded"
BUDGET = Decimal("0.003")


@pytest.mark.parametrize(("outcomes", "calls", "rows", "settled", "why"), [
    (["200"] * 3 + [REFUSED] * 47, 3, 3, Decimal("0.002"), None),
    (["200"] * 2 + [REFUSED] * 48, 3, 2, Decimal("0.001"), "admitted 2, expected exactly 3"),  # under-admits
    (["200"] * 4 + [REFUSED] * 46, 3, 4, Decimal("0.003"), "admitted 4"),
    (["200"] * 3 + [REFUSED] * 47, 4, 3, Decimal("0.002"), "upstream saw 4 calls"),
    (["200"] * 3 + [REFUSED] * 46 + ["500"], 3, 3, Decimal("0.002"), "500 x1"),
    (["200"] * 3 + [REFUSED] * 46 + ["503"], 3, 3, Decimal("0.002"), "503 x1"),
    (["200"] * 3 + [REFUSED] * 46 + ["429:rate_limit_exceeded"], 3, 3, Decimal("0.002"), "rate_limit_exceeded"),
    (["200"] * 3 + [REFUSED] * 46 + ["error:ReadTimeout"], 3, 3, Decimal("0.002"), "error:ReadTimeout"),
    (["200"] * 3 + [REFUSED] * 47, 3, 1, Decimal("0.001"), "1 ledger rows for 3 admitted"),
    (["200"] * 3 + [REFUSED] * 47, 3, 3, Decimal("0.0031"), "over the budget"),
])
def test_a_round_passes_only_when_exact(outcomes: list[str], calls: int, rows: int, settled: Decimal,
                                        why: str | None) -> None:
    found = _bench().problems(outcomes, 3, calls, rows, settled, BUDGET)
    if why is None:
        assert found == []
    else:
        assert len(found) == 1 and why in found[0]
