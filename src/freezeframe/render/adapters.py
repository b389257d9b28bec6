"""The report's Adapters table (a PEFT run's LoRA modules; docs/peft.md): HTML from the table
`analyse.tables.adapters_table` builds. Every name is escaped."""

from __future__ import annotations

from html import escape as e


def _rel(x) -> str:
    return "—" if x is None else f"{100 * x:.3g} %"


def _yes_no(x, yes: str, no: str, good: bool) -> str:
    if x is None:
        return "<span class=dim>unknown</span>"
    return f"<span class={'yes' if x is good else 'no'}>{yes if x else no}</span>"


def _zero(r: dict) -> str:
    """Which factor of ΔW = scale·B·A is all zero, if one is."""
    zero = [f for f, key in (("B", "b_zero"), ("A", "a_zero")) if r.get(key) is True]
    if zero:
        return f"<span class=no>{' and '.join(zero)} all zero</span>"
    return _yes_no(None if r.get("b_zero") is None else False, "all zero", "non-zero", False)


def adapters_html(table: dict | None) -> str:
    if not table or not table["rows"]:
        return ""
    head = ("<tr><th>module</th><th>adapter</th>"
            + "".join(f"<th>‖ΔW‖/‖W‖<br>{e(str(name))}</th>" for name in table["stages"])
            + "<th>lora_B · lora_A</th><th>base weights</th></tr>")
    body = []
    for r in table["rows"]:
        cells = "".join(f"<td>{_rel(x)}</td>" for x in r["delta_rel"])
        body.append(f"<tr><td>{e(str(r['module']))}</td><td>{e(str(r['adapter']))}</td>{cells}"
                    f"<td>{_zero(r)}</td>"
                    f"<td>{_yes_no(r['base_unchanged'], 'bitwise unchanged', 'changed', True)}</td></tr>")
    update = ("low-rank update ‖scale·B·A‖/‖W‖ (with DoRA the magnitude vector also scales the weight)"
              if table.get("dora") else "effective update ‖scale·B·A‖/‖W‖")
    return (f"<h3>Adapters</h3><p class=how>Each LoRA-wrapped module: its adapter's {update} at the end of each "
            f"stage (— where the end was not captured), whether a factor (lora_B, or an embedding's "
            f"lora_embedding_A) is exactly zero (the adapter then changes nothing) and whether the base weights "
            f"are bitwise as watching began, at the last stage.</p><table class=stages>{head}{''.join(body)}</table>")
