"""The manifest's schema, declared once, and the one check every reader runs on load
(docs/run-format.md, "Reading a run").

The schema below is data: each field names its type, whether it may be null or absent, and, for
indices, which table of the model map it points into. `check_manifest` walks a parsed manifest
against it and raises a `RunError` of one line naming the first field at fault, so nothing
downstream meets an IndexError, a TypeError or a RecursionError. Fields not declared here are
kept and ignored (a newer freezeframe may add some); declared ones are strict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RunError

MAX_DEPTH = 64  # manifests nest about 6 deep; anything deeper is damage, refused before walking


class Invalid(Exception):
    def __init__(self, path: str, expected: str, got):
        super().__init__(path)
        self.path, self.expected, self.got = path, expected, got


class Count(int):
    """A length, shown as "N entries" rather than as a value."""


def _show(value) -> str:
    if isinstance(value, Count):
        return f"{int(value)} entries"
    text = ascii(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------ field types
@dataclass
class Spec:
    nullable: bool = field(default=False, kw_only=True)

    def check(self, value, path: str, ctx: dict) -> None:
        if value is None:
            if not self.nullable:
                raise Invalid(path, self.describe(), value)
            return
        self.check_value(value, path, ctx)

    def describe(self) -> str:
        raise NotImplementedError

    def check_value(self, value, path: str, ctx: dict) -> None:
        raise NotImplementedError


@dataclass
class Any_(Spec):
    nullable: bool = field(default=True, kw_only=True)

    def describe(self) -> str:
        return "any value"

    def check_value(self, value, path, ctx):
        pass


@dataclass
class Bool(Spec):
    def describe(self):
        return "true or false"

    def check_value(self, value, path, ctx):
        if not isinstance(value, bool):
            raise Invalid(path, self.describe(), value)


@dataclass
class Str(Spec):
    choices: tuple = ()

    def describe(self):
        return ("one of " + ", ".join(map(repr, self.choices))) if self.choices else "a string"

    def check_value(self, value, path, ctx):
        if not isinstance(value, str) or (self.choices and value not in self.choices):
            raise Invalid(path, self.describe(), value)


@dataclass
class Num(Spec):
    def describe(self):
        return "a number"

    def check_value(self, value, path, ctx):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(path, self.describe(), value)


@dataclass
class Int(Spec):
    min: int | None = None
    index: str | None = None  # "params" or "tensors": an index into the model map

    def describe(self):
        if self.index:
            return f"an index of the model map's {self.index}"
        return "an integer" if self.min is None else f"an integer >= {self.min}"

    def check_value(self, value, path, ctx):
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(path, self.describe(), value)
        if self.min is not None and value < self.min:
            raise Invalid(path, self.describe(), value)
        if self.index and not 0 <= value < ctx[self.index]:
            raise Invalid(path, f"an index of the model map's {self.index} (0 to {ctx[self.index] - 1})", value)


@dataclass
class List(Spec):
    item: Spec = field(default_factory=Any_)
    min_len: int = 0
    max_len: str | None = None   # "params" or "tensors": at most one entry per tensor of the map
    same_len: str | None = None  # exactly one entry per tensor of the map

    def describe(self):
        return "a list"

    def check_value(self, value, path, ctx):
        if not isinstance(value, list):
            raise Invalid(path, self.describe(), value)
        if len(value) < self.min_len:
            raise Invalid(path, f"a list of at least {self.min_len} {'entry' if self.min_len == 1 else 'entries'}", Count(len(value)))
        for key, exact in ((self.max_len, False), (self.same_len, True)):
            if key and (len(value) != ctx[key] if exact else len(value) > ctx[key]):
                raise Invalid(path, f"{'exactly' if exact else 'at most'} one entry per {key[:-1]} "
                                    f"({ctx[key]})", Count(len(value)))
        for i, v in enumerate(value):
            self.item.check(v, f"{path}[{i}]", ctx)


@dataclass
class Obj(Spec):
    fields: dict = field(default_factory=dict)   # name -> Spec; a name ending in "!" is required
    values: Spec | None = None                   # for mappings of free keys (e.g. meta)

    def describe(self):
        return "an object"

    def check_value(self, value, path, ctx):
        if not isinstance(value, dict):
            raise Invalid(path, self.describe(), value)
        for name, spec in self.fields.items():
            key = name.rstrip("!")
            sub = f"{path}.{key}" if path else key
            if key not in value:
                if name.endswith("!"):
                    raise Invalid(sub, f"present ({spec.describe()})", "nothing")
                continue
            spec.check(value[key], sub, ctx)
        if self.values is not None:
            for key, v in value.items():
                self.values.check(v, f"{path}.{key}", ctx)


def _nullable(spec: Spec) -> Spec:
    spec.nullable = True
    return spec


# ------------------------------------------------------------------------------ the manifest
NAMES = List(Str())
PER_TENSOR_NUM = _nullable(List(_nullable(Num()), max_len="tensors"))
PER_TENSOR_HASH = _nullable(List(_nullable(Str()), max_len="tensors"))
PER_TENSOR_STR = _nullable(List(_nullable(Str()), max_len="tensors"))

PARAM = Obj({"name!": Str(), "aliases!": NAMES, "module!": Str(), "module_type!": Str(),
             "shape!": List(Int(min=0)), "numel!": Int(min=0), "dtype": Str(), "is_norm!": Bool(),
             "adapter": _nullable(Str())})  # PEFT adapter tensors only (docs/peft.md)
BUFFER = Obj({"name!": Str(), "module!": Str(), "module_type": Str(), "shape": List(Int(min=0)),
              "numel": Int(min=0), "dtype": Str()})
MODULE = Obj({"name!": Str(), "type!": Str(), "is_norm": Bool()})
SESSION = Obj({"index!": Int(min=0), "every": _nullable(Int(min=1)), "pid": _nullable(Int()),
               "host": _nullable(Str()), "started": _nullable(Num()), "ended": _nullable(Num()),
               "first_step": _nullable(Int(min=0)), "versions": _nullable(Obj())})
GROUP = Obj({"index!": Int(min=0), "optimizer!": Int(min=0), "name!": Str(),
             "params!": List(Int(index="params"))})
OUTSIDE_WRITE = Obj({"when": Str(choices=("after_last_step", "between_steps")),
                     "detected": Str(choices=("stage_end", "close", "next_stage")),
                     "step": _nullable(Int()), "params": NAMES, "buffers": NAMES})
STAGE = Obj({
    "index!": Int(min=0), "name!": Str(), "kind": Str(choices=("train", "trial")),
    "explicit": Bool(), "session": _nullable(Int(min=0)),
    "first_step": _nullable(Int()), "last_step": _nullable(Int()), "steps": Int(min=0),
    "skipped_steps": _nullable(Int(min=0)), "complete": Bool(),
    "epochs": _nullable(Int(min=0)), "epoch_starts": _nullable(List(Int())),
    "epochs_planned": _nullable(Int(min=0)), "first_epoch_continued": _nullable(Bool()),
    "optimizer_tokens": _nullable(List(_nullable(Str()))),
    # per entry of epoch_starts: {name: value} given by Recorder.log_epoch, or null (checked below)
    "epoch_metrics": _nullable(List(_nullable(Obj(values=_nullable(Num()))))),
    "forward_passes": _nullable(Obj({"train": _nullable(Int(min=0)), "eval": _nullable(Int(min=0))})),
    "trainable": _nullable(List(Int(index="params"))),
    "groups": _nullable(List(GROUP)),
    "start_hashes": PER_TENSOR_HASH, "end_hashes": PER_TENSOR_HASH,
    "end_kind": _nullable(Str()),
    "end_metrics": _nullable(Obj({"param_norm": PER_TENSOR_NUM, "drift": PER_TENSOR_NUM})),
    "compared_with": _nullable(Int(min=0)),
    "changed_since_previous_end": _nullable(NAMES),
    "starts_from_previous_end": _nullable(Bool()),
    "continuity": _nullable(Str(choices=("bitwise", "written"))),
    "meta": _nullable(Obj()),
    "optimizer_state_start": _nullable(List(_nullable(Int(min=0)))),
    "optimizer_state_end": _nullable(List(_nullable(Int(min=0)))),
    "lr_nominal": _nullable(List(_nullable(Num()))),
    "lr_nominal_floor": _nullable(List(_nullable(Num()))),
    "grad_steps": _nullable(List(Int(min=0), max_len="params")),
    "outside_writes": _nullable(List(OUTSIDE_WRITE)),
    "model_changes": _nullable(Obj({"replaced": NAMES, "added": NAMES, "removed": NAMES})),
    "shared_between_optimizers": _nullable(NAMES),
    # per LoRA-wrapped module at the stage's end (docs/peft.md)
    "lora": _nullable(Obj(values=Obj({"adapter": _nullable(Str()), "delta_rel": _nullable(Num()),
                                      "b_zero": _nullable(Bool()), "a_zero": _nullable(Bool()),
                                      "merged": _nullable(Bool()), "removed": _nullable(Bool())}))),
})
PEFT = Obj({"type": _nullable(Str()), "r": _nullable(Num()), "lora_alpha": _nullable(Num()),
            "use_rslora": _nullable(Bool()), "use_dora": _nullable(Bool()), "bias": _nullable(Str()),
            "adapters": NAMES, "active": _nullable(NAMES)})
MODEL = Obj({"params!": List(PARAM, min_len=1), "buffers!": List(BUFFER), "modules!": List(MODULE),
             "buffers_at": Int(min=1),  # P0, at most the number of parameters (checked below)
             "peft": _nullable(PEFT),
             "forward_order": _nullable(List(Str()))})  # module names (checked below)
MANIFEST = Obj({  # the model map first: every index and per-tensor list is checked against it
    "schema!": Str(), "schema_version!": Int(min=1), "model!": MODEL, "framework": _nullable(Str()),
    "created": _nullable(Num()), "complete": Bool(), "steps_total": _nullable(Int(min=0)),
    "reference": Bool(), "ref_norms": _nullable(List(_nullable(Num()), same_len="tensors")),
    "reference_hashes": PER_TENSOR_HASH,
    # per tensor: the step at which its W_ref was taken (null: none kept), why one was refused
    "reference_taken": _nullable(List(_nullable(Int(min=0)), max_len="tensors")),
    "reference_refused": PER_TENSOR_STR,
    "sessions": List(SESSION), "stages": List(STAGE), "error": _nullable(Str()),
})


# ------------------------------------------------------------------------------ the check
def depth_exceeds(doc, limit: int = MAX_DEPTH) -> bool:
    """Whether `doc` nests deeper than `limit` (iterative: no recursion on hostile input)."""
    stack = [(doc, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return True
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


def check_manifest(where: str, manifest: dict) -> None:
    """Raise RunError (one line, naming the field) unless `manifest` matches MANIFEST, with every
    index in range of its model map."""
    if depth_exceeds(manifest):
        raise RunError(f"{where} is damaged: it nests deeper than {MAX_DEPTH} levels")
    model = manifest.get("model")
    ctx = {"params": 0, "tensors": 0}
    if isinstance(model, dict) and isinstance(model.get("params"), list) and isinstance(model.get("buffers"), list):
        ctx = {"params": len(model["params"]), "tensors": len(model["params"]) + len(model["buffers"])}
    try:
        MANIFEST.check(manifest, "", ctx)
        at = manifest["model"].get("buffers_at", ctx["params"])
        if at > ctx["params"]:
            raise Invalid("model.buffers_at", f"an integer from 1 to {ctx['params']} (the number of parameters)", at)
        names = {m["name"] for m in manifest["model"]["modules"]}
        for i, name in enumerate(manifest["model"].get("forward_order") or []):
            if name not in names:
                raise Invalid(f"model.forward_order[{i}]", "the name of a module of the model map", name)
        seen = set()
        for i, s in enumerate(manifest.get("stages") or []):
            if s["index"] in seen:
                raise Invalid(f"stages[{i}].index", "an index no other stage has", s["index"])
            seen.add(s["index"])
            em, starts = s.get("epoch_metrics"), s.get("epoch_starts")
            if em is not None and len(em) != len(starts or []):
                raise Invalid(f"stages[{i}].epoch_metrics", f"a list of one entry per epoch_starts entry "
                                                            f"({len(starts or [])})", Count(len(em)))
    except Invalid as e:
        raise RunError(f"{where} is damaged: {e.path} must be {e.expected}, got {_show(e.got)}") from None
