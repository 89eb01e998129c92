"""spot.report.verdicts and `spot verdicts`: two runs' claims side by side, a flip fails the command."""
import pandas as pd
import pytest

from spot.cli import main
from spot.report.verdicts import compare, summary

pytestmark = pytest.mark.unit


def claims(verdicts: dict[str, str], level: str = "3 training runs") -> pd.DataFrame:
    return pd.DataFrame([dict(case=1, subject=s, level=level, verdict=v, value=0.01, low=-0.01, high=0.03,
                              confidence=0.95, text=s) for s, v in verdicts.items()])


def test_claims_that_keep_move_flip_or_lack_a_partner():
    base = claims({"a": "holds", "b": "not distinguishable", "c": "holds", "d": "reversed"})
    other = claims({"a": "holds", "b": "reversed", "c": "reversed", "e": "holds"})
    t = compare(base, other).set_index("subject")
    assert t.change.to_dict() == {"a": "same", "b": "moved", "c": "flipped", "d": "missing", "e": "missing"}
    assert summary(compare(base, other)).startswith("5 claims: 1 same, 1 moved between not distinguishable and a "
                                                    "verdict, 1 flipped (holds <-> reversed), 2 in one run only")


def test_the_command_fails_on_a_flip_and_passes_on_a_move(tmp_path, capsys):
    base, moved, flipped = tmp_path / "base.csv", tmp_path / "moved.csv", tmp_path / "flipped.csv"
    claims({"a": "holds", "b": "holds"}).to_csv(base, index=False)
    claims({"a": "holds", "b": "not distinguishable"}).to_csv(moved, index=False)
    claims({"a": "reversed", "b": "holds"}).to_csv(flipped, index=False)
    assert main(["verdicts", "--base", str(base), "--other", str(moved)]) == 0
    assert "2 claims: 1 same, 1 moved" in capsys.readouterr().out
    assert main(["verdicts", "--base", str(base), "--other", str(flipped)]) == 2
    assert "1 claims flipped between holds and reversed" in capsys.readouterr().err
