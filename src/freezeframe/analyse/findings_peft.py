"""Findings on LoRA / PEFT runs: an adapter with a factor still zero, base weights that trained or
had an adapter merged into them, and adapters that got no gradient under reentrant gradient
checkpointing. Each is a pure function of the summary (docs/peft.md)."""

from __future__ import annotations

_ENABLE = ('call model.enable_input_require_grads() after get_peft_model(), or use non-reentrant checkpoints: '
           'model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})')


def _finding(code, severity, message, stage=None, params=()):
    return {"code": code, "severity": severity, "message": message, "stage": stage, "params": list(params)}


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _train(summary) -> list[tuple[int, dict]]:
    return [(k, s) for k, s in enumerate(summary["stages"]) if s["kind"] != "trial"]


def lora_modules(summary) -> list[str]:
    """The LoRA-wrapped modules the run knows of: the stages' `lora` keys, and every module whose
    `base_layer` sits beside adapter tensors."""
    out = [n for s in summary["stages"] for n in (s.get("lora") or {})]
    prefixes = {p["name"].rpartition(".lora_")[0] for p in summary["params"]
                if p.get("adapter") and ".lora_" in p["name"]}
    out += [p["name"].partition(".base_layer.")[0] for p in summary["params"]
            if ".base_layer." in p["name"] and p["name"].partition(".base_layer.")[0] in prefixes]
    return list(dict.fromkeys(out))


def lora_base_weights(summary) -> set[str]:
    """Names of the base tensors of LoRA-wrapped modules (`<module>.base_layer.weight`, `.bias`)."""
    mods = lora_modules(summary)
    return {p["name"] for p in summary["params"] if p.get("adapter") is None
            and any(p["name"].startswith(f"{m}.base_layer.") for m in mods)}


def _adapters_train(summary, k: int) -> list[dict]:
    return [p for p in summary["params"] if p.get("adapter") and p["stages"][k]["trainable"]
            and p["stages"][k]["in_optimizer"]]


def _no_grad_trap(summary, k: int, s: dict) -> list[str]:
    """Adapter tensors the optimizer held that got no gradient in a stage run with reentrant
    checkpoints and inputs that do not require grad."""
    gc = (s.get("meta") or {}).get("gradient_checkpointing")
    if not (isinstance(gc, dict) and gc.get("enabled") is True and gc.get("use_reentrant") is True
            and gc.get("inputs_require_grad") is False and s["steps"]):
        return []
    return [p["name"] for p in _adapters_train(summary, k) if p["stages"][k]["grad_steps"] == 0]


def checkpointing_no_grad(summary, view) -> list[dict]:
    out = []
    for k, s in _train(summary):
        hit = _no_grad_trap(summary, k, s)
        if not hit:
            continue
        got = [p["name"] for p in summary["params"] if p["stages"][k]["grad_steps"]]
        trained = (f"only {len(got)} tensor(s) outside the checkpointed blocks got gradients ({_names(got)})"
                   if got else "no tensor got a gradient")
        out.append(_finding(
            "checkpointing-no-grad", "error",
            f"In stage {s['name']!r}, gradient checkpointing ran reentrant checkpoints (use_reentrant=True) on "
            f"inputs that do not require grad, so {len(hit)} adapter tensor(s) the optimizer holds got no "
            f"gradient in {s['steps']} steps ({_names(hit)}): a reentrant checkpoint whose inputs do not require "
            f"grad returns an output without a graph, and the adapters inside it never learn; {trained}. Fix: "
            f"{_ENABLE}.", s["index"], hit))
    return out


_FACTORS = (("B", "b_zero"), ("A", "a_zero"))


def _factor_of(summary, module: str, adapter: str, side: str) -> list[dict]:
    names = {f"{module}.lora_{side}.{adapter}.weight", f"{module}.lora_embedding_{side}.{adapter}"}
    return [p for p in summary["params"] if p["name"] in names]


def _label(p: dict) -> str:
    """`lora_B`, `lora_A`, `lora_embedding_A` or `lora_embedding_B`: the factor a tensor is."""
    return next(seg for seg in p["name"].split(".") if seg.startswith("lora_"))


def _zero_cause(summary, k: int, s: dict, p: dict) -> str:
    e, label = p["stages"][k], _label(p)
    if e["trainable"] is False:
        return f"{label} was frozen (requires_grad False), e.g. by a loop that froze everything but the head"
    if not e["in_optimizer"]:
        return (f"no optimizer that stepped holds {label} (the optimizer was built before get_peft_model(), or "
                "from another parameter list)")
    group = next((g for g in s["groups"] if g["index"] == e["group"]), None)
    if group is not None and group["lr_applied_max"] == 0:
        return f"{label}'s group {group['name']} had lr 0 at every step"
    if e["grad_steps"] == 0:
        trap = " (see checkpointing-no-grad)" if _no_grad_trap(summary, k, s) else ""
        return f"no gradient reached {label} in {s['steps']} steps{trap}"
    return f"{label} received gradients but its steps left it zero"


