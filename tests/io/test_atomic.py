import json

import numpy as np
import pytest

from cutremain_monai.io.atomic import write_json_atomic


def test_a_failed_write_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "scores.json"
    write_json_atomic(str(path), {"auc": 0.75}, indent=1)
    assert json.loads(path.read_text()) == {"auc": 0.75} and "\n" in path.read_text()  # dump_kwargs reach json.dump
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomic(str(path), {"auc": 0.8, "model": object()})
    assert json.loads(path.read_text()) == {"auc": 0.75}  # the reader of a resumed study still finds the old result
    write_json_atomic(str(path), {"auc": np.float64(0.8), "n": np.int64(3)}, default=float)
    assert json.loads(path.read_text()) == {"auc": 0.8, "n": 3.0}
