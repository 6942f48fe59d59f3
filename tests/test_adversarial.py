"""The adversarial sweep (tests/adversarial.py) finds nothing: every invalid call raises naming what was wrong, every
valid one agrees with torch or the reference."""
import adversarial
import pytest


@pytest.mark.deep  # a sweep: not in the quick run
def test_the_sweep_finds_nothing(capsys):
    status = adversarial.main([])
    report = capsys.readouterr().out
    assert status == 0, report
    assert "cases:" in report and int(report.split(" cases:")[0].split()[-1]) >= 280, report
