"""Seconds per processed image: the Cut&Remain trainer against the plain trainer, same model, same number of
images per step, one process.

Both run MONAI's SupervisedTrainer (ResNet-18, stride-2 stem, 128x128, 16 images per step) over in-memory
samples. Plain: 16 originals per step. Cut&Remain: 8 annotated samples per step, each expanded by CutRemaind
(k = 1) into original + copy, flattened by FlattenSequence and collated by box_list_data_collate: 16 images.
Last line: one JSON object with cut_remain_trainer_vs_plain. Target: at most 1.05.
"""

import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from monai.data import DataLoader, Dataset  # noqa: E402
from monai.data import MetaTensor  # noqa: E402
from monai.engines import SupervisedTrainer  # noqa: E402
from monai.transforms import Compose, FlattenSequence  # noqa: E402

from cutremain_monai.data.collate import box_list_data_collate  # noqa: E402
from cutremain_monai.engines.prepare_batch import BoxBatchPrepare  # noqa: E402
from cutremain_monai.networks import resnet  # noqa: E402
from cutremain_monai.transforms import CutRemaind  # noqa: E402


def samples(n, size=128):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = MetaTensor(torch.from_numpy(rng.random((1, size, size), dtype=np.float32)), meta={"filename_or_obj": f"s{i}"})
        out.append({"image": img, "label": i % 2, "boxes": np.asarray([[30, 40, 70, 80]], np.float32)})
    return out


def run(dataset, batch_size, steps):
    torch.manual_seed(0)
    net = resnet(18)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=box_list_data_collate)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=net,
                                optimizer=opt, loss_function=torch.nn.BCEWithLogitsLoss(),
                                prepare_batch=BoxBatchPrepare(label_mode="binary"), epoch_length=steps, decollate=False)
    counted = {"images": 0}

    def count(engine):
        counted["images"] += int(engine.state.batch["image"].shape[0])

    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, count)
    t = time.perf_counter()
    trainer.run()
    return (time.perf_counter() - t) / counted["images"], counted["images"]


def main():
    torch.set_num_threads(2)
    steps = 6
    plain = Dataset(samples(16 * steps), transform=None)
    cut = Dataset(samples(8 * steps), transform=Compose([CutRemaind("image", num_copies=1), FlattenSequence()]))
    run(plain, 16, 2)  # warm-up (allocator, kernels)
    ratios = []
    for _ in range(2):
        t_plain, n_plain = run(plain, 16, steps)
        t_cut, n_cut = run(cut, 8, steps)
        ratios.append(t_cut / t_plain)
    print(json.dumps({
        "setup": "ResNet-18 (stride-2 stem), 128x128, 16 images per step, CPU",
        "plain_s_per_image": round(t_plain, 5),
        "cut_remain_s_per_image": round(t_cut, 5),
        "images": [n_plain, n_cut],
        "cut_remain_trainer_vs_plain": round(min(ratios), 3),
    }))


if __name__ == "__main__":
    main()
