"""The LoRA findings, each triggered for real on a PEFT model (docs/peft.md), and absent when the
run does the right thing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import freezeframe
from peft_helpers import gpt2_cls, gpt2_lm, lora_layers, run_loop, vit_cls

ROOT = Path(__file__).resolve().parents[1]
B_NAMES = [f"base_model.model.transformer.h.{i}.attn.c_attn.lora_B.default.weight" for i in range(2)]
BASE_W = [f"base_model.model.transformer.h.{i}.attn.c_attn.base_layer.weight" for i in range(2)]


def _codes(s: dict) -> dict:
    out = {}
    for f in s["findings"]:
        out.setdefault(f["code"], []).append(f)
    return out


def _head_only(model):
    for n, p in model.named_parameters():  # "freeze everything but the head", after get_peft_model
        p.requires_grad_("score.modules_to_save" in n)


@pytest.mark.parametrize("cause", ["frozen", "lr 0", "not in an optimizer"])
def test_lora_b_still_zero_names_the_cause(run_dir, cause):
    model = gpt2_cls()
    head = [p for n, p in model.named_parameters() if "score.modules_to_save" in n]
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    if cause == "frozen":
        _head_only(model)
        opt = torch.optim.AdamW(head, lr=1e-3)
    elif cause == "lr 0":
        opt = torch.optim.AdamW([{"params": head}, {"params": lora, "lr": 0.0}], lr=1e-3)
    else:
        opt = torch.optim.AdamW(head, lr=1e-3)
    snaps, _ = run_loop(model, run_dir, opt=opt)
    assert all(not snaps[-1][n].any() for n in B_NAMES)  # the oracle: B is still exactly zero
    s = freezeframe.load(run_dir).summary()
    (f,) = _codes(s)["lora-b-still-zero"]
    assert (f["severity"], f["stage"], sorted(f["params"])) == ("error", 1, B_NAMES)
    assert {"frozen": "lora_B was frozen", "lr 0": "had lr 0 at every step",
            "not in an optimizer": "no optimizer that stepped holds lora_B"}[cause] in f["message"]
    if cause == "not in an optimizer":
        assert "get_peft_model()" in _codes(s)["trainable-not-in-optimizer"][0]["message"]


def test_no_lora_finding_on_a_clean_lora_run(run_dir):
    run_loop(gpt2_cls(), run_dir)
    s = freezeframe.load(run_dir).summary()
    assert [e["b_zero"] for e in s["stages"][1]["lora"].values()] == [False, False]  # the facts the checks read
    assert not {"lora-b-still-zero", "base-changed", "adapter-merged", "checkpointing-no-grad"} & set(_codes(s))


def test_base_changed_when_a_base_layer_is_left_trainable(run_dir):
    model = gpt2_lm()
    for n, p in model.named_parameters():
        if ".ln_f." in n:
            p.requires_grad_(True)
    snaps, _ = run_loop(model, run_dir)
    names = ["base_model.model.transformer.ln_f.weight", "base_model.model.transformer.ln_f.bias"]
    assert all(not torch.equal(snaps[1][n], snaps[2][n]) for n in names)
    s = freezeframe.load(run_dir).summary()
    found = _codes(s)["base-changed"]
    assert [(f["severity"], f["stage"], f["params"]) for f in found] == [("warning", 0, names), ("warning", 1, names)]
    assert "modules_to_save" in found[0]["message"]
    assert "frozen-param-changed" not in _codes(s) and "adapter-merged" not in _codes(s)


def test_checkpointing_no_grad_reentrant_without_input_grads(run_dir):
    model = vit_cls()  # main input pixel_values: transformers does not enable input grads for it
    with pytest.warns(FutureWarning):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    snaps, _ = run_loop(model, run_dir)
    lora = [n for n, _ in model.named_parameters() if ".lora_" in n]
    assert len(lora) == 8 and all(torch.equal(snaps[0][n], snaps[2][n]) for n in lora)  # they never moved
    head = "base_model.model.classifier.modules_to_save.default.weight"
    assert not torch.equal(snaps[0][head], snaps[2][head])  # ... while the head trained
    s = freezeframe.load(run_dir).summary()
    found = _codes(s)["checkpointing-no-grad"]
    assert [(f["severity"], f["stage"], sorted(f["params"])) for f in found] == [("error", 0, sorted(lora)),
                                                                               ("error", 1, sorted(lora))]
    assert "enable_input_require_grads()" in found[0]["message"] and '"use_reentrant": False' in found[0]["message"]
    assert "no gradient reached lora_B" in _codes(s)["lora-b-still-zero"][0]["message"]


@pytest.mark.parametrize("fix", ["enable_input_require_grads", "use_reentrant=False"])
def test_checkpointing_no_grad_goes_away_with_the_fix(run_dir, fix):
    model = vit_cls()
    with pytest.warns(FutureWarning):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": fix != "use_reentrant=False"})
    if fix == "enable_input_require_grads":
        model.enable_input_require_grads()
    snaps, _ = run_loop(model, run_dir)
    s = freezeframe.load(run_dir).summary()
    assert all(p["stages"][0]["grad_steps"] == 3 for p in s["params"] if p["adapter"])
    assert "checkpointing-no-grad" not in _codes(s) and "lora-b-still-zero" not in _codes(s)


def test_text_model_checkpointing_gets_input_grads_from_transformers(run_dir):
    model = gpt2_cls()  # transformers' gradient_checkpointing_enable enables input grads for input_ids
    with pytest.warns(FutureWarning):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    run_loop(model, run_dir)
    s = freezeframe.load(run_dir).summary()
    assert all(p["stages"][0]["grad_steps"] == 3 for p in s["params"] if p["adapter"])
    assert "checkpointing-no-grad" not in _codes(s)


@pytest.mark.parametrize("how", ["merge_adapter between stages", "merge_and_unload between stages",
                                 "merge_adapter before close"])
def test_adapter_merged(run_dir, how):
    model = gpt2_cls()  # the head (modules_to_save) keeps the loss differentiable after a merge
    between = inside = None
    if how.startswith("merge_adapter between"):
        def between(m, k):
            if k == 0:
                m.merge_adapter()
    elif how.startswith("merge_and_unload"):
        def between(m, k):
            if k == 0:
                m.merge_and_unload()
    else:
        def inside(m, k):
            if k == 1:
                m.merge_adapter()
    snaps, _ = run_loop(model, run_dir, between=between, inside=inside)
    s = freezeframe.load(run_dir).summary()
    (f,) = _codes(s)["adapter-merged"]
    assert sorted(f["params"]) == BASE_W
    if how == "merge_adapter before close":
        assert not any(torch.equal(snaps[1][n], snaps[2][n]) for n in BASE_W)
        assert (f["severity"], f["stage"]) == ("warning", 1) and "Intended when exporting" in f["message"]
        assert "adapter-merged" in _codes(s)["frozen-param-changed"][0]["message"]
    else:
        assert (f["severity"], f["stage"]) == ("error", 1) and "Training went on" in f["message"]
        assert ("merge_and_unload() (the run shows" in f["message"]) is how.startswith("merge_and_unload")


def test_every_peft_finding_code_is_documented_with_its_severity():
    from freezeframe.analyse import findings, findings_peft

    assert set(findings_peft.CHECKS) <= set(findings.CHECKS)
    src = (ROOT / "src/freezeframe/analyse/findings_peft.py").read_text()
    found = set(re.findall(r'_finding\(\s*"([a-z-]+)",\s*(?:"(error|warning|info)"|"error" if)', src))
    found = {(c, sev or "error") for c, sev in found} | {("adapter-merged", "warning")}
    assert {c for c, _ in found} == {"lora-b-still-zero", "checkpointing-no-grad", "base-changed", "adapter-merged"}
    doc = (ROOT / "docs/summary-format.md").read_text()
    table = doc[doc.index("## `findings[]`"):doc.index("## `answers[]`")]
    readme = (ROOT / "README.md").read_text()
    readme = readme[readme.index("## What the findings catch"):]
    peft_doc = (ROOT / "docs/peft.md").read_text()
    for code, severity in sorted(found):
        assert re.search(rf"^\| `{code}` \| {severity} \| [^|]+ \| [^|]+ \|$", table, re.M), code
        assert re.search(rf"^\| `{code}` \| {severity} \| ", readme, re.M), code
        assert f"`{code}`" in peft_doc, code
    assert "(peft.md)" in doc


# ----------------------------------------------------------------------- a merge, or a plain write
C_ATTN0 = "base_model.model.transformer.h.0.attn.c_attn"


def _write_c_attn0(m):
    lora_layers(m)[C_ATTN0].base_layer.weight.data.add_(0.01)  # no merge: a plain write through .data


@pytest.mark.parametrize("when", ["between stages", "after the last step"])
def test_a_plain_write_to_a_base_weight_is_not_called_a_merge(run_dir, when):
    model = gpt2_cls()
    between = (lambda m, k: k == 0 and _write_c_attn0(m)) if when == "between stages" else None
    inside = (lambda m, k: k == 1 and _write_c_attn0(m)) if when != "between stages" else None
    snaps, _ = run_loop(model, run_dir, between=between, inside=inside)
    assert not any(layer.merged for layer in lora_layers(model).values())  # the oracle: PEFT's own flag
    s = freezeframe.load(run_dir).summary()
    found = _codes(s)
    assert "adapter-merged" not in found
    assert all(e["merged"] is False for st in s["stages"] for e in st["lora"].values())
    assert [st["meta"]["lora_merged"] for st in s["stages"]] == [[], []]
    if when == "between stages":
        w0, w1 = snaps[1][BASE_W[0]], snaps[2][BASE_W[0]]  # frozen: stage two left the written value
        assert not torch.equal(w0, w1) and torch.allclose(w1, w0 + 0.01)
        (f,) = found["stage-discontinuity"]
        assert f["stage"] == 1 and BASE_W[0] in f["message"]
    else:
        assert not torch.equal(snaps[1][BASE_W[0]], snaps[2][BASE_W[0]])
        (f,) = found["frozen-param-changed"]
        assert f["params"] == [BASE_W[0]] and "outside the steps" in f["message"]
        assert "adapter-merged" not in f["message"]


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_a_merge_is_recorded_as_the_layers_say(run_dir, how):
    model = gpt2_cls()
    layers = lora_layers(model)
    merged_at = {}

    def between(m, k):
        if k == 0:
            getattr(m, how)()
            merged_at.update({n: layer.merged for n, layer in layers.items()})  # the oracle: PEFT's own flag

    run_loop(model, run_dir, between=between)
    s = freezeframe.load(run_dir).summary()
    assert s["stages"][0]["meta"]["lora_merged"] == [] and all(not e["merged"] for e in s["stages"][0]["lora"].values())
    if how == "merge_adapter":
        assert all(merged_at.values()) and s["stages"][1]["meta"]["lora_merged"] == sorted(layers)
        assert {n: e["merged"] for n, e in s["stages"][1]["lora"].items()} == merged_at
    else:  # the layers are gone before stage two starts: its model_changes says so
        assert s["stages"][1]["meta"]["lora_merged"] == [] and not lora_layers(model) and s["stages"][1]["lora"] is None
        assert {n.rpartition(".lora_")[0] for n in s["stages"][1]["model_changes"]["removed"] if ".lora_" in n} == set(layers)
    (f,) = _codes(s)["adapter-merged"]
    assert (f["severity"], f["stage"], sorted(f["params"])) == ("error", 1, BASE_W)


def test_merge_and_unload_after_the_last_step_is_a_merge(run_dir):
    model = gpt2_cls()
    snaps, _ = run_loop(model, run_dir, inside=lambda m, k: k == 1 and m.merge_and_unload())
    assert not lora_layers(model)  # unloaded: the base weights now sit where the LoRA layers were
    assert not any(torch.equal(snaps[1][n], snaps[2][n.replace(".base_layer", "")]) for n in BASE_W)
    s = freezeframe.load(run_dir).summary()
    assert sorted(n for n, e in s["stages"][1]["lora"].items() if e["removed"]) == sorted(
        n.partition(".base_layer.")[0] for n in BASE_W)
    (f,) = _codes(s)["adapter-merged"]
    assert (f["severity"], f["stage"], sorted(f["params"])) == ("warning", 1, BASE_W)
    assert "merge_and_unload() (the run shows" in f["message"]


# ----------------------------------------------------------------------- an embedding's zero factor A
@pytest.mark.parametrize("cause", ["frozen", "lr 0"])
def test_lora_b_still_zero_names_an_embeddings_zero_factor_a(run_dir, cause):
    model = gpt2_cls(target_modules=["wte"], fan_in_fan_out=False)
    a, b = "base_model.model.transformer.wte.lora_embedding_A.default", "base_model.model.transformer.wte.lora_embedding_B.default"
    params = dict(model.named_parameters())
    head = [p for n, p in params.items() if "score.modules_to_save" in n]
    if cause == "frozen":
        _head_only(model)
        opt = torch.optim.AdamW(head, lr=1e-3)
    else:
        opt = torch.optim.AdamW([{"params": head}, {"params": [params[a], params[b]], "lr": 0.0}], lr=1e-3)
    snaps, _ = run_loop(model, run_dir, opt=opt)
    assert not snaps[-1][a].any() and snaps[-1][b].any()  # the oracle: PEFT zero-initialises A, not B, here
    s = freezeframe.load(run_dir).summary()
    (f,) = _codes(s)["lora-b-still-zero"]
    assert s["stages"][1]["lora"]["base_model.model.transformer.wte"] == {
        "adapter": "default", "delta_rel": 0.0, "b_zero": False, "a_zero": True, "merged": False, "removed": False}
    assert (f["severity"], f["stage"], f["params"]) == ("error", 1, [a])
    assert "lora_embedding_A of 1 LoRA module(s) is exactly zero (base_model.model.transformer.wte)" in f["message"]
    assert {"frozen": "lora_embedding_A was frozen", "lr 0": "lora_embedding_A's group"}[cause] in f["message"]
    assert "lora_B of" not in f["message"] and "lora_embedding_B" not in f["message"]


# ----------------------------------------------------------------------- LoraConfig(bias=...)
@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_base_changed_leaves_out_the_biases_lora_config_trains(run_dir, bias):
    model = gpt2_lm(bias=bias)
    biases = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
    snaps, _ = run_loop(model, run_dir)
    if bias == "lora_only":  # PEFT's own rule: the biases of the LoRA-wrapped modules
        assert biases == [n.replace(".weight", ".bias") for n in BASE_W]
    else:
        assert len(biases) > 2 and "base_model.model.transformer.ln_f.bias" in biases
    assert all(not torch.equal(snaps[0][n], snaps[2][n]) for n in biases)  # they trained
    s = freezeframe.load(run_dir).summary()
    assert "base-changed" not in _codes(s)
    assert s["run"]["peft"]["bias"] == bias


def test_base_changed_still_fires_for_a_bias_left_trainable_with_bias_none(run_dir):
    model = gpt2_lm(bias="none")
    name = "base_model.model.transformer.ln_f.bias"
    dict(model.named_parameters())[name].requires_grad_(True)
    snaps, _ = run_loop(model, run_dir)
    assert not torch.equal(snaps[0][name], snaps[2][name])
    s = freezeframe.load(run_dir).summary()
    assert [(f["stage"], f["params"]) for f in _codes(s)["base-changed"]] == [(0, [name]), (1, [name])]
    assert s["run"]["peft"]["bias"] == "none"


def test_bias_lora_only_still_warns_for_other_base_tensors(run_dir):
    model = gpt2_lm(bias="lora_only")
    name = "base_model.model.transformer.ln_f.weight"
    dict(model.named_parameters())[name].requires_grad_(True)
    run_loop(model, run_dir)
    s = freezeframe.load(run_dir).summary()
    assert [f["params"] for f in _codes(s)["base-changed"]] == [[name], [name]]
