"""Data-parallel training on 2 CPU processes (Lightning DDP), and streamed against in-memory training patches.

Run: ``python benchmarks/ddp.py [--data ../shared/data/her2st] [--epochs 2] [--train C4 C5]``. It fits the
default preset (its network, ridge probe and blend) on the training sections, C6 held out, three ways, each in a
fresh process:

- **baseline**: ``accelerator="cpu", devices=1``, patches in memory (``stream=False``);
- **ddp**: ``accelerator="cpu", devices=2, strategy="ddp"``: Lightning starts a second process by running this
  script again (hence the ``if __name__ == "__main__":`` guard, and only rank 0 writes its result);
- **stream**: ``devices=1, stream=True``: each batch's patches are cut from the images when needed.

It prints, for each, the training seconds per epoch (validation included; the mean over epochs, Lightning's set-up
and DDP's process start excluded, and shown apart), the whole ``fit`` time, the peak resident memory of the
(rank-0) process, the last validation loss and the HVG-50 PCC on C6, with ratios against the baseline measured in
the same run. Results are also written to ``benchmarks/results/ddp.md``. It is a check that DDP and streaming work
and give comparable models, not an accuracy claim.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
RUNS = {
    "baseline": {"devices": 1, "strategy": "auto", "stream": False},
    "ddp": {"devices": 2, "strategy": "ddp", "stream": False},
    "stream": {"devices": 1, "strategy": "auto", "stream": True},
}


def _time_epochs(record: list) -> None:
    """Add a callback to every training run of this process that records each epoch's wall time."""
    import lightning as L

    from st_from_he.tl import _callbacks

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):  # after the epoch's validation
            record.append(time.perf_counter() - self.start)

        def on_train_start(self, trainer, pl_module):
            record.append(("start", time.perf_counter()))

    make = _callbacks.make_callbacks  # `train` imports it at each call, so the patch is seen
    _callbacks.make_callbacks = lambda *args, **kwargs: [*make(*args, **kwargs), EpochTimer()]


def run(name: str, data: str, epochs: int, sections: list[str], out: str) -> None:
    """Fit one way (``name`` in :data:`RUNS`), predict C6, and write the measurements to ``out`` (rank 0 only)."""
    import torch

    import st_from_he as sth

    torch.set_num_threads(1 if RUNS[name]["devices"] > 1 else 2)  # 2 cores: one per DDP process
    sdata = sth.datasets.her2st([*sections, "C6"], path=data)
    train, test = sth.pp.split_sections(sdata, test=["C6"])
    genes = sth.pp.select_genes(train, n_top=200)
    epochs_s: list = []
    _time_epochs(epochs_s)
    model = sth.tl.ExpressionModel(genes, preset="default")
    start = time.perf_counter()
    model.fit(
        train,
        max_epochs=epochs,
        patience=None,
        accelerator="cpu",
        devices=RUNS[name]["devices"],
        strategy=RUNS[name]["strategy"],
        stream=RUNS[name]["stream"],
        progress_bar=False,
        seed=0,
    )
    fit_s = time.perf_counter() - start
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return  # the second DDP process: rank 0 reports
    sth.tl.predict_expression(test, model, progress_bar=False)
    summary = sth.tl.evaluate(test, gene_sets=("hvg",))["summary"]
    train_start = next(t for kind, t in (e for e in epochs_s if isinstance(e, tuple)))
    per_epoch = [e for e in epochs_s if not isinstance(e, tuple)]
    result = {
        "run": name,
        **RUNS[name],
        "n_train": model.training_info["n_train_spots"],
        "n_val": model.training_info["n_val_spots"],
        "patches_gb": (model.training_info["n_train_spots"] + model.training_info["n_val_spots"])
        * len(model.context)
        * 3
        * model.size_px**2
        / 1e9,
        "epochs": len(per_epoch),
        "s_per_epoch": sum(per_epoch) / len(per_epoch),
        "setup_s": train_start - start,
        "fit_s": fit_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "val_loss": float(model.history["val_loss"].iloc[-1]),
        "hvg_pcc": float(summary["pcc_hvg"].mean()),
        "best_epoch": model.training_info["best_epoch"],
    }
    Path(out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared/data/her2st"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", nargs="+", default=["C4", "C5"], help="training sections (C6 is held out)")
    parser.add_argument("--run", choices=list(RUNS), help=argparse.SUPPRESS)  # one run, in this process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run(args.run, args.data, args.epochs, args.train, args.out)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in RUNS:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--data", args.data, "--epochs", str(args.epochs), "--train", *args.train]
            start = time.perf_counter()
            subprocess.run([*cmd, "--run", name, "--out", str(out)], check=True)
            results.append(json.loads(out.read_text()) | {"wall_s": time.perf_counter() - start})
    text = report(results, args)
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "ddp.md").write_text(text)


