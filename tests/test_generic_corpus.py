"""The generic-name classifier measured on sourced, real-world host names.

tests/data/generic/real_senders.csv holds the outbound relays of real sending
operations and pool_names.csv the names providers generate for customer
lines, pools, mobile users and cloud machines; every row cites the published
header or log it was taken from (tests/data/generic/README.md).  Targets
(issue 14): every real sender is real, recall >= 0.97 on the pool names, and
a false-positive rate <= 0.005 on all real names together.  Failures name
the rows, so a regression shows what it broke.

The synthetic convention renderings in synthetic/ are a regression table only
(their README says why); their thresholds are the ones they had.
bench/generic_names.py prints the same figures, beside SpamAssassin's,
rspamd's and pymilter's, into docs/benchmarks.md.
"""

from __future__ import annotations

import csv
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from heloguard.hostclass import classify

DATA = Path(__file__).resolve().parent / "data" / "generic"
SOURCED = ("real_senders.csv", "pool_names.csv")


def rows(name: str) -> list[dict[str, str]]:
    with (DATA / name).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def judged(name: str) -> list[tuple[dict[str, str], bool, str]]:
    out = []
    for r in rows(name):
        v = classify(r["name"], ipaddress.ip_address(r["ip"]))
        out.append((r, v.generic, str(v)))
    return out


def test_sourced_corpora_are_valid_and_cite_their_sources() -> None:
    proc = subprocess.run(
        [sys.executable, str(DATA / "check_sourced.py"), *(str(DATA / f) for f in SOURCED)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_real_sender_corpus_is_broad() -> None:
    data = rows("real_senders.csv")
    operations = {r["operation"].split(":", 1)[0].strip() for r in data}
    # Issue 14 asks for the relays of at least 150 sending operations.
    assert len(operations) >= 150, f"{len(operations)} sending operations"
    categories = {r["category"] for r in data}
    assert {"mailbox-provider", "esp", "hosting-relay", "platform", "university"} <= categories
    assert {"government", "isp-smarthost"} <= categories


def test_every_real_sender_is_real() -> None:
    wrong = [
        f"{r['name']} ({r['ip']}, {r['operation']}): {why}"
        for r, generic, why in judged("real_senders.csv")
        if generic
    ]
    assert not wrong, "real senders called generic:\n" + "\n".join(wrong)


def test_pool_names_recall() -> None:
    data = [(r, g, why) for r, g, why in judged("pool_names.csv") if r["label"] == "generic"]
    assert len(data) >= 150
    missed = [f"{r['name']} ({r['ip']}, enc={r['enc']}): {why}" for r, g, why in data if not g]
    recall = 1 - len(missed) / len(data)
    assert recall >= 0.97, f"recall {recall:.3f}; missed:\n" + "\n".join(missed)


def test_false_positive_rate_on_all_real_names() -> None:
    real = [(r, g, why) for f in SOURCED for r, g, why in judged(f) if r["label"] == "real"]
    wrong = [f"{r['name']} ({r['ip']}): {why}" for r, g, why in real if g]
    fpr = len(wrong) / len(real)
    assert fpr <= 0.005, f"false-positive rate {fpr:.4f}:\n" + "\n".join(wrong)


def test_every_verdict_names_its_evidence() -> None:
    for f in SOURCED:
        for r in rows(f)[:100]:
            v = classify(r["name"], ipaddress.ip_address(r["ip"]))
            assert v.kind and v.evidence, r["name"]


@pytest.mark.parametrize("corpus", ["corpus.csv", "holdout.csv"])
def test_synthetic_regression_table(corpus: str) -> None:
    with (DATA / "synthetic" / corpus).open(newline="") as fh:
        data = list(csv.DictReader(fh))
    missed, false_pos = [], []
    for r in data:
        verdict = classify(r["ptr"], ipaddress.ip_address(r["ip"]))
        if r["label"] == "generic" and not verdict.generic:
            missed.append(f"{r['ptr']} ({r['ip']}): {verdict}")
        if r["label"] == "real" and verdict.generic:
            false_pos.append(f"{r['ptr']} ({r['ip']}): {verdict}")
    generic = sum(r["label"] == "generic" for r in data)
    recall = 1 - len(missed) / generic
    fpr = len(false_pos) / (len(data) - generic)
    report = "\n".join(["missed:", *missed, "false positives:", *false_pos])
    assert recall >= 0.95, f"recall {recall:.3f} on {corpus}\n{report}"
    assert fpr <= 0.01, f"false-positive rate {fpr:.3f} on {corpus}\n{report}"
