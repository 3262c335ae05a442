"""The gradient norms of ISNet's two loss terms on a shortcut set (clavicle docs, "Guided training", issue 30).

    python tools/guidance_gradient_norms.py DATALIST [--images 32] [--size 128]

``DATALIST``: a shortcut set's ``datalist.json`` (``cutremain experiment shortcut`` writes them under
``<output>/data/``). On the first ``--images`` training images, with the clavicle bundle's network at its initial
weights and after 1 and 5 plain passes (SGD 0.01, momentum 0.9, batches of 16): ``||grad L_cl||`` and
``||grad L_H||`` (the heatmap loss of the selective LRP map, band from the same maps, GWRP decay 0.9, BatchNorm
statistics detached as in the guided step), alone and weighted by ``1 - P`` and ``P``. Prints one JSON object per
point; the last line is all of them.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    from cutremain_monai.engines.bundle import bundle_parser
    from cutremain_monai.engines.guidance import choose_band, isnet_heatmap_loss
    from cutremain_monai.engines.guided_training import detached_batch_statistics, selective_objective
    from cutremain_monai.io.datalist import load_datalist
    from cutremain_monai.localization.lrp import lrp, make_lrp_ready

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datalist")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--p", type=float, default=0.7)
    args = p.parse_args(argv)
    parser = bundle_parser(os.path.join(ROOT, "bundles", "clavicle_fracture"), ["train.yaml", "cpu.yaml"],
                           datalist=os.path.abspath(args.datalist), datalist_task="shortcut", split_halves=False,
                           image_size=[args.size, args.size], output_dir=os.path.join(ROOT, "outputs", "gradient_norms"))
    chain = parser.get_parsed_content("preprocessing")
    data = [chain(dict(it)) for it in load_datalist(args.datalist, "training", task="shortcut")[: args.images]]
    x = torch.stack([torch.as_tensor(d["image"]).float() for d in data])
    y = torch.tensor([[float(d["label"])] for d in data])
    mask = torch.stack([torch.as_tensor(d["box_mask"]).float() for d in data])
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    make_lrp_ready(net, inplace=True)
    net.train()
    params = [q for q in net.parameters() if q.requires_grad]
    bce = torch.nn.BCEWithLogitsLoss()

    def norm(loss) -> float:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))

    def point(at: str) -> dict:
        with detached_batch_statistics(net):
            heat, logits = lrp(net, x, objective=selective_objective(), bounds=(0.0, 1.0), create_graph=True, return_logits=True)
        band = choose_band(heat.detach().abs().flatten(1).sum(1).tolist())
        l_cl, l_h = bce(logits, y), isnet_heatmap_loss(heat, mask, *band, decay=0.9)
        g_cl, g_h = norm(l_cl), norm(l_h)
        out = {"at": at, "loss_cl": float(l_cl), "loss_heatmap": float(l_h), "grad_cl": g_cl, "grad_heatmap": g_h,
               "weighted_cl": (1 - args.p) * g_cl, "weighted_heatmap": args.p * g_h,
               "heatmap_over_cl": args.p * g_h / max((1 - args.p) * g_cl, 1e-12)}
        print(json.dumps(out), flush=True)
        return out

    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    points = [point("initial weights")]
    for epoch in range(1, 6):
        for i in range(0, len(x), 16):
            opt.zero_grad()
            bce(net(x[i : i + 16]), y[i : i + 16]).backward()
            opt.step()
        if epoch in (1, 5):
            points.append(point(f"after {epoch} plain pass(es)"))
    print(json.dumps(points))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
