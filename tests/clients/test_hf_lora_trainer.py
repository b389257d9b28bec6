"""A LoRA fine-tune of GPT-2 with the Hugging Face `Trainer`, as PEFT's and Transformers' docs
write it (`get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"]))`, then
`Trainer(model, args, train_dataset).train()`), under the freezeframe callback, in two train()
calls: a first Trainer for 6 steps, then a new Trainer on the same model for 4 more with a
lower lr (as users continue a run). Every fact is checked against the test's own oracle: a
plain TrainerCallback that copies the model's tensors at each train() begin and end and the lr of
every group just before each optimizer.step().

Differences from the docs, forced by this machine: GPT-2 from a tiny config (no hub), token ids
as tensors (no tokenizer), CPU."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402
from transformers import Trainer  # noqa: E402

import freezeframe  # noqa: E402
import oracle  # noqa: E402
from freezeframe.transformers import FreezeFrame  # noqa: E402
from hf_helpers import Oracle, lora_gpt2, scalars_by_step, token_data, training_args  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CALLS = [dict(max_steps=6, learning_rate=1e-2, warmup_steps=2), dict(max_steps=4, learning_rate=3e-3)]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    model = lora_gpt2()
    data = token_data()
    truth = Oracle()
    for k, kw in enumerate(CALLS):
        # a new Trainer (and a new callback on the same run directory) for each call, as users do
        trainer = Trainer(model=model, args=training_args(tmp / f"out{k}", **kw), train_dataset=data,
                          callbacks=[FreezeFrame(tmp / "run", every=1), truth])
        trainer.train()
    return freezeframe.load(tmp / "run"), truth, model


def test_each_train_call_is_a_stage_with_the_trainers_facts(lora_run):
    run, truth, _ = lora_run
    s = run.summary()
    assert s["run"]["framework"] == "transformers" and s["run"]["complete"] is True
    assert [st["name"] for st in s["stages"]] == ["train(max_steps=6)", "train(max_steps=4)"]
    assert [st["steps"] for st in s["stages"]] == [c["steps"] for c in truth.calls] == [6, 4]
    assert [st["first_step"] for st in s["stages"]] == [0, 6]
    assert len(s["run"]["sessions"]) == 2
    for sess in s["run"]["sessions"]:
        v = sess["versions"]
        assert v["transformers"] and v["peft"]
    for st, kw in zip(s["stages"], CALLS):
        ta = st["meta"]["training_args"]
        assert st["meta"]["trainer"] == "Trainer" and st["meta"]["resumed_from"] is None
        assert ta["max_steps"] == kw["max_steps"] and ta["learning_rate"] == kw["learning_rate"]
        assert ta["lr_scheduler_type"] == "linear" and ta["gradient_accumulation_steps"] == 1
    # the second call continues where the first ended, bitwise
    assert s["stages"][1]["starts_from_previous_end"] is True and s["stages"][1]["changed_since_previous_end"] == []


def test_every_tensors_trainable_changed_and_same_as_start_facts_match_the_oracle(lora_run):
    run, truth, _ = lora_run
    s = run.summary()
    start = truth.calls[0]["begin"]
    names = [p["name"] for p in s["params"]]
    assert names == oracle.param_names(lora_run[2])
    for k, call in enumerate(truth.calls):
        moved = oracle.differing(call["begin"], call["end"])
        for p in s["params"]:
            e = p["stages"][k]
            n = p["name"]
            assert e["trainable"] is call["requires_grad"][n], n
            assert e["changed"] is (n in moved), n
            assert e["same_as_start"] is oracle.same_bytes(call["end"][n], start[n]), n
            assert e["grad_steps"] == (call["steps"] if call["requires_grad"][n] else 0), n
    # the LoRA picture: only adapter tensors train, every base tensor is bitwise unchanged
    lora = [n for n in names if ".lora_" in n]
    assert lora and all(truth.calls[0]["requires_grad"][n] for n in lora)
    assert not any(truth.calls[0]["requires_grad"][n] for n in names if n not in lora)
    assert all(oracle.same_bytes(truth.calls[-1]["end"][n], start[n]) for n in names if n not in lora)
    assert all(not oracle.same_bytes(truth.calls[-1]["end"][n], start[n]) for n in lora if ".lora_B." in n)


def test_lr_per_group_is_what_the_optimizer_applied_at_every_step(lora_run):
    run, truth, _ = lora_run
    s = run.summary()
    steps = run.steps()
    lr_col = steps.column("lr").to_pylist()
    applied = [lrs for call in truth.calls for lrs in call["lrs"]]
    assert len(lr_col) == len(applied)
    for got, want in zip(lr_col, applied):
        assert got == pytest.approx(want, rel=1e-12, abs=0)
    for call in truth.calls:
        # the oracle's lrs are the Trainer's own: its scheduler's and the lr it logs for the step
        assert call["lrs"] == call["scheduler_lrs"]
        assert [call["lrs"][k][0] for k in sorted(call["logged_lr"])] == pytest.approx(
            [call["logged_lr"][k] for k in sorted(call["logged_lr"])])
    for k, (st, call) in enumerate(zip(s["stages"], truth.calls)):
        for g in st["groups"]:
            per_step = [lrs[g["index"]] for lrs in call["lrs"]]
            assert g["lr_max"] == pytest.approx(max(per_step), rel=1e-12)
            assert g["lr_applied_max"] == pytest.approx(max(per_step), rel=1e-12)
            assert g["lr_first"] == pytest.approx(per_step[0], abs=0) and g["lr_last"] == pytest.approx(per_step[-1])
    assert s["stages"][0]["groups"][0]["lr_first"] == 0.0  # warmup starts at 0


def test_the_training_loss_is_recorded_at_each_step_it_was_logged(lora_run):
    run, truth, _ = lora_run
    loss = scalars_by_step(run)["loss"]
    want = {}
    first = 0
    for call in truth.calls:
        want.update({first + k: v for k, v in call["losses"].items()})
        first += call["steps"]
    assert set(loss) == set(want) and len(want) == 10
    for k in want:
        assert loss[k] == pytest.approx(want[k], rel=1e-6)


# ------------------------------------------------------------------ PEFT facts (docs/summary-format.md)
def test_run_peft_and_the_adapter_of_every_tensor(lora_run):
    run, _, model = lora_run
    s = run.summary()
    peft = s["run"]["peft"]
    assert peft is not None
    assert peft["type"] == "LORA" and peft["r"] == 4 and peft["lora_alpha"] == 8
    target = peft["target_modules"]
    assert (sorted(target) if isinstance(target, list) else [target]) == ["c_attn"]
    assert peft["modules_to_save"] is None and peft["use_rslora"] is False and peft["use_dora"] is False
    assert peft["adapters"] == ["default"] and peft["active"] == ["default"]
    for p in s["params"]:
        want = "default" if (".lora_A.default." in p["name"] or ".lora_B.default." in p["name"]) else None
        assert p["adapter"] == want, p["name"]


def _delta_rel_slowly(end: dict, module: str, scale: float, fan_in_fan_out: bool) -> float:
    """‖scale·B·A‖_F / ‖W_base‖_F in float64, from the oracle's copy of the tensors (PEFT's
    `get_delta_weight` for a plain LoRA layer: B @ A * scale, transposed for Conv1D's fan_in_fan_out)."""
    a = end[f"{module}.lora_A.default.weight"].double()
    b = end[f"{module}.lora_B.default.weight"].double()
    w = end[f"{module}.base_layer.weight"].double()
    delta = torch.zeros(w.shape[::-1] if fan_in_fan_out else w.shape, dtype=torch.float64)
    for i in range(b.shape[0]):              # the matrix product, one row at a time
        for r in range(a.shape[0]):
            delta[i] += scale * b[i, r] * a[r]
    if fan_in_fan_out:
        delta = delta.T
    return math.sqrt(float((delta ** 2).sum())) / math.sqrt(float((w ** 2).sum()))


