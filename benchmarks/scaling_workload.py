"""The report-scaling benchmark's workload: a synthetic two-stage fine-tuning run of N tensors ×
S steps, written with the store's own pieces (see report_scaling.py's docstring for how)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

GENERATOR_VERSION = 1           # bump when the synthetic run changes (invalidates cached runs)


def build_model(n_tensors: int):
    """A model of exactly `n_tensors` parameter tensors: body = blocks of (Linear(2, 2), LayerNorm(2))
    (4 tensors each), head = Linear(2, 2) layers (2 tensors; the last without bias when N is odd)."""
    from collections import OrderedDict

    from torch import nn

    blocks = (n_tensors - 1) // 4 if n_tensors >= 5 else 0
    rest = n_tensors - 4 * blocks
    body = nn.Sequential(*[nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)) for _ in range(blocks)])
    head = [nn.Linear(2, 2) for _ in range(rest // 2)] + ([nn.Linear(2, 2, bias=False)] if rest % 2 else [])
    model = nn.Sequential(OrderedDict(body=body, head=nn.Sequential(*head)))
    assert sum(1 for _ in model.parameters()) == n_tensors
    return model


def record_template(n_tensors: int, run_dir: Path, steps_per_stage: int = 2) -> None:
    """A real two-stage run recorded by `freezeframe.watch` (every=1): the source of the model map,
    the param groups, the stage hashes and the reference weights of the benchmark run."""
    import torch

    import freezeframe

    torch.manual_seed(n_tensors)
    torch.set_num_threads(1)
    model = build_model(n_tensors)
    body_linear = [p for m in model.body.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()]
    opt = torch.optim.SGD([{"params": list(model.body.parameters())}, {"params": list(model.head.parameters())}],
                          lr=1e-3, momentum=0.9, weight_decay=0.01)
    x = torch.randn(8, 2)
    with freezeframe.watch(model, opt, run_dir, every=1, mode="overwrite") as rec:
        for p in body_linear:
            p.requires_grad_(False)
        for name in ("head only", "unfrozen"):
            with rec.stage(name):
                for _ in range(steps_per_stage):
                    opt.zero_grad()
                    loss = model(x).square().mean()
                    loss.backward()
                    opt.step()
                    rec.log(loss=float(loss))
            for p in body_linear:
                p.requires_grad_(True)


def one_cycle(n: int, peak: float, *, div: float = 25.0, final_div: float = 1e4, warm: float = 0.25):
    """fastai's one-cycle shape over n steps: cosine from peak/div up to peak, then down to peak/final_div."""
    import numpy as np

    t = np.arange(n) / max(n - 1, 1)
    up = t < warm
    x = np.where(up, t / warm, (t - warm) / (1 - warm))
    cos = (1 - np.cos(np.pi * x)) / 2
    lo_up, lo_down = peak / div, peak / final_div
    return np.where(up, lo_up + (peak - lo_up) * cos, peak + (lo_down - peak) * cos)


