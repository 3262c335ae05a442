"""Results back to the PACS and the DICOM node: ``infer`` (a folder through a bundle's inference), ``listen`` (a
DICOM node that scores each study it receives), ``send`` (C-STORE a folder), ``deidentify`` (a research copy)."""

from __future__ import annotations

import json
import os
import time

from cutremain_monai.cli.common import comma_list

__all__ = ["register"]


def infer_command(args) -> int:
    from cutremain_monai.engines.bundle import run_bundle  # lazy: `cutremain --help` starts without torch

    bundle = os.path.abspath(args.bundle)
    settings = {"datalist_task": None, **(json.loads(args.overrides) if args.overrides else {}),
                "input_dir": os.path.abspath(args.input)}
    if args.output_dir:
        settings["output_dir"] = os.path.abspath(args.output_dir)
    if args.dicom_out:
        settings.update(dicom_out=True, dicom_out_dir=os.path.abspath(args.dicom_out))
    if args.registry_version:
        settings["registry_version"] = args.registry_version
    wf = run_bundle(bundle, [*comma_list(args.configs), "inference.yaml"], workflow_type="infer", **settings)
    inference_dir = wf.parser.get_parsed_content("inference_dir")
    print(f"predictions: {inference_dir}/predictions.csv" + (f"; DICOM results: {args.dicom_out}/manifest.csv"
                                                             if args.dicom_out else ""))
    return 0


def listen_command(args) -> int:
    from cutremain_monai.pacs.node import Listener, parse_destination  # lazy: `cutremain --help` starts without torch

    node = Listener(args.bundle, args.work, parse_destination(args.forward), ae_title=args.ae_title, port=args.port,
                    host=args.host, configs=comma_list(args.configs),
                    overrides=json.loads(args.overrides) if args.overrides else {}, quiet_seconds=args.quiet)
    node.start()
    print(f"listening as {args.ae_title} on {args.host}:{args.port}; results to {args.forward}; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
        print(json.dumps(node.report(), indent=1))
    return 0


def send_command(args) -> int:
    from cutremain_monai.pacs.node import parse_destination, send_folder  # lazy: `cutremain --help` starts without torch

    failed = send_folder(args.folder, parse_destination(args.to), calling_ae=args.ae_title)
    for path, reason in sorted(failed.items()):
        print(f"not sent: {path}: {reason}")
    print(json.dumps({"not_sent": len(failed)}))
    return 1 if failed else 0


def deidentify_command(args) -> int:
    from cutremain_monai.pacs.deidentify import deidentify  # lazy: `cutremain --help` starts without torch

    report = deidentify(args.input, args.output)
    flagged = sum(1 for r in report.written if r["flags"])
    print(json.dumps({"written": len(report.written), "not_dicom": report.not_dicom, "failed": report.failed,
                      "flagged_pixels_may_carry_text": flagged, "report": os.path.join(args.output, "deidentify_report.csv")}))
    return 0 if not report.failed else 1


def register(sub) -> None:
    """Add ``infer``, ``listen``, ``send`` and ``deidentify`` to the ``cutremain`` subparsers."""
    p = sub.add_parser("infer", help="score every X-ray of a folder with a trained bundle (its inference.yaml): "
                       "predictions.csv, overlays, and with --dicom-out the SR / Secondary Capture / presentation state")
    p.add_argument("--bundle", required=True)
    p.add_argument("--input", required=True, help="the folder of images (a PACS export: any names, any nesting)")
    p.add_argument("--output-dir", help="the training run's output folder (its checkpoint and threshold)")
    p.add_argument("--dicom-out", help="write the DICOM results here (SR/, SC/, PR/, manifest.csv)")
    p.add_argument("--registry-version", help="the MLflow model version to name in the DICOM results")
    p.add_argument("--configs", default="train.yaml", help="the bundle's configs before inference.yaml (default %(default)s)")
    p.add_argument("--overrides", help="JSON of bundle settings")
    p.set_defaults(func=infer_command)

    p = sub.add_parser("listen", help="a DICOM node: receive X-rays (C-STORE), score each study with a bundle once it "
                       "is quiet, send the SR / Secondary Capture / presentation state back")
    p.add_argument("--bundle", required=True, help="the bundle folder (its inference.yaml runs with dicom_out)")
    p.add_argument("--ae-title", default="CUTREMAIN")
    p.add_argument("--port", type=int, default=11112)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--forward", required=True, metavar="HOST:PORT:AET", help="where the results go (the PACS)")
    p.add_argument("--work", default="cutremain_node", help="incoming/, results/, retry/, set_aside/")
    p.add_argument("--quiet", type=float, default=10.0, help="seconds without a new image before a study is scored")
    p.add_argument("--configs", default="train.yaml", help="the bundle's configs before inference.yaml (e.g. "
                   "train.yaml,cpu.yaml)")
    p.add_argument("--overrides", help='JSON of bundle settings, e.g. \'{"output_dir": "outputs/run1"}\' (the model)')
    p.set_defaults(func=listen_command)

    p = sub.add_parser("send", help="send every DICOM file of a folder to a DICOM node (C-STORE)")
    p.add_argument("folder")
    p.add_argument("--to", required=True, metavar="HOST:PORT:AET")
    p.add_argument("--ae-title", default="CUTREMAIN", help="our (calling) AE title")
    p.set_defaults(func=send_command)

    p = sub.add_parser("deidentify", help="de-identified copy of a DICOM export for research (dicognito, keyed; "
                       "boxes in presentation states still pair)")
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=deidentify_command)