def lora_b_still_zero(summary, view) -> list[dict]:
    """A factor of an adapter (B, or A: the zero-initialised one of an embedding's adapter)
    exactly zero at the end of the last training stage that recorded it: then ΔW = 0."""
    last = None
    for k, s in _train(summary):
        if s["steps"] and s.get("lora"):
            last = (k, s)
    if last is None:
        return []
    k, s = last
    zero: dict[str, list[str]] = {}  # factor label -> modules
    causes: dict[str, list[str]] = {}
    names, modules = [], []
    for m, e in s["lora"].items():
        for side, key in _FACTORS:
            if e.get(key) is not True:
                continue
            found = _factor_of(summary, m, e.get("adapter"), side)
            label = _label(found[0]) if found else f"lora_{side}"
            zero.setdefault(label, []).append(m)
            modules.append(m)
            for p in found:
                causes.setdefault(_zero_cause(summary, k, s, p), []).append(m)
                names.append(p["name"])
    if not zero:
        return []
    modules = list(dict.fromkeys(modules))
    which = "; ".join(f"{label} of {len(mods)} LoRA module(s) is exactly zero ({_names(mods)})"
                      for label, mods in zero.items())
    why = "; ".join(f"{cause} ({_names(mods)})" for cause, mods in causes.items()) or "the run does not say why"
    return [_finding(
        "lora-b-still-zero", "error",
        f"At the end of stage {s['name']!r}, {which}: ΔW = scale·B·A is zero, so the adapter contributes nothing "
        f"and the model is the base model (PEFT initialises lora_B to zero, and for an embedding lora_embedding_A). "
        f"Cause: {why}. Fix: leave the adapter tensors trainable after get_peft_model() "
        "(model.print_trainable_parameters() lists them), build the optimizer after get_peft_model() from the "
        "parameters that require grad, and give their group a learning rate above 0.",
        s["index"], names)]


def _intended_bias(summary) -> set[str]:
    """The biases `LoraConfig(bias=...)` trains on purpose: every bias for "all", the biases of
    LoRA-wrapped modules for "lora_only" (PEFT's own rule)."""
    bias = (summary["run"].get("peft") or {}).get("bias")
    if bias == "all":
        return {p["name"] for p in summary["params"] if p["name"] == "bias" or p["name"].endswith(".bias")}
    if bias == "lora_only":
        return {n for n in lora_base_weights(summary) if n.endswith(".base_layer.bias")}
    return set()


def base_changed(summary, view) -> list[dict]:
    """A base tensor (adapter null) left trainable changed in a stage where adapters train, other
    than the biases LoraConfig(bias="all" | "lora_only") trains on purpose."""
    intended = _intended_bias(summary)
    out = []
    for k, s in _train(summary):
        if not s["steps"] or not _adapters_train(summary, k):
            continue
        hit = [p for p in summary["params"] if p.get("adapter") is None and p["stages"][k]["trainable"]
               and p["stages"][k]["changed"] is True and p["name"] not in intended]
        if not hit:
            continue
        names = [p["name"] for p in hit]
        how = ("and an optimizer that stepped holds them" if all(p["stages"][k]["in_optimizer"] for p in hit)
               else "and some no optimizer holds were written outside its steps")
        out.append(_finding(
            "base-changed", "warning",
            f"In stage {s['name']!r}, {len(hit)} base tensor(s), which belong to no adapter, changed while the "
            f"adapters trained ({_names(names)}): they were left trainable (requires_grad True) {how}. The base "
            "model is no longer the pretrained one, and saving only the adapter (save_pretrained) loses these "
            "changes. Fix: freeze them after get_peft_model() (something set requires_grad on them again), or "
            "list their modules in LoraConfig(modules_to_save=[...]) so that a trained copy is saved with the "
            "adapter; LoraConfig(bias='all' or 'lora_only') trains biases on purpose.",
            s["index"], names))
    return out


def _module(name: str) -> str:
    return name.partition(".base_layer.")[0]


def _merged_at_end(s: dict | None) -> set[str]:
    return {m for m, e in ((s or {}).get("lora") or {}).items() if e.get("merged") is True or e.get("removed")}


def _merged_at_start(s: dict | None) -> set[str] | None:
    merged = ((s or {}).get("meta") or {}).get("lora_merged")
    return set(merged) if isinstance(merged, list) else None


def _merged_by_end(s: dict, nxt: dict | None) -> set[str]:
    """Merged at the stage's end, or (an end that recorded no `lora`) at the next one's start."""
    return _merged_at_end(s) if s.get("lora") is not None else (_merged_at_start(nxt) or set())