def same_model(base: dict, results: list[dict]) -> str:
    """Whether the streamed run's validation loss and PCC equal the baseline's, in words."""
    stream = next((r for r in results if r["stream"]), None)
    if stream is None:
        return "not run"
    same = all(abs(stream[k] - base[k]) <= 1e-6 * max(1.0, abs(base[k])) for k in ("val_loss", "hvg_pcc"))
    return "validation loss and HVG PCC equal" if same else "validation loss or HVG PCC DIFFER"


def report(results: list[dict], args) -> str:
    base = results[0]
    rows = [
        "| run | devices | strategy | stream | s/epoch | ratio | set-up s | fit s | peak RSS GB | RSS ratio | "
        "val loss | HVG-50 PCC (C6) | best epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['run']} | {r['devices']} | {r['strategy']} | {r['stream']} | {r['s_per_epoch']:.1f} | "
            f"{r['s_per_epoch'] / base['s_per_epoch']:.2f} | {r['setup_s']:.1f} | {r['fit_s']:.1f} | "
            f"{r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] / base['peak_rss_gb']:.2f} | {r['val_loss']:.4f} | "
            f"{r['hvg_pcc']:.4f} | {r['best_epoch']} |"
        )
    return "\n".join(
        [
            "# Data-parallel (DDP) and streamed training",
            "",
            f"`python benchmarks/ddp.py --epochs {args.epochs} --train {' '.join(args.train)}`: the default preset "
            f"fitted on her2st {', '.join(args.train)} ({base['n_train']} training + {base['n_val']} validation "
            f"spots), {base['epochs']} epoch(s), seed 0, C6 held out; each run in a fresh process on this "
            f"machine's CPUs (no GPU). Ratios are against the **baseline** (1 CPU process, patches in memory) of the "
            f"same run.",
            "",
            *rows,
            "",
            "- s/epoch: wall time of a training epoch and its validation (mean over epochs); set-up: from `fit` to "
            "the first epoch (reading the data, cutting patches when in memory, building the model, and for DDP "
            "starting the second process, which runs the script again); fit: the whole `fit` (network, ridge probe "
            "on plain and blurred patches, blend, refit).",
            f"- peak RSS: maximum resident memory of the (rank-0) process over the whole run, decoded images "
            f"included; the training patches themselves take {base['patches_gb']:.3f} GB in memory, so here the "
            f"decoded section images, not the patches, set the peak (streaming saves memory when the patches are "
            f"the larger part: many sections, or images read tile by tile).",
            "- val loss: the last epoch's validation loss (under DDP, the mean over both processes' validation "
            "spots; DistributedSampler pads the validation set to equal halves, and each process sees half of each "
            "global batch, so the DDP model is comparable, not identical).",
            f"- stream: the same model as the baseline at equal seed: {same_model(base, results)} here "
            f"(`tests/test_streaming.py` checks predictions and history equal).",
            "",
            "## Which strategy where",
            "",
            '- `strategy="ddp"` (measured above): Lightning runs the calling script again for each further '
            'process, so `fit` must be called under `if __name__ == "__main__":`, and every process runs the '
            "script's code after `fit` too (let rank 0, `LOCAL_RANK` 0, write results). It cannot work from Jupyter.",
            '- `strategy="ddp_notebook"` (Jupyter, or any interactive session): forks the process; training '
            "runs in the forks and rank 0's history and best weights come back to the calling process "
            "(`tests/test_streaming.py::test_ddp_on_two_cpu_processes`, 2 CPU processes). Forking after numba's "
            "OpenMP threads ran (scanpy, e.g. `sth.pp.select_genes`) hung in DDP's first broadcast on this machine "
            "when `OMP_NUM_THREADS` was set; `NUMBA_THREADING_LAYER=workqueue` (set before importing) avoids it, "
            "and `fit` warns when the risk is there.",
            '- `strategy="ddp_spawn"`: starts fresh processes and pickles the model and data loaders to them; on '
            'this machine it needed `torch.multiprocessing.set_sharing_strategy("file_system")` first (torch\'s '
            'default file-descriptor sharing failed: "unable to resize file").',
            "",
        ]
    )


if __name__ == "__main__":
    main()
