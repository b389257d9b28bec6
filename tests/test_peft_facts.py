"""PEFT facts in the record and the summary, against the model's own state dicts and ΔW
recomputed by hand (docs/peft.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import freezeframe
from peft_helpers import gpt2_cls, gpt2_lm, lora_layers, oracle_delta_rel, run_loop, vit_cls


@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_every_tensor_and_every_lora_module_against_the_state_dicts(run_dir, variant):
    model = gpt2_lm(use_rslora=variant == "rslora")
    names = [n for n, _ in model.named_parameters()]
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    snaps, _ = run_loop(model, run_dir)
    s = freezeframe.load(run_dir).summary()
    assert s["run"]["peft"] == {"type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"],
                                "modules_to_save": None, "use_rslora": variant == "rslora", "use_dora": False,
                                "bias": "none", "adapters": ["default"], "active": ["default"]}
    assert [p["name"] for p in s["params"]] == names
    for p in s["params"]:
        assert p["adapter"] == ("default" if ".lora_A.default." in p["name"] or ".lora_B.default." in p["name"]
                                else None), p["name"]
        for k, e in enumerate(p["stages"]):
            assert e["trainable"] is requires[p["name"]]
            assert e["changed"] is not torch.equal(snaps[k][p["name"]], snaps[k + 1][p["name"]]), p["name"]
            assert e["same_as_start"] is torch.equal(snaps[0][p["name"]], snaps[k + 1][p["name"]]), p["name"]
    base = [p for p in s["params"] if p["adapter"] is None]
    assert len(base) == 28 and all(e["same_as_start"] for p in base for e in p["stages"])
    assert all(p["stages"][1]["changed"] for p in s["params"] if p["adapter"])
    wrapped = sorted(lora_layers(model))
    assert wrapped == ["base_model.model.transformer.h.0.attn.c_attn", "base_model.model.transformer.h.1.attn.c_attn"]
    rows = {m["name"]: m for m in s["modules"]}
    for name in wrapped:
        assert rows[f"{name}.lora_A.default"]["adapter"] == "default"
        assert rows[f"{name}.base_layer"]["adapter"] is None
        for k in range(2):
            want = oracle_delta_rel(snaps[k + 1], name, rslora=variant == "rslora")
            assert want > 0
            assert rows[f"{name}.base_layer"]["stages"][k]["lora_delta_rel"] == pytest.approx(want, rel=1e-4)
            assert rows[f"{name}.lora_A.default"]["stages"][k]["lora_delta_rel"] is None
            assert s["stages"][k]["lora"][name] == {"adapter": "default", "b_zero": False, "a_zero": False,
                                                    "merged": False, "removed": False,
                                                    "delta_rel": pytest.approx(want, rel=1e-4)}
    assert all(m["stages"][0]["lora_delta_rel"] is None for m in s["modules"] if not m["name"].endswith("base_layer"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [p.get("adapter") for p in manifest["model"]["params"]] == [p["adapter"] for p in s["params"]]
    assert manifest["model"]["peft"] == s["run"]["peft"]
    for st in manifest["stages"]:  # no checkpointing enabled: the model says so
        assert st["meta"]["gradient_checkpointing"] == {"enabled": False, "use_reentrant": None,
                                                        "inputs_require_grad": False}


def test_dora_answers_call_delta_rel_the_low_rank_update(run_dir, tmp_path):
    from freezeframe.render.html import write_html

    model = gpt2_lm(use_dora=True)
    snaps, _ = run_loop(model, run_dir)
    mags = [n for n, _ in model.named_parameters() if ".lora_magnitude_vector." in n]
    assert len(mags) == 2 and all(not torch.equal(snaps[0][n], snaps[2][n]) for n in mags)  # m trained too
    run = freezeframe.load(run_dir)
    s = run.summary()
    assert s["run"]["peft"]["use_dora"] is True
    rel = {m: oracle_delta_rel(snaps[2], m) for m in lora_layers(model)}  # scale·B·A only, as PEFT's get_delta_weight
    top = max(rel, key=rel.get)
    for m, want in rel.items():
        assert s["stages"][1]["lora"][m]["delta_rel"] == pytest.approx(want, rel=1e-4)
    answer = s["answers"][1]["answer"]
    assert (f"the low-rank update scale·B·A is largest in {top}, {100 * rel[top]:.3g} % of W (‖scale·B·A‖/‖W‖ at "
            "the end of stage 1 (two); with DoRA the magnitude vector also scales the weight") in answer
    assert "effective update" not in answer
    page = write_html(run, tmp_path / "report.html").read_text()
    table = page[page.index("<h3>Adapters</h3>"):]
    assert "low-rank update" in table[:table.index("<table")] and "effective update" not in table[:table.index("<table")]


def test_modules_to_save_copies_belong_to_the_adapter(run_dir):
    model = gpt2_cls()
    run_loop(model, run_dir)
    s = freezeframe.load(run_dir).summary()
    adapter = {p["name"]: p["adapter"] for p in s["params"]}
    assert adapter["base_model.model.score.modules_to_save.default.weight"] == "default"
    assert adapter["base_model.model.score.original_module.weight"] is None
    assert s["run"]["peft"]["modules_to_save"] == ["classifier", "score"]
    assert s["stages"][0]["lora"]["base_model.model.transformer.h.0.attn.c_attn"]["b_zero"] is False


def test_b_zero_counts_elements_and_a_failed_delta_is_null(run_dir, caplog):
    model = gpt2_lm()
    for n, p in model.named_parameters():
        if "h.1.attn.c_attn.lora_B" in n:
            p.requires_grad_(False)  # stays exactly zero
    broken = lora_layers(model)["base_model.model.transformer.h.0.attn.c_attn"]
    broken.get_delta_weight = lambda adapter: 1 / 0
    with caplog.at_level("INFO", logger="freezeframe"):
        run_loop(model, run_dir)
    s = freezeframe.load(run_dir).summary()
    lora = s["stages"][1]["lora"]
    assert lora["base_model.model.transformer.h.0.attn.c_attn"] == {"adapter": "default", "delta_rel": None,
                                                                    "b_zero": False, "a_zero": False,
                                                                    "merged": False, "removed": False}
    assert lora["base_model.model.transformer.h.1.attn.c_attn"] == {"adapter": "default", "delta_rel": 0.0,
                                                                    "b_zero": True, "a_zero": False,
                                                                    "merged": False, "removed": False}
    assert "ZeroDivisionError" in caplog.text
    assert s["run"]["complete"] and s["run"]["error"] is None and all(st["complete"] for st in s["stages"])


@pytest.mark.parametrize("case, want", [
    ("gpt2-reentrant", {"enabled": True, "use_reentrant": True, "inputs_require_grad": True}),
    ("gpt2-default", {"enabled": True, "use_reentrant": False, "inputs_require_grad": True}),
    ("vit-reentrant", {"enabled": True, "use_reentrant": True, "inputs_require_grad": False}),
    ("vit-fixed", {"enabled": True, "use_reentrant": True, "inputs_require_grad": True}),
])
def test_gradient_checkpointing_facts_as_the_model_holds_them(run_dir, case, want):
    model = vit_cls() if case.startswith("vit") else gpt2_cls()
    kwargs = None if case == "gpt2-default" else {"use_reentrant": True}
    with pytest.warns(FutureWarning):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if case == "vit-fixed":
        model.enable_input_require_grads()
    funcs = [m._gradient_checkpointing_func for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert funcs and all(f.keywords == {"use_reentrant": want["use_reentrant"]} for f in funcs)  # the model's own
    run_loop(model, run_dir, steps=1)
    s = freezeframe.load(run_dir).summary()
    assert [st["meta"]["gradient_checkpointing"] for st in s["stages"]] == [want, want]


def test_a_plain_model_has_no_peft_facts(run_dir):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir) as rec, rec.stage("one"):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    s = freezeframe.load(run_dir).summary()
    assert s["run"]["peft"] is None and s["stages"][0]["lora"] is None
    assert all(p["adapter"] is None for p in s["params"]) and all(m["adapter"] is None for m in s["modules"])
    assert "gradient_checkpointing" not in s["stages"][0]["meta"]
    assert all(e["lora_delta_rel"] is None for m in s["modules"] for e in m["stages"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["model"]["peft"] is None and all("adapter" not in p for p in manifest["model"]["params"])


def test_an_older_manifest_reads_with_defaults(run_dir):
    model = gpt2_lm()
    run_loop(model, run_dir, steps=1)
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["model"]["peft"]
    for p in manifest["model"]["params"]:
        p.pop("adapter", None)
    for st in manifest["stages"]:
        del st["lora"]
    path.write_text(json.dumps(manifest))
    s = freezeframe.load(run_dir).summary()
    assert s["run"]["peft"] is None and all(p["adapter"] is None for p in s["params"])
    assert all(st["lora"] is None for st in s["stages"])
    assert all(e["lora_delta_rel"] is None for m in s["modules"] for e in m["stages"])


def test_capture_imports_neither_peft_nor_transformers():
    code = ("import sys, freezeframe, freezeframe.capture.peft, freezeframe.capture.recorder; "
            "print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
