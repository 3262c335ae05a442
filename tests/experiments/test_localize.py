"""``cutremain localize`` on the synthetic clavicle phantoms: rows per boxed positive half and method, a table that
agrees with the rows, overlays, Loc. Acc.'s threshold taken from validation, and MLflow."""

import csv
import json
import os

import numpy as np
import pytest
import torch

from tests.bundles.conftest import BUNDLES, tiny_datalist
from tests.conftest import mlflow_db

OVERRIDES = {"image_size": [64, 64], "network_depth": 10}


@pytest.fixture
def checkpoint(tmp_path):
    from cutremain_monai.networks import resnet

    torch.manual_seed(0)
    net = resnet(10)
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    return str(path)


def test_localize_cli_rows_table_overlays(tmp_path, checkpoint):
    from cutremain_monai.cli import main

    data = tiny_datalist(tmp_path, "clavicle", n=(2, 4, 4))
    out = tmp_path / "loc"
    db = mlflow_db(tmp_path, "loc.db")
    assert main(["localize", "--bundle", os.path.join(BUNDLES, "clavicle_fracture"), "--checkpoint", checkpoint,
                 "--datalist", data, "--methods", "cam,gradcam,lrp", "--overrides", json.dumps(OVERRIDES),
                 "--tracking-uri", db, "-o", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "test_localization.csv")))
    # positive halves with a fracture box in the test section: count them from the datalist
    from monai.transforms import Compose

    from cutremain_monai.transforms import SplitHalvesd
    from cutremain_monai.io.loader import LoadXrayd

    test = json.load(open(data))["test"]
    split = Compose([LoadXrayd("image"), SplitHalvesd("image", lesion_box_labels=["fracture"])])
    boxed = [h for it in test for h in split(dict(it))
             if h["label"] == 1 and any(lab == "fracture" for lab in h["box_labels"])]
    assert len(boxed) > 0 and len(rows) == 3 * len(boxed)
    table = open(out / "test_localization_table.md").read()
    for method in ("cam", "gradcam", "lrp"):
        energies = [float(r["energy_in_box"]) for r in rows if r["method"] == method]
        hits = [int(r["pointing_hit"]) for r in rows if r["method"] == method]
        line = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert float(cells[1]) == pytest.approx(np.nanmean(energies), abs=1e-3)  # the table is the mean of the rows
        assert float(cells[2]) == pytest.approx(np.mean(hits), abs=1e-3)
        assert "from validation" in cells[5] and int(cells[6]) == len(boxed)
    assert len(list((out / "test_localization_overlays").glob("case_*.png"))) == len(boxed)
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=db)
    run = client.search_runs([client.get_experiment_by_name("localize_clavicle_fracture").experiment_id])[0]
    assert "cam_energy_in_box" in run.data.metrics and "lrp_pointing_game" in run.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"test_localization.csv", "test_localization_table.md", "test_localization_overlays"} <= names


def test_energy_row_matches_a_direct_computation(tmp_path, checkpoint):
    """One half by hand: CAM at the model size, bilinear to the half's native size, energy inside its box."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from cutremain_monai.engines.bundle import bundle_configs
    from cutremain_monai.experiments.localize import localize
    from cutremain_monai.localization.cam import cam
    from cutremain_monai.networks.ensemble import checkpoint_state

    data = tiny_datalist(tmp_path, "clavicle", n=(2, 2, 4))
    localize(os.path.join(BUNDLES, "clavicle_fracture"), checkpoint, data, str(tmp_path / "l"), methods=["cam"],
             tau_section=None, overlays=0, **OVERRIDES)
    rows = list(csv.DictReader(open(tmp_path / "l" / "test_localization.csv")))
    bundle = os.path.join(BUNDLES, "clavicle_fracture")
    parser = ConfigParser()
    parser.read_config(bundle_configs(bundle, ["train.yaml", "cpu.yaml"]))
    parser.update({"bundle_root": bundle, **OVERRIDES})
    net = parser.get_parsed_content("network_def", instantiate=True)
    net.load_state_dict(checkpoint_state(checkpoint))
    net.eval()
    load, final = Compose(parser.get_parsed_content("load_transforms")), Compose(parser.get_parsed_content("final_transforms"))
    row = rows[0]
    name, half = row["image"].split("#")
    item = next(it for it in json.load(open(data))["test"] if os.path.basename(it["image"]) == name)
    s = next(h for h in load(dict(item)) if h["half"] == half)
    x = torch.as_tensor(final(dict(s))["image"]).float()[None]
    m = cam(net, x, target=0, normalise=False)
    native = s["image"].shape[-2:]
    m = torch.nn.functional.interpolate(m, size=tuple(native), mode="bilinear", align_corners=False)[0, 0].numpy()
    m = np.clip(m, 0, None)
    x0, y0, x1, y1 = [b for b, lab in zip(np.asarray(s["boxes"]).tolist(), s["box_labels"]) if lab == "fracture"][0]
    rr, cc = np.mgrid[: native[0], : native[1]] + 0.5
    inside = (cc >= x0) & (cc <= x1) & (rr >= y0) & (rr <= y1)
    assert float(row["energy_in_box"]) == pytest.approx(m[inside].sum() / m.sum(), abs=1e-4)
