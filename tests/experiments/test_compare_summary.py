import numpy as np

from cutremain_monai.experiments.compare_summary import ci_cell


def test_ci_cell_shows_the_interval_only_where_there_is_one():
    assert ci_cell(0.81234, 0.7, 0.9) == "0.812 [0.700, 0.900]"
    assert ci_cell(0.5, np.nan, np.nan) == "0.500"  # one seed: no t interval
    assert ci_cell(np.nan, np.nan, np.nan) == "n/a"


def test_per_fold_paired_differences_against_sklearn(tmp_path):
    """Each fold's AUC difference on its own test images (sklearn's AUC), their mean with Student's t interval
    (scipy), and the table's columns."""
    from scipy import stats
    from sklearn.metrics import roc_auc_score

    from cutremain_monai.experiments.compare_summary import summarise_compare, write_tables

    rng = np.random.default_rng(0)
    runs = {"none": {}, "cut_remain": {}}
    expected = []
    for k in range(3):
        y = rng.integers(0, 2, 40)
        y[:2] = [0, 1]
        files = [f"f{k}_{i}.png" for i in range(40)]
        base = rng.random(40) + 0.3 * y
        better = base + (0.2 + 0.1 * k) * y * rng.random(40)
        for name, p in (("none", base), ("cut_remain", better)):
            runs[name][k] = {"files": files, "prob": list(p), "label": list(y), "threshold": 0.5, "localization": {}}
        expected.append(roc_auc_score(y, better) - roc_auc_score(y, base))
    summary = summarise_compare(runs, ["none", "cut_remain"], n_boot=50)
    (d,) = summary["paired"]
    np.testing.assert_allclose(d["fold_differences"], expected)
    half = stats.t.ppf(0.975, 2) * np.std(expected, ddof=1) / np.sqrt(3)
    np.testing.assert_allclose([d["fold_mean"], d["fold_low"], d["fold_high"]],
                               [np.mean(expected), np.mean(expected) - half, np.mean(expected) + half])
    assert d["folds_gained"] == sum(e > 0 for e in expected)
    write_tables(summary, str(tmp_path))
    row = [r for r in open(tmp_path / "compare_table.md").read().splitlines() if r.startswith("| cut_remain | none |")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == f"{np.mean(expected):.3f} [{np.mean(expected) - half:.3f}, {np.mean(expected) + half:.3f}]"
    assert cells[6] == ", ".join(f"{e:+.3f}" for e in expected) and cells[7] == f"{d['folds_gained']}/3"
