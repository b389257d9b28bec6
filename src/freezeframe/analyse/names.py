"""How the report names what it shows: module paths as a person reads them, and param groups as
the layer groups they are (docs/report.md)."""

from __future__ import annotations

import re

_DEFAULT_GROUP_NAME = re.compile(r"^(opt\d+\.)?pg\d+$")


def readable_name(name: str, *, fastai: bool = False) -> str:
    """A module path as a person reads it: numeric parts as indices (`stem.0` → `stem[0]`); in a
    fastai model (a Sequential of body and head) `0.4.0.conv1` → `body[4][0].conv1`."""
    if not name or name == "(root)":
        return "(root)"
    out = ""
    for i, part in enumerate(name.split(".")):
        if i == 0 and fastai and part in ("0", "1"):
            out = "body" if part == "0" else "head"
        elif part.isdigit():
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def is_fastai_layout(summary: dict) -> bool:
    tops = {m["name"].split(".")[0] for m in summary["modules"] if m["name"]}
    return summary["run"].get("framework") == "fastai" and bool(tops) and tops <= {"0", "1"}


def group_labels(summary: dict) -> dict[int, str]:
    """Global param-group index → the layer group it is: its own name when it has one, else
    `group k` with k its position in its optimizer (so `pg0` and `opt1.pg0` of a rebuilt
    optimizer are both `group 0`)."""
    out: dict[int, str] = {}
    for s in summary["stages"]:
        seen: dict[int, int] = {}
        for g in s["groups"]:
            pos = seen.get(g["optimizer"], 0)
            seen[g["optimizer"]] = pos + 1
            out.setdefault(g["index"], g["name"] if not _DEFAULT_GROUP_NAME.match(g["name"]) else f"group {pos}")
    return out


def _row_group(groups: list[int], labels: dict[int, str]) -> str:
    names = list(dict.fromkeys(labels.get(g, f"pg{g}") for g in groups))
    if not names:
        return "no group"
    if len(names) == 1:
        return names[0]
    if all(n.startswith("group ") for n in names):
        return "groups " + "/".join(n.removeprefix("group ") for n in names)
    return " / ".join(names)
