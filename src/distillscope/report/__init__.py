"""Reports for humans: every HTML page distillscope writes, and the audit's terminal table.

Each page is a Jinja2 template in ``report/templates`` sharing one stylesheet (``pages``), and is
one self-contained file: the exposure audit (``audit_report``), the detection report and its
evaluation (``detection``) and the radioactivity evidence (``evidence``).

Kept apart from the audit itself so results can be re-rendered from ``results.json`` without
re-training anything, and so plotting (matplotlib, imported only when a report is written) never
weighs on the training or serving paths::

    from distillscope.report import write_audit_report, format_headline
    page = write_audit_report(json.loads(Path("runs/audit/results.json").read_text()), "runs/audit")
    rich.print(format_headline(results))
"""

from distillscope.report.audit_report import format_headline, write_audit_report

__all__ = ["format_headline", "write_audit_report"]