def generate(n_tensors: int, n_steps: int, every: int, case_dir: Path) -> dict:
    """Write the benchmark run of `case_dir` (see the module docstring); returns its description."""
    import numpy as np

    from freezeframe.capture.columns import Columns
    from freezeframe.store import layout
    from freezeframe.store import writer as store

    t_start = time.perf_counter()
    template, run_dir = case_dir / "template", case_dir / "run"
    for d in (template, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    record_template(n_tensors, template)
    t_template = time.perf_counter() - t_start
    m = json.loads((template / layout.MANIFEST).read_text())
    P = len(m["model"]["params"])
    B = len(m["model"]["buffers"])
    assert P == n_tensors and B == 0, (P, B)
    assert [s["name"] for s in m["stages"]] == ["head only", "unfrozen"], [s["name"] for s in m["stages"]]
    ref = np.asarray([x if x is not None else 1.0 for x in m["ref_norms"]], dtype=np.float64)
    group_of = np.zeros(P, dtype=np.int64)
    for g in m["stages"][1]["groups"]:
        group_of[g["params"]] = g["index"]
    n_groups = 1 + int(group_of.max())

    rng = np.random.default_rng(n_tensors * 1_000_003 + n_steps)
    S0 = n_steps // 2
    bounds = [(0, S0), (S0, n_steps)]
    peaks = [np.full(n_groups, 1e-3), np.array([1e-4, 1e-3][:n_groups] + [1e-3] * max(0, n_groups - 2))]
    trainable = [np.asarray(sorted(s["trainable"]), dtype=np.int64) for s in m["stages"]]
    base = rng.uniform(-3.4, -2.4, P)                 # log10 update ratio at lr 1e-3
    final_drift = 10 ** rng.uniform(-2.5, -0.7, P)    # drift / ||W_ref|| at the end of training
    grad_scale = 10 ** rng.uniform(-2.0, 0.5, P)
    norm_trend = rng.uniform(-0.05, 0.05, P)
    starts = np.where(np.isin(np.arange(P), trainable[0]), 0, S0)   # when each tensor begins to train
    t0 = m["created"] if isinstance(m.get("created"), (int, float)) else time.time()
    dt_step = 0.05

    def progress(idx, step):
        return (step[:, None] + 1 - starts[idx][None, :]) / (n_steps - starts[idx][None, :])

    def drift_of(idx, step, noise=True):
        d = ref[idx] * final_drift[idx] * np.sqrt(np.clip(progress(idx, step), 0, None))
        return d * (1 + 0.03 * rng.standard_normal(d.shape)) if noise else d

    def pnorm_of(idx, step, noise=True):
        p = ref[idx] * (1 + norm_trend[idx] * np.clip(progress(idx, step), 0, None))
        return p * (1 + 1e-4 * rng.standard_normal(p.shape)) if noise else p

    Path(run_dir).mkdir(parents=True)
    path, existing = store.prepare_run_dir(run_dir, "new")
    assert existing is None
    shutil.copyfile(template / layout.REFERENCE, path / layout.REFERENCE)
    writer = store.RunWriter(path, 0)
    cols = Columns(P)
    chunk_rows = 2_000_000       # a flush every ~2 M tensor rows (the recorder flushes every few seconds)
    rows = pending = 0
    end_metrics = []
    last_p, last_d = ref.copy(), np.zeros(P)
    for k, (a, b) in enumerate(bounds):
        n = b - a
        lr = np.stack([one_cycle(n, pk) for pk in peaks[k]], axis=1)                        # n × groups
        mom = np.repeat((0.95 - 0.10 * (lr[:, -1:] / peaks[k][-1]))[:, :1], n_groups, axis=1)
        wd = [0.01] * n_groups
        idx = trainable[k]
        bits = np.zeros(P, dtype=np.uint8)
        bits[idx] = 1
        mask = np.packbits(bits).tobytes()
        rec_steps = np.arange(a, b, every, dtype=np.int64)   # the first step of a stage is always recorded
        rec_set = np.zeros(n, dtype=bool)
        rec_set[rec_steps - a] = True
        per_chunk = max(1, chunk_rows // max(len(idx), 1))
        loss = 2.0 * np.exp(-np.arange(a, b) / (0.3 * n_steps)) + 0.3 + 0.05 * rng.standard_normal(n)
        for c0 in range(0, len(rec_steps), per_chunk):
            cs = rec_steps[c0:c0 + per_chunk]
            pn = pnorm_of(idx, cs)
            ratio = 10 ** (base[idx][None, :] + np.log10(lr[cs - a][:, group_of[idx]] / 1e-3)
                           + 0.25 * rng.standard_normal((len(cs), len(idx))))
            un = (pn * ratio).astype(np.float32)
            gn = (grad_scale[idx][None, :] * 10 ** (0.3 * rng.standard_normal((len(cs), len(idx))))).astype(np.float32)
            dr = drift_of(idx, cs).astype(np.float32)
            pn = pn.astype(np.float32)
            idx32 = idx.astype(np.int32)
            # every applied step from this chunk's first recorded step up to the next chunk's
            s_lo = int(cs[0])
            s_hi = int(rec_steps[c0 + per_chunk]) if c0 + per_chunk < len(rec_steps) else b
            r = 0
            for s in range(s_lo, s_hi):
                i = s - a
                recorded = bool(rec_set[i])
                cols.add_step(s, k, 0, 0, t0 + (s + 1) * dt_step, recorded,
                              list(zip(lr[i].tolist(), mom[i].tolist(), wd)), mask)
                if recorded:
                    cols.add_tensors(s, idx32, (gn[r], None), (un[r], None), (pn[r], None), (dr[r], None))
                    r += 1
                cols.add_scalar(s, "loss", float(loss[i]))
            rows += len(cs) * len(idx)
            writer.drain()  # one flush in flight while the next is generated
            if writer.error is not None:
                raise writer.error
            writer.submit(cols.take(), None)
            pending += 1
        last = np.array([b - 1])
        last_p[idx] = pnorm_of(idx, last, noise=False)[0]
        last_d[idx] = drift_of(idx, last, noise=False)[0]
        end_metrics.append({"param_norm": last_p.tolist(), "drift": last_d.tolist()})

    # the template's manifest, scaled to this run
    m["steps_total"] = n_steps
    m["complete"] = True
    m["created"] = t0
    sess = m["sessions"][0]
    sess.update(every=every, calibration=None, started=t0, ended=t0 + n_steps * dt_step + 1.0, first_step=0,
                argv=["benchmarks/report_scaling.py", f"synthetic {n_tensors}x{n_steps} every={every}"])
    for k, ((a, b), st) in enumerate(zip(bounds, m["stages"])):
        n = b - a
        grad_steps = np.zeros(P, dtype=np.int64)
        grad_steps[trainable[k]] = n
        st.update(first_step=a, last_step=b - 1, steps=n, forward_passes={"train": n, "eval": n // 10},
                  grad_steps=grad_steps.tolist())
        em = dict(st.get("end_metrics") or {})
        em.update(end_metrics[k])
        st["end_metrics"] = em
    writer.drain()
    writer.submit({}, json.dumps(m, allow_nan=False).encode())
    writer.close(compact=True)
    if writer.error is not None:
        raise writer.error
    shutil.rmtree(template, ignore_errors=True)
    return {"tensors": n_tensors, "steps": n_steps, "every": every, "rows": rows, "flushes": pending,
            "generate_s": time.perf_counter() - t_start, "template_s": t_template,
            "generator_version": GENERATOR_VERSION}

