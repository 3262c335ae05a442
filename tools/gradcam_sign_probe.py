"""Why a model's Grad-CAM maps are flat (zero everywhere): for each method's fold-0 model of a ``cutremain experiment
compare`` folder, on the boxed fractured test images, the logit and probability, and at ``layer3`` / ``layer4`` the
raw Grad-CAM map before its ReLU (median max and min, share of positive cells, the channel weights' sum and share
of positive weights), the gradient norm, the share of zero activations, and how many maps the ReLU makes flat.

    python tools/gradcam_sign_probe.py <compare output folder> none,sup_mixup,cut_remain '<the compare --overrides JSON>'

A flat map with a large gradient norm is the model's answer, not a vanishing gradient: no cell adds to the logit.
Prints one JSON block per method and writes ``gradcam_sign_probe.json`` beside the folder.
"""
import json
import os
import sys

import numpy as np
import torch
from monai.transforms import Compose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cutremain_monai.data.preprocessed import CachedTransform  # noqa: E402
from cutremain_monai.engines.bundle import bundle_parser, load_network  # noqa: E402
from cutremain_monai.engines.methods import method_overrides  # noqa: E402
from cutremain_monai.localization.report import scored_cases  # noqa: E402

out, methods = sys.argv[1], sys.argv[2].split(",")
OV = json.loads(sys.argv[3])
fold = os.path.join(out, "fold0_datalist.json")
items = [it for it in json.load(open(fold))["test"] if it.get("label") and it.get("boxes")]
res = {}
for m in methods:
    run = os.path.join(out, "runs", "fold0", m)
    p = bundle_parser(os.path.join(ROOT, "bundles", "clavicle_fracture"), ["train.yaml", "cpu.yaml"], **{**OV, **method_overrides(m)},
                      output_dir=run, device="cpu", datalist=fold)
    net = load_network(p, os.path.join(run, "checkpoints", "model.pt")).eval()
    load = CachedTransform(p.get_parsed_content("load_transforms"), p.get_parsed_content("cache_dir"))
    final = Compose(p.get_parsed_content("final_transforms"))
    rows = []
    for name, native, boxes, x, target in scored_cases(items, load, final, p["label_mode"], p["class_names"], set(p["lesion_box_labels"])):
        r = {}
        for layer in ("layer3", "layer4"):
            store = {}
            h = dict(net.named_modules())[layer].register_forward_hook(lambda mod, a, o: store.__setitem__("a", o))
            logit = net(x[None]).reshape(-1)[target]
            h.remove()
            a = store["a"]
            (g,) = torch.autograd.grad(logit, a)
            w = g.flatten(2).mean(-1)
            raw = torch.einsum("bchw,bc->bhw", a.detach(), w)[0]
            r[layer] = dict(max=float(raw.max()), min=float(raw.min()), pos=float((raw > 0).float().mean()),
                            wsum=float(w.sum()), wpos=float((w > 0).float().mean()), gnorm=float(g.norm()),
                            act_zero=float((a == 0).float().mean()), flat=bool(raw.max() <= 0))
        r["logit"] = float(logit.detach())
        r["prob"] = float(torch.sigmoid(logit))
        rows.append(r)
    s = {"images": len(rows), "prob_mean": np.mean([r["prob"] for r in rows]), "logit_mean": np.mean([r["logit"] for r in rows])}
    for layer in ("layer3", "layer4"):
        s[layer] = {k: (int(sum(r[layer][k] for r in rows)) if k == "flat" else float(np.median([r[layer][k] for r in rows])))
                    for k in rows[0][layer]}
    res[m] = s
    print(m, json.dumps(s, indent=1), flush=True)
json.dump(res, open(os.path.join(os.path.dirname(os.path.abspath(out)), "gradcam_sign_probe.json"), "w"), indent=1)
