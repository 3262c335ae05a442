"""Data in: ``ingest`` (a PACS export), ``import`` (public annotation formats), ``samples`` (the synthetic phantoms)."""

from __future__ import annotations

import json

from cutremain_monai.cli.pacs import add_dicomweb_options, dicomweb_options

__all__ = ["register", "NEAR_DUPLICATE_DEFAULTS"]

# collections known to hold the same radiograph twice (under other patient ids, or with no patient ids at all);
# FracAtlas at 0.97: over its 1,899 films, limb views of different patients on the same dark detector background reach
# 0.85-0.95 and chained 50 blocks into one group of 1,116 images at 0.85 (cutremain_monai.io.near_duplicates)
NEAR_DUPLICATE_DEFAULTS = {"brixia": 0.85, "lungmasks": 0.85, "fracatlas": 0.97}


def ingest_command(args) -> int:
    from cutremain_monai.io.ingest import ingest  # lazy: `cutremain --help` starts without torch

    if args.dicomweb:  # query and retrieve into DIR first, then the ingest of that folder
        from cutremain_monai.pacs.dicomweb import DicomWebServer  # lazy: as above
        from cutremain_monai.pacs.watch import retrieve_to_folder  # lazy: as above

        images = [m for m in args.modalities.split(",") if m]
        extra = (["PR"] if args.gsps else []) + (["SR"] if args.sr else [])
        server = DicomWebServer(args.dicomweb, **{k: v for k, v in dicomweb_options(args).items() if v is not None})
        count = retrieve_to_folder(server, args.dir, images + extra, since=args.since, study_modalities=images)
        print(f"retrieved {count} new instances from {server} into {args.dir}")

    split = tuple(float(v) for v in args.split.split(",")) if args.split else None
    report = ingest(args.dir, args.output, boxes=args.boxes, gsps=args.gsps, sr=args.sr, split=split,
                    quarantine_dir=args.quarantine_dir, progress=not args.no_progress,
                    near_duplicates=args.near_duplicates or None, path_mode=args.path_mode, workers=args.workers,
                    resume=args.resume, accept_model_output=args.accept_model_output)
    print(report.summary())
    print(f"datalist: {args.output}")
    return 0


def _read_format(args) -> list:
    from cutremain_monai.io import importers  # lazy: `cutremain --help` starts without torch

    readers = {
        "csv": lambda: importers.import_csv(args.source),
        "nih": lambda: importers.import_nih_cxr14(args.source, args.images, args.bbox),
        "coco": lambda: importers.import_coco(args.source, args.images),
        "fracatlas": lambda: importers.import_fracatlas_manifest(args.source, args.images, args.region, block_size=args.blocks),
        "yolo": lambda: importers.import_yolo(args.images, args.source),
        "brixia": lambda: importers.import_brixia(args.source, args.images, rater=args.rater),
        "lungmasks": lambda: importers.import_lung_masks(args.source, args.images),
    }
    return readers[args.format]()


def import_command(args) -> int:
    from cutremain_monai.io import importers  # lazy: `cutremain --help` starts without torch
    from cutremain_monai.io.datalist import save_datalist, split_by_group  # lazy: as above
    from cutremain_monai.io.near_duplicates import group_near_duplicates_for_split  # lazy: as above

    items = _read_format(args)
    # images (and masks) that do not decode were left out by the importer: report them, never drop them silently
    quarantined = list(getattr(items, "quarantined", []))
    report = importers.write_quarantine(importers.quarantine_path(args.output), quarantined)
    for path, reason in quarantined:
        print(f"quarantined (cannot decode): {path}: {reason}")
    items = list(items)
    threshold = NEAR_DUPLICATE_DEFAULTS.get(args.format, 0.0) if args.near_duplicates is None else args.near_duplicates
    summary = {}
    if threshold > 0:
        items, summary, bad = group_near_duplicates_for_split(items, threshold, args.output)
        for path, reason in bad:
            print(f"near-duplicate check skipped (unreadable): {path}: {reason}")
    split = tuple(float(v) for v in args.split.split(","))
    save_datalist(split_by_group(items, split, args.seed), args.output)
    print(json.dumps({"items": len(items), "boxes": sum(len(i["boxes"]) for i in items), "output": args.output,
                      "quarantined": len(quarantined), "quarantine_report": report, **summary}))
    return 0


def samples_command(args) -> int:
    from cutremain_monai.data.phantoms import generate_samples  # lazy: `cutremain --help` starts without torch

    generate_samples(args.output, args.seed)
    print(f"wrote synthetic samples to {args.output}")
    return 0