def test_lora_delta_rel_per_module_and_stage_is_peft_s_effective_update(lora_run):
    run, truth, model = lora_run
    s = run.summary()
    wrapped = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert len(wrapped) == 2
    by_name = {m["name"]: m for m in s["modules"]}
    for name, layer in wrapped.items():
        scale = layer.scaling["default"]
        assert scale == 8 / 4
        # the wrapped module owns no tensor itself: its row is its base layer's (docs/summary-format.md)
        mod = by_name.get(name) or by_name[f"{name}.base_layer"]
        assert by_name[f"{name}.lora_A.default"]["adapter"] == by_name[f"{name}.lora_B.default"]["adapter"] == "default"
        for k, call in enumerate(truth.calls):
            want = _delta_rel_slowly(call["end"], name, scale, layer.fan_in_fan_out)
            got = mod["stages"][k]["lora_delta_rel"]
            assert got == pytest.approx(want, rel=1e-5), (name, k)
        # ... and what PEFT itself says of the final adapter
        peft_delta = layer.get_delta_weight("default").detach().double()
        assert float(torch.linalg.vector_norm(peft_delta) / torch.linalg.vector_norm(layer.base_layer.weight.double())) \
            == pytest.approx(mod["stages"][-1]["lora_delta_rel"], rel=1e-5)
    rows = set(wrapped) | {f"{n}.base_layer" for n in wrapped}
    for m in s["modules"]:
        if m["name"] not in rows:
            assert all(st.get("lora_delta_rel") is None for st in m["stages"]), m["name"]
