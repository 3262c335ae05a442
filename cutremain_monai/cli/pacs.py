"""Results back to the PACS and the DICOM node: ``infer`` (a folder through a bundle's inference), ``listen`` (a
DICOM node that scores each study it receives), ``watch`` (the same over DICOMweb: QIDO-RS / WADO-RS in, STOW-RS
out), ``send`` (C-STORE or STOW-RS a folder), ``deidentify`` (a research copy). Credentials for DICOMweb come
from ``--auth-env VAR`` or ``--auth-file PATH``, never from the command line."""

from __future__ import annotations

import json
import os
import time

from cutremain_monai.cli.common import comma_list

__all__ = ["register", "add_dicomweb_options", "dicomweb_options"]


def add_dicomweb_options(p) -> None:
    """The transport options of a DICOMweb server (credentials by variable or file only)."""
    g = p.add_argument_group("DICOMweb")
    g.add_argument("--auth-env", metavar="VAR", help="environment variable holding user:password (HTTP basic) or a "
                   "bearer token")
    g.add_argument("--auth-file", metavar="PATH", help="file holding user:password or a bearer token")
    g.add_argument("--auth-type", choices=["auto", "basic", "bearer"], default="auto",
                   help="auto: basic when the secret holds a colon (default)")
    g.add_argument("--ca-bundle", metavar="PEM", help="CA certificates for https (default: the system's)")
    g.add_argument("--http-timeout", type=float, default=30.0, help="seconds per request (default %(default)s)")
    g.add_argument("--max-concurrent", type=int, default=4, help="requests at once (default %(default)s)")


def dicomweb_options(args) -> dict:
    return {"auth_env": args.auth_env, "auth_file": args.auth_file, "auth_type": args.auth_type,
            "ca_bundle": args.ca_bundle, "timeout": args.http_timeout, "max_concurrent": args.max_concurrent}


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
    # the file the bundle's writer wrote (predictions.csv; covid_severity: severity.csv)
    writer = wf.parser.get_parsed_content("predictions_writer") if "predictions_writer" in wf.parser else None
    table = getattr(writer, "path", None) or os.path.join(wf.parser.get_parsed_content("inference_dir"), "predictions.csv")
    print(f"predictions: {table}" + (f"; DICOM results: {args.dicom_out}/manifest.csv" if args.dicom_out else ""))
    if args.dicom_out and args.send_to:
        return _send(args.dicom_out, args.send_to, args)
    return 0


def _serve_until_interrupted(node) -> int:
    """Keep a started node (listener or watcher) running until Ctrl-C, then stop it and print its report."""
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
        print(json.dumps(node.report(), indent=1))
    return 0


def listen_command(args) -> int:
    from cutremain_monai.pacs.node import Listener, parse_destination  # lazy: `cutremain --help` starts without torch

    forward = parse_destination(args.forward, **dicomweb_options(args))
    node = Listener(args.bundle, args.work, forward, ae_title=args.ae_title, port=args.port,
                    host=args.host, configs=comma_list(args.configs),
                    overrides=json.loads(args.overrides) if args.overrides else {}, quiet_seconds=args.quiet)
    node.start()
    print(f"listening as {args.ae_title} on {args.host}:{args.port}; results to {args.forward}; Ctrl-C stops", flush=True)
    return _serve_until_interrupted(node)


def _send(folder: str, to: str, args) -> int:
    from cutremain_monai.pacs.node import parse_destination, send_folder  # lazy: `cutremain --help` starts without torch

    warnings: dict[str, str] = {}
    failed = send_folder(folder, parse_destination(to, **dicomweb_options(args)), calling_ae=args.ae_title,
                         warnings=warnings)
    for path, why in sorted(warnings.items()):
        print(f"stored with a warning: {path}: {why}")
    for path, reason in sorted(failed.items()):
        print(f"not sent: {path}: {reason}")
    print(json.dumps({"not_sent": len(failed), "warnings": len(warnings)}))
    return 1 if failed else 0


def send_command(args) -> int:
    if bool(args.to) == bool(args.stow):
        raise SystemExit("send: give --to HOST:PORT:AET (C-STORE) or --stow URL (STOW-RS)")
    return _send(args.folder, args.to or args.stow, args)