def register(sub) -> None:
    """Add ``ingest``, ``import`` and ``samples`` to the ``cutremain`` subparsers."""
    p = sub.add_parser("ingest", help="walk a PACS export, write a datalist and a quarantine report",
                       description="Walk a PACS export (any names, any nesting, non-DICOM files mixed in), validate "
                       "every image by decoding it, pair images with their boxes and write a datalist plus "
                       "<output>_quarantine.csv naming every file that could not be used, with the reason.")
    p.add_argument("dir", help="the export's root folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--boxes", help="CSV (path,label,x0,y0,x1,y1,box_label) or datalist JSON with boxes")
    g.add_argument("--gsps", action="store_true", help="read boxes from presentation states in the tree")
    p.add_argument("--sr", action="store_true", help="read boxes from the image regions of structured reports (TID "
                   "1500) in the tree (with --gsps: both)")
    p.add_argument("--accept-model-output", action="store_true",
                   help="also take this project's own results (its SRs, its AI_FINDINGS presentation states) as "
                        "annotations; by default they are quarantined so model output never becomes a label")
    p.add_argument("-o", "--output", required=True, help="the datalist JSON to write")
    p.add_argument("--split", help="train,val,test fractions for a patient-wise split, e.g. 0.7,0.15,0.15")
    p.add_argument("--quarantine-dir", help="copy files that could not be used there")
    p.add_argument("--near-duplicates", type=float, default=None, metavar="R",
                   help="with --split: also keep images whose thumbnails correlate at |r| >= R (0.85 suits X-rays) "
                        "in one group, whatever their PatientID; pairs go to <output>.near_duplicates.csv")
    p.add_argument("--path-mode", choices=["auto", "relative", "uid"], default="auto",
                   help="how files are named in the datalist and the report: relative to DIR, or by SOP Instance UID "
                        "through a link folder (<output stem>_files/); auto: uid when a folder or file name holds "
                        "the patient's name, ID or birth date from its header")
    p.add_argument("--workers", type=int, default=1, help="processes that decode files (default 1)")
    p.add_argument("--dicomweb", metavar="URL", help="first query (QIDO-RS) and retrieve (WADO-RS) the studies of "
                   "this DICOMweb server into DIR (files named by SOP Instance UID; those already there are kept), "
                   "with their presentation states / SRs when --gsps / --sr")
    p.add_argument("--modalities", default="DX,CR", help="with --dicomweb: image series retrieved (default %(default)s)")
    p.add_argument("--since", metavar="YYYYMMDD", help="with --dicomweb: from this StudyDate on (default: every study)")
    add_dicomweb_options(p)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted ingest of DIR into the same output (its journal is beside it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=ingest_command)

    p = sub.add_parser("import", help="convert a public annotation format to a datalist",
                       description="Convert an annotation format to a datalist, split by patient (or by blocks of "
                       "image numbers) and by near-duplicate radiograph. Images that do not decode are listed in "
                       "<output>_quarantine.csv with the reason.")
    p.add_argument("format", choices=["csv", "nih", "coco", "fracatlas", "yolo", "brixia", "lungmasks"])
    p.add_argument("source", help="CSV / JSON file (for yolo: the labels folder)")
    p.add_argument("--images", help="image folder (brixia: the dataset root; lungmasks: the manifest's folder by default)")
    p.add_argument("--bbox", help="nih: BBox_List_2017.csv[.gz]")
    p.add_argument("--region", help="fracatlas: keep this region (hip, shoulder)")
    p.add_argument("--blocks", type=int, default=None, metavar="N",
                   help="fracatlas: split by blocks of N consecutive image numbers (no patient ids; 25 suits FracAtlas)")
    p.add_argument("--rater", default="S", help="brixia: rater prefix (S or J)")
    p.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--near-duplicates", type=float, default=None, metavar="R",
                   help="merge the split groups of images whose thumbnails correlate at |r| >= R (0: off; default "
                        "0.85 for brixia and lungmasks, 0.97 for fracatlas, off for the others); pairs go to "
                        "<output>.near_duplicates.csv")
    p.add_argument("--accept-model-output", action="store_true",
                   help="also take this project's own results (its SRs, its AI_FINDINGS presentation states) as "
                        "annotations; by default they are quarantined so model output never becomes a label")
    p.add_argument("-o", "--output", required=True, help="the datalist JSON to write")
    p.set_defaults(func=import_command)

    p = sub.add_parser("samples", help="generate the synthetic DICOM phantoms (dicom_samples/)")
    p.add_argument("-o", "--output", default="dicom_samples")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=samples_command)
