"""The safety report of a clone job, as the CLI prints it (jobs show, watch, clone --watch, demo)."""

from __future__ import annotations

from typing import Any

from rich.console import Console


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _action(a: dict[str, Any]) -> str:
    if a.get("state") == "failed":
        return f"FAILED: {a.get('error', '')}"
    if a["kind"] == "sql":
        return f"{_plural(a.get('statements', 0), 'statement')}, {_plural(a.get('rows', 0), 'row')}"
    if a["kind"] == "delete_keys":
        return f"{_plural(a.get('deleted', 0), 'key')} deleted"
    if a["kind"] == "config":
        return "set " + ", ".join(a.get("keys", []))
    return a.get("state", "")


def lines(job: dict[str, Any]) -> list[str]:
    s = job.get("safety")
    if not s:
        return []
    fence = s["fence"] or "not set up yet"
    leak_style = "red" if s["leaks"] and s["on_leak"] == "fail" else ("yellow" if s["leaks"] else "green")
    out = [f"[bold]safety[/]: fence {fence} · credentials rotated on {_plural(s['credentials_rotated'], 'node')} · "
           f"{_plural(s['rewrites'], 'rewrite')} · [{leak_style}]{_plural(s['leaks'], 'leak')}[/] "
           f"(on_leak {s['on_leak']}) · {_plural(s['actions'], 'on_clone action')} run"
           + (f", [red]{s['actions_failed']} failed[/]" if s["actions_failed"] else "")
           + (f" · {_plural(s.get('masked_rows', 0), 'row')} masked by {_plural(s['masked_rules'], 'rule')}"
              if s.get("masked_rules") else "")
           + (f", [red]{_plural(s['masked_failed'], 'masking rule')} failed[/]" if s.get("masked_failed") else "")
           + f" · scanned {_plural(s['scanned_files'], 'file')} on {_plural(s['scanned_nodes'], 'node')}"
           + ("" if s["scan_complete"] else " [yellow](incomplete: file limit)[/]")]
    out += [f"  leak    {x['node']} {x['file']}:{x['line']} {x['kind']}" for x in job.get("leaks", [])]
    out += [f"  action  {a['node']} {a['kind']}: {_action(a)}" for a in job.get("actions", [])]
    out += [f"  masked  {m['node']} {m['table']}.{m['column']} with {m['with']}: "
            + (f"FAILED: {m.get('error', '')}" if m.get("state") == "failed" else _plural(m.get("rows", 0), "row"))
            for m in job.get("masked", [])]
    return out


def print_safety(console: Console, job: dict[str, Any]) -> None:
    for line in lines(job):
        console.print(line, highlight=False)
