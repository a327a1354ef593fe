"""The one-run audit of sample-level DP (Steinke et al. 2023) end to end: a tiny run gives a well-formed report and
bad input is refused; marked slow, a model that memorises its canaries is caught without DP, and DP-SGD's bound
stays below its accountant's epsilon."""

from __future__ import annotations

import pytest

from lightfed.audit.dpsgd_audit import one_run_audit

MEMORISE = ["--model.init_args.hidden", "[256]", "--trainer.local_epochs", "10", "--data.init_args.test_fraction", "0.5"]


def test_one_run_audit_report_and_refusals(tmp_path):
    from tests.test_cli import write_config

    cfg = write_config(tmp_path, logger=False, rounds=1)
    report = one_run_audit(cfg, canaries=20, seed=0)
    assert report["canaries"] == 20 and 0 < report["included"] < 20
    assert report["epsilon_lower_bound"] >= 0 and report["accountant_epsilon"] == float("inf")
    with pytest.raises(ValueError, match="canaries must be in"):
        one_run_audit(cfg, canaries=10_000)


@pytest.mark.slow
def test_no_dp_memorisation_is_caught_and_dpsgd_is_not_refuted():
    """Measured (seed 0, 400 canaries, digits): no DP, MLP 256, 10 local epochs: bound 1.42 (75 of 80 guesses right);
    DP-SGD (experiments/digits_dpsgd.yaml, 5 local epochs): bound 0 against an accountant epsilon of 6.0."""
    plain = one_run_audit("experiments/digits_dpsgd.yaml", canaries=400, extra_args=["--privacy", "null", *MEMORISE])
    assert plain["epsilon_lower_bound"] > 1.0
    private = one_run_audit("experiments/digits_dpsgd.yaml", canaries=150, extra_args=["--trainer.local_epochs", "5"])
    assert private["epsilon_lower_bound"] <= private["accountant_epsilon"]