def _unloaded(s: dict | None) -> set[str]:
    """Modules whose lora_* tensors the stage's `model_changes` shows removed (merge_and_unload())."""
    removed = ((s or {}).get("model_changes") or {}).get("removed") or []
    return {n.rpartition(".lora_")[0] for n in removed if ".lora_" in n}


def _merge_evidence(summary, base: set[str]) -> list[tuple[int, str, list[str], bool]]:
    """(stage position, where, base weights, unloaded) for each base weight of a LoRA-wrapped
    module changed outside an optimizer step (in a stage though no optimizer that stepped holds
    it, in its `outside_writes`, or between the previous stage's end and this start) whose layer
    says a merge happened then: its `merged` flag newly set (stage meta `lora_merged` at a start,
    `lora[m].merged` at an end) or its lora_* tensors removed. Other writes are left to the
    generic findings (stage-discontinuity, changed-outside-optimizer, frozen-param-changed)."""
    stages = summary["stages"]
    out = []
    for k, s in _train(summary):
        prev = stages[k - 1] if k else None
        nxt = stages[k + 1] if k + 1 < len(stages) else None
        start = _merged_at_start(s)
        before_start = _merged_at_end(s) if start is None else start  # a run that recorded no start state
        gone_in = _unloaded(nxt) | {m for m, e in (s.get("lora") or {}).items() if e.get("removed")}
        merged_in = _merged_by_end(s, nxt) - (start or set())
        inside = [p["name"] for p in summary["params"] if p["name"] in base and p["stages"][k]["changed"] is True
                  and not p["stages"][k]["in_optimizer"]]
        inside += [n for w in s.get("outside_writes") or [] for n in w.get("params") or [] if n in base]
        inside = [n for n in dict.fromkeys(inside) if _module(n) in merged_in | gone_in]
        if inside:
            out.append((k, "in", inside, any(_module(n) in gone_in for n in inside)))
        gone = _unloaded(s)
        merged = (before_start - (_merged_by_end(prev, s) if prev is not None else set())) | gone
        between = [n for n in s.get("changed_since_previous_end") or [] if n in base and _module(n) in merged]
        if between:
            out.append((k, "before", between, any(_module(n) in gone for n in between)))
    return out


def adapter_merged(summary, view) -> list[dict]:
    base = lora_base_weights(summary)
    if not base:
        return []
    stages = summary["stages"]
    out = []
    for k, where, names, unloaded in _merge_evidence(summary, base):
        s = stages[k]
        later = [t for j, t in _train(summary) if j > k and t["steps"]]
        if where == "before":
            when = f"between the end of the previous stage and the start of stage {s['name']!r}"
            went_on = s["steps"] > 0
        else:
            when = f"during stage {s['name']!r}, outside its optimizer steps (no optimizer that stepped holds them)"
            went_on = bool(later)
        how = ("merge_and_unload() (the run shows the adapter layers removed too)" if unloaded
               else "merge_adapter() (the LoRA layers say they are merged)")
        then = ("Training went on afterwards, on weights that already hold the adapter's update: an adapter "
                "still active adds it a second time, and a new adapter added on top starts from the merged "
                "weights. Fix: merge only to export, after the last training stage (unmerge_adapter() undoes "
                "merge_adapter()); to continue training, keep the adapter unmerged."
                if went_on else
                "Intended when exporting the merged model after training; a bug if training goes on and a new "
                "adapter is added on top. Fix, if it was not meant: do not merge before training ends "
                "(unmerge_adapter() undoes merge_adapter()).")
        out.append(_finding(
            "adapter-merged", "error" if went_on else "warning",
            f"The base weights of {len(names)} LoRA-wrapped module(s) ({_names(names)}) changed {when}: the "
            f"adapter was merged into them ({how} adds scale·B·A to W). {then}",
            s["index"], names))
    return out


def merge_hint(summary, names: list[str]) -> str:
    """For frozen-param-changed: " (see adapter-merged)" when every tensor named is a LoRA base
    weight that adapter-merged names."""
    if not any(".base_layer." in n for n in names):
        return ""
    base = lora_base_weights(summary)
    merged = {n for *_, hit, _ in _merge_evidence(summary, base) for n in hit} if base else set()
    return " These are base weights of LoRA-wrapped modules (see adapter-merged)." if merged and set(names) <= merged else ""


def optimizer_hint(summary, names: list[str]) -> str:
    """For trainable-not-in-optimizer: the PEFT form of the fix when adapter tensors are among them."""
    adapters = {p["name"] for p in summary["params"] if p.get("adapter")}
    if not adapters & set(names):
        return ""
    return (" For a PEFT model, build the optimizer after get_peft_model() from the parameters that require grad: "
            "one built before holds none of the adapter tensors.")


CHECKS = [lora_b_still_zero, checkpointing_no_grad, base_changed, adapter_merged]
