"""``fedunlearn``: the data owner's and the auditor's command.

``fedunlearn request ...`` works on a SuperNode's request inbox (:mod:`.inbox`) while
the SuperNode runs::

    fedunlearn request file --inbox DIR --scope class --classes 3,5 [--note TEXT]
    fedunlearn request file --inbox DIR --scope instance --sample-ids 12,40
    fedunlearn request file --inbox DIR --scope instance --fraction 0.1
    fedunlearn request file --inbox DIR --scope client
    fedunlearn request list --inbox DIR [--json]
    fedunlearn request show --inbox DIR ID [--json]     # the request and its receipts
    fedunlearn request withdraw --inbox DIR ID

``--inbox`` defaults to ``$FEDUNLEARN_INBOX``; it is the folder the SuperNode's
node-config names (``inbox="/abs/path"``).

``fedunlearn audit LOG [--run ID] [--event PREFIX] [--json] [--inbox DIR ...]`` prints
the server's audit log (:mod:`.audit`) as a table and checks its chain of records, its
end against the head file beside it and, with ``--inbox``, against the chain heads the
inbox's receipts carry; it exits 1 when any check fails (a record removed, edited or
inserted, a cut tail, a log rewritten since a receipt), 0 otherwise.

``fedunlearn versions DIR [--request ID] [--json]`` lists the versions a service
(:mod:`.live`) published in its state directory: version, round, kind, status
(``published``, or ``ABANDONED``: listed by a run cut short before its checkpoint, then
replaced under the next number; the reason follows the table), SHA-256 (of the
version's file), the requests each honours and the target nodes' own checks;
``--request`` keeps the versions that honour one inbox request.

``fedunlearn verify MODEL [--audit PATH ...] [--json]`` recomputes a saved model's
SHA-256 (of the file's bytes, as ``sha256sum`` does) and its array digest and names
every record that holds either (:mod:`.verify`): the audit log, ``results.json``,
``versions.json``, an inbox's receipts. It exits 1 when no record names the model, when
one names the file with another hash, or when an audit log that names it is broken.

``fedunlearn cka --data digits --model cnn REF=PATH NAME=PATH ... --out DIR`` compares
saved models (torch state dicts, e.g. ``<output_dir>/<method>/model.pt``) with the
first one, layer by layer: linear CKA of each traced layer's activations on the first
``--samples`` test images (:mod:`.analysis`, the NoT paper's Figure 3). It writes
``DIR/cka.json``, ``DIR/cka.md`` and ``DIR/cka.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .audit import check_anchors, format_table, read_audit, receipt_anchors
from .inbox import INBOX_ENV, Inbox, InboxEntry, InboxError
from .parsing import parse_int_list


def _ints(text: str, option: str) -> list[int]:
    """``"3,5"`` -> ``[3, 5]``; a bad value is an :class:`InboxError` naming ``option``."""
    try:
        return list(parse_int_list(text, option))
    except ValueError as err:
        raise InboxError(str(err)) from None


def _inbox(args, create: bool) -> Inbox:
    root = args.inbox or os.environ.get(INBOX_ENV, "")
    if not root:
        raise InboxError(f"no inbox: pass --inbox DIR or set {INBOX_ENV} (the folder the "
                         "SuperNode's node-config names as inbox=...)")
    return Inbox(os.path.abspath(os.path.expanduser(root)), create=create)


def _row(entry: InboxEntry) -> dict:
    """A request's row: its status and, for the events of that status, every method
    (a request several methods served has one receipt per method) or the reason."""
    same = [e for e in entry.events if e["status"] == entry.status]
    last = same[-1] if same else {}
    methods = list(dict.fromkeys(e["method"] for e in same if e.get("method")))
    runs = list(dict.fromkeys(str(e["run"]) for e in same if e.get("run", "") != ""))
    return {"id": entry.request.id, "filed": entry.request.filed_at, "scope": entry.request.scope,
            "what": entry.request.what(), "status": entry.status,
            "run": ", ".join(runs), "methods": methods,
            "detail": last.get("reason") or ", ".join(methods), "note": entry.request.note}


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [columns] + [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in cells)


def cmd_file(args) -> int:
    inbox = _inbox(args, create=True)
    request = inbox.file(args.scope, classes=_ints(args.classes, "--classes"),
                         sample_ids=_ints(args.sample_ids, "--sample-ids"),
                         fraction=args.fraction, note=args.note)
    print(request.id)
    print(f"filed: {request.what()} in {inbox.root}; the SuperNode sends it at the server's "
          "next query", file=sys.stderr)
    return 0


def cmd_list(args) -> int:
    inbox = _inbox(args, create=False)
    entries, problems = inbox.entries()
    rows = [_row(e) for e in entries]
    if args.json:
        print(json.dumps({"requests": rows, "unreadable": [str(p) for p in problems]},
                         indent=1))
    else:
        print(_table(rows, ["id", "filed", "what", "status", "run", "detail"]) if rows
              else "no readable requests" if problems else "no requests")
        for line in problems:
            print(f"unreadable: {line}", file=sys.stderr)
    return 1 if problems else 0


def cmd_show(args) -> int:
    entry = _inbox(args, create=False).entry(args.id)
    if args.json:
        print(json.dumps({"request": entry.request.to_json(), "status": entry.status,
                          "receipts": entry.events}, indent=1))
        return 0
    r = entry.request
    print(f"request {r.id}: {r.what()}, filed {r.filed_at}" + (f" ({r.note})" if r.note else ""))
    print(f"status: {entry.status}")
    for event in entry.events:
        extra = ", ".join(f"{k}={v}" for k, v in event.items()
                          if k not in ("time", "status", "check"))
        print(f"  {event.get('time', '')}  {event['status']:<9} {extra}")
        check = event.get("check")
        if isinstance(check, dict):
            def pct(key):
                v = check.get(key)
                return "-" if v is None else f"{v:.2f}%"

            def loss(key):
                v = check.get(key)
                return "" if v is None else f" (loss {v:.4f})"
            print(f"      node's check of version {event.get('version', '?')}: model hash "
                  f"{'matches' if _hash_ok(check) else 'DOES NOT MATCH'}; forget "
                  f"data {pct('forget-accuracy')}{loss('forget-loss')} on "
                  f"{check.get('forget-total', 0)} sample(s), retained data "
                  f"{pct('retain-accuracy')}{loss('retain-loss')} on "
                  f"{check.get('retain-total', 0)} sample(s)"
                  + (f"; filed -> honoured {event['filed_to_honoured_s']:.1f} s"
                     if isinstance(event.get("filed_to_honoured_s"), (int, float)) else ""))
    return 0


def cmd_versions(args) -> int:
    from .service import honoured_by, read_versions

    versions = read_versions(Path(args.state_dir).expanduser())
    if args.request:
        versions = honoured_by(versions, args.request)
        if not versions:
            raise InboxError(f"no version in {args.state_dir} honours request {args.request}")
    if args.json:
        print(json.dumps({"versions": versions}, indent=1))
        return 0
    rows = []
    for v in versions:
        honours = "; ".join(
            f"node {h['node']} {h['scope']}"
            + (f" {h['classes']}" if h.get("classes") else "")
            + (f" ({', '.join(h['inbox_ids'])})" if h.get("inbox_ids") else "")
            for h in v.get("honours", [])) or "-"
        checks = "; ".join(
            f"node {n}: hash {'ok' if _hash_ok(c) else 'MISMATCH'}, forget "
            f"{c.get('forget-accuracy', '-')}%, "
            + (f"retained {c.get('retain-accuracy', '-')}%" if c.get("retain-total")
               else "nothing retained")
            for n, c in v.get("node_checks", {}).items()) or "-"
        test = v.get("metrics", {}).get("test")
        rows.append({"version": v["version"], "round": v["round"], "kind": v["kind"],
                     "status": "ABANDONED" if v.get("abandoned") else "published",
                     "sha256": v["sha256"][:12], "test": "-" if test is None else f"{test:.2f}",
                     "honours": honours, "node check": checks})
    print(_table(rows, ["version", "round", "kind", "status", "sha256", "test", "honours",
                        "node check"]))
    for v in versions:
        if v.get("abandoned"):  # its reason: why no receipt names it, the service went on
            print(f"version {v['version']} abandoned: {v['abandoned']}")
    return 0


def _hash_ok(check: dict) -> bool:
    """A node's check: the model it was sent has the array digest its receipt names
    (``model-sha256-ok`` in checks recorded before the hashes were split)."""
    return bool(check.get("model-arrays-sha256-ok", check.get("model-sha256-ok")))


def cmd_verify(args) -> int:
    from .verify import verify_model  # torch only for this command

    result = verify_model(args.model, args.audit or None)
    print(json.dumps(result.as_dict(), indent=1) if args.json else result.text())
    for line in result.notes:
        print(line, file=sys.stderr)
    return 0 if result.ok else 1


def cmd_withdraw(args) -> int:
    _inbox(args, create=False).withdraw(args.id)
    print(f"withdrawn: {args.id} (takes effect at the server's next query)")
    return 0


def cmd_audit(args) -> int:
    path = Path(args.log)
    if not path.exists():
        raise InboxError(f"no audit log at {path}")
    reading = read_audit(path)
    anchors = []
    for folder in args.inbox or ():
        receipts = Inbox(Path(folder).expanduser().resolve(), create=False).receipts_dir
        found = receipt_anchors(receipts)
        if not found:
            reading.notes.append(f"{receipts}: no receipt carries an audit anchor")
        anchors += found
    check_anchors(reading, anchors)
    records = reading.records
    if args.run is not None:
        records = [r for r in records if str(r.get("run")) == str(args.run)]
    if args.event:
        records = [r for r in records if str(r.get("event", "")).startswith(args.event)]
    if args.json:
        print(json.dumps({"records": records, "skipped": reading.skipped,
                          "chain_breaks": reading.chain_breaks, "notes": reading.notes,
                          "anchors_checked": len(anchors)}, indent=1))
    else:
        print(format_table(records))
        checked = f", {len(anchors)} receipt anchor(s) checked" if args.inbox else ""
        print(f"{len(records)} record(s); chain "
              + ("intact" if reading.intact else f"BROKEN at {len(reading.chain_breaks)} place(s)")
              + checked)
    for line in reading.skipped + reading.notes + reading.chain_breaks:
        print(line, file=sys.stderr)
    if reading.unanchored and not args.no_head:
        print(f"{path}: no head file beside the log, so a cut tail would not show; "
              "pass --no-head to check a copy of the log without it", file=sys.stderr)
        return 1
    return 0 if reading.intact else 1


def _named_path(text: str) -> tuple[str, str]:
    """``NAME=PATH`` -> ``(NAME, PATH)``; a bare path is named after its folder when the
    file is ``model.pt`` (``out/ft/model.pt`` -> ``ft``), else after the file."""
    name, sep, path = text.partition("=")
    if sep and name and path:
        return name, path
    if sep:
        raise ValueError(f"{text!r}: expected NAME=PATH, e.g. ft=out/ft/model.pt")
    p = Path(text)
    return (p.parent.name if p.name == "model.pt" and p.parent.name else p.stem), text


def cmd_cka(args) -> int:
    from .harness.analysis import run_cka  # torch and matplotlib only for this command

    models = [_named_path(m) for m in args.models]
    if len(models) < 2:
        raise ValueError("name the reference and at least one model: REF=PATH NAME=PATH ...")
    layers = [x.strip() for x in args.layers.split(",") if x.strip()] if args.layers else None
    if layers:  # the top-level module (a ViT's cls_token, pos_embed) as the table shows it
        layers = ["" if x == "(top level)" else x for x in layers]
    result = run_cka(args.data, args.model, models[0], models[1:], args.out,
                     samples=args.samples, batch_size=args.batch_size, layers=layers,
                     root=args.root, image_size=args.image_size)
    print(result["table"], end="")
    if result["samples"] < args.samples:
        print(f"note: the {args.data} test split has {result['samples']} images; all of them "
              f"were used (--samples {args.samples})", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in result["paths"].values()), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedunlearn", description="Unlearning requests on a SuperNode's inbox; the "
        "server's audit log; a saved model's hashes; CKA of saved models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_request_commands(sub)
    _add_audit_command(sub)
    _add_versions_command(sub)
    _add_verify_command(sub)
    _add_cka_command(sub)
    return parser


def _add_request_commands(sub) -> None:
    """``fedunlearn request file|list|show|withdraw``."""
    request = sub.add_parser("request", help="file, list, show or withdraw unlearning "
                             "requests in a SuperNode's inbox")
    rsub = request.add_subparsers(dest="action", required=True)

    def inbox_arg(p):
        p.add_argument("--inbox", default="", help=f"the inbox folder (default: ${INBOX_ENV})")

    p = rsub.add_parser("file", help="file a new request")
    inbox_arg(p)
    p.add_argument("--scope", required=True, choices=["client", "class", "instance"])
    p.add_argument("--classes", default="", help="class-wise: labels, e.g. 3,5")
    p.add_argument("--sample-ids", default="", help="instance-wise: the samples' positions "
                   "in this node's training set (0-based), or the data owner's own ids when "
                   "the node's attach() was given sample_ids=")
    p.add_argument("--fraction", type=float, default=None,
                   help="instance-wise without ids: this share of the node's training data")
    p.add_argument("--note", default="", help="free text kept with the request")
    p.set_defaults(fn=cmd_file)
    p = rsub.add_parser("list", help="every request with its status")
    inbox_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_list)
    p = rsub.add_parser("show", help="one request and its receipts")
    inbox_arg(p)
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_show)
    p = rsub.add_parser("withdraw", help="withdraw a pending request")
    inbox_arg(p)
    p.add_argument("id")
    p.set_defaults(fn=cmd_withdraw)


def _add_audit_command(sub) -> None:
    """``fedunlearn audit``."""
    p = sub.add_parser("audit", help="print the server's audit log as a table")
    p.add_argument("log", help="the audit log (e.g. <output-dir>/audit.jsonl)")
    p.add_argument("--run", default=None, help="only this Flower run id")
    p.add_argument("--event", default="", help="only events starting with this, e.g. request.")
    p.add_argument("--no-head", action="store_true",
                   help="accept a log without its head file (<log>.head), e.g. a copy; "
                        "its end is then not checked")
    p.add_argument("--json", action="store_true")
    p.add_argument("--inbox", action="append", default=[],
                   help="check the log against the audit anchors of this inbox's receipts "
                   "(repeatable)")
    p.set_defaults(fn=cmd_audit)


def _add_versions_command(sub) -> None:
    """``fedunlearn versions``."""
    p = sub.add_parser("versions", help="the versions a service published (service mode)")
    p.add_argument("state_dir", help="the service's state directory (its output dir)")
    p.add_argument("--request", default="", help="only the versions that honour this "
                   "inbox request id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_versions)


def _add_verify_command(sub) -> None:
    """``fedunlearn verify``."""
    p = sub.add_parser("verify", help="recompute a saved model's SHA-256 and array digest "
                       "and name the records that hold them")
    p.add_argument("model", help="a saved model, e.g. <output-dir>/<method>/model.pt")
    p.add_argument("--audit", action="append", default=[], metavar="PATH",
                   help="also search this audit log, results.json, versions.json, inbox or "
                   "folder holding them (repeatable; the model's folder and the one above "
                   "are always searched)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_verify)


def _add_cka_command(sub) -> None:
    """``fedunlearn cka``."""
    p = sub.add_parser("cka", help="per-layer linear CKA of saved models against a "
                       "reference (the NoT paper's Figure 3)")
    p.add_argument("models", nargs="+", metavar="NAME=PATH",
                   help="torch state dicts; the first is the reference")
    p.add_argument("--data", required=True, help="data set, e.g. digits")
    p.add_argument("--model", required=True, help="model name, e.g. cnn")
    p.add_argument("--out", required=True, help="folder for cka.json, cka.md, cka.png")
    p.add_argument("--samples", type=int, default=500,
                   help="use the first N test images (default 500)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--layers", default="", help="only these layers, comma-separated "
                   "as the table names them (default: every traced layer)")
    p.add_argument("--root", default="", help="data folder (CIFAR, Caltech-101)")
    p.add_argument("--image-size", type=int, default=None,
                   help="image side, if the models were trained on resized images")
    p.set_defaults(fn=cmd_cka)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as err:  # InboxError and WireError are ValueErrors
        print(f"fedunlearn {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
