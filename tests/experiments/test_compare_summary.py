import numpy as np

from cutremain_monai.experiments.compare_summary import ci_cell


def test_ci_cell_shows_the_interval_only_where_there_is_one():
    assert ci_cell(0.81234, 0.7, 0.9) == "0.812 [0.700, 0.900]"
    assert ci_cell(0.5, np.nan, np.nan) == "0.500"  # one seed: no t interval
    assert ci_cell(np.nan, np.nan, np.nan) == "n/a"