def watch_command(args) -> int:
    from cutremain_monai.pacs.dicomweb import DicomWebServer  # lazy: `cutremain --help` starts without torch
    from cutremain_monai.pacs.node import parse_destination  # lazy: as above
    from cutremain_monai.pacs.watch import Watcher  # lazy: as above

    source = DicomWebServer(args.url, **{k: v for k, v in dicomweb_options(args).items() if v is not None})
    forward = parse_destination(args.forward, **dicomweb_options(args)) if args.forward else None
    node = Watcher(source, args.bundle, args.work, forward=forward, modalities=comma_list(args.modalities),
                   poll_seconds=args.poll, since=args.since, lookback_days=args.lookback_days,
                   undated_every=args.undated_every, relist_every=args.relist_every, ae_title=args.ae_title, configs=comma_list(args.configs),
                   overrides=json.loads(args.overrides) if args.overrides else {}, quiet_seconds=args.quiet)
    node.start()
    print(f"watching {source} every {args.poll:g} s; results to {node.forward}; Ctrl-C stops", flush=True)
    return _serve_until_interrupted(node)


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
    p.add_argument("--send-to", metavar="DEST", help="with --dicom-out: send the results to HOST:PORT:AET (C-STORE) "
                   "or a DICOMweb URL (STOW-RS)")
    p.add_argument("--ae-title", default="CUTREMAIN", help="our (calling) AE title for --send-to")
    add_dicomweb_options(p)
    p.set_defaults(func=infer_command)

    p = sub.add_parser("listen", help="a DICOM node: receive X-rays (C-STORE), score each study with a bundle once it "
                       "is quiet, send the SR / Secondary Capture / presentation state back")
    p.add_argument("--bundle", required=True, help="the bundle folder (its inference.yaml runs with dicom_out)")
    p.add_argument("--ae-title", default="CUTREMAIN")
    p.add_argument("--port", type=int, default=11112)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--forward", required=True, metavar="DEST", help="where the results go (the PACS): HOST:PORT:AET "
                   "(C-STORE) or a DICOMweb URL (STOW-RS)")
    p.add_argument("--work", default="cutremain_node", help="incoming/, results/, retry/, set_aside/")
    p.add_argument("--quiet", type=float, default=10.0, help="seconds without a new image before a study is scored")
    p.add_argument("--configs", default="train.yaml", help="the bundle's configs before inference.yaml (e.g. "
                   "train.yaml,cpu.yaml)")
    p.add_argument("--overrides", help='JSON of bundle settings, e.g. \'{"output_dir": "outputs/run1"}\' (the model)')
    add_dicomweb_options(p)
    p.set_defaults(func=listen_command)

    p = sub.add_parser("watch", help="a DICOMweb node: poll QIDO-RS for new DX/CR studies, retrieve them (WADO-RS), "
                       "score each with a bundle and store the results (STOW-RS)")
    p.add_argument("url", help="the DICOMweb base URL, e.g. https://pacs.example/dicom-web (no credentials in it)")
    p.add_argument("--bundle", required=True, help="the bundle folder (its inference.yaml runs with dicom_out)")
    p.add_argument("--forward", metavar="DEST", help="where the results go (default: the watched server, STOW-RS)")
    p.add_argument("--work", default="cutremain_watch", help="incoming/, results/, retry/, set_aside/, watch_state.json")
    p.add_argument("--modalities", default="DX,CR", help="series modalities scored (default %(default)s)")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between QIDO-RS polls (default %(default)s)")
    p.add_argument("--since", metavar="YYYYMMDD", help="the StudyDate watermark when there is no state (default today)")
    p.add_argument("--lookback-days", type=float, default=7.0, help="each poll looks at studies from this many days "
                   "before the watermark on: a study filed late with an earlier date is still found (default %(default)s)")
    p.add_argument("--undated-every", type=int, default=20, help="every this many polls also look for studies without "
                   "a StudyDate (0: never; default %(default)s)")
    p.add_argument("--relist-every", type=int, default=20, help="every this many polls list every study of the window "
                   "again, even one whose instance count has not changed (an image replaced between two polls; 0: "
                   "only the first poll; default %(default)s)")
    p.add_argument("--quiet", type=float, default=0.0, help="seconds without a new image before a study is scored")
    p.add_argument("--ae-title", default="CUTREMAIN", help="our AE title (a DIMSE --forward)")
    p.add_argument("--configs", default="train.yaml", help="the bundle's configs before inference.yaml")
    p.add_argument("--overrides", help='JSON of bundle settings, e.g. \'{"output_dir": "outputs/run1"}\' (the model)')
    add_dicomweb_options(p)
    p.set_defaults(func=watch_command)

    p = sub.add_parser("send", help="send every DICOM file of a folder to a DICOM node (C-STORE) or a DICOMweb "
                       "server (STOW-RS)")
    p.add_argument("folder")
    p.add_argument("--to", metavar="HOST:PORT:AET", help="C-STORE to this DICOM node")
    p.add_argument("--stow", metavar="URL", help="STOW-RS to this DICOMweb base URL (no credentials in it)")
    p.add_argument("--ae-title", default="CUTREMAIN", help="our (calling) AE title")
    add_dicomweb_options(p)
    p.set_defaults(func=send_command)

    p = sub.add_parser("deidentify", help="de-identified copy of a DICOM export for research (dicognito, keyed; "
                       "boxes in presentation states still pair)")
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=deidentify_command)
