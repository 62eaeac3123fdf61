"""``otcclip demo``: the main job, end to end, on scikit-learn's bundled digits.

1. Build digits train/test manifests; poison the training set with a targeted attack
   and a patch backdoor (``poison_truth.csv`` records which pairs are poisoned).
2. Start the embedded service (API + a real Celery worker on SQLite and the filesystem
   transport) and upload the poisoned set over HTTP.
3. Train two CLIP models through the API: ``none`` (plain CLIP) and ``otcclip``.
4. Sanitize the poisoned set with the ``otcclip`` checkpoint through the API; download
   the cleaned manifest, the decisions and both checkpoints.
5. Evaluate the downloaded checkpoints (zero-shot accuracy, targeted and backdoor ASR)
   and print the before/after table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

from otcclip.cli import CliError

TARGETED_CLASS = "three"
BACKDOOR_CLASS = "zero"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="poison digits, sanitize and train through the running API, print before/after")
    p.add_argument("--work-dir", type=Path, default=Path(".otcclip/demo"),
                   help="where data, service state and downloads go; emptied first (default .otcclip/demo)")
    p.add_argument("--model", default="otc-micro", help="model preset (default otc-micro, 16 px)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import logging

    for noisy in ("httpx", "otcclip", "uvicorn", "celery", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work = args.work_dir.resolve()
    if work.exists():
        if not (work / "digits-train").exists() and any(work.iterdir()):
            raise CliError(f"{work} exists and is not a previous demo directory; pick another --work-dir")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    run_demo(work, model=args.model, epochs=args.epochs, seed=args.seed)
    return 0


def _zip_images(root: Path, manifest: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.suffix.lower() in (".png", ".jpg", ".jpeg") and f != manifest:
                zf.write(f, f.relative_to(root).as_posix())
    return out


class _Client:
    def __init__(self, url: str, key: str) -> None:
        import httpx

        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def check(self, r: Any, *codes: int) -> Any:
        if r.status_code not in codes:
            raise CliError(f"{r.request.method} {r.request.url.path}: HTTP {r.status_code}: {r.text[:500]}")
        return r

    def upload(self, manifest: Path, images: Path) -> dict[str, Any]:
        files = {"manifest": (manifest.name, manifest.read_bytes()), "images": (images.name, images.read_bytes())}
        return dict(self.check(self.http.post("/v1/datasets", files=files), 201).json())

    def job(self, kind: str, dataset_id: str, settings: dict[str, Any]) -> str:
        r = self.http.post("/v1/jobs", json={"kind": kind, "dataset_id": dataset_id, "settings": settings})
        return str(self.check(r, 202).json()["id"])

    def wait(self, job_id: str, label: str) -> dict[str, Any]:
        log = StageLog(label)
        while True:
            job = self.check(self.http.get(f"/v1/jobs/{job_id}"), 200).json()
            log(job)
            if job["state"] in ("succeeded", "failed", "cancelled"):
                if job["state"] != "succeeded":
                    raise CliError(f"{label} job {job_id} {job['state']}: {job['error']}")
                return dict(job)
            time.sleep(1.0)


    def download(self, artifact_id: str) -> bytes:
        return bytes(self.check(self.http.get(f"/v1/artifacts/{artifact_id}"), 200).content)

    def artifacts(self, job_id: str) -> dict[str, str]:
        items = self.check(self.http.get(f"/v1/jobs/{job_id}/artifacts"), 200).json()
        return {a["name"]: a["id"] for a in items}


class StageLog:
    """Prints one line per change of a job's state or stage (not per poll):
    ``  label: running encode (0/2100)``, then ``  label: succeeded in 42 s``."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.last: tuple[str, str | None] | None = None
        self.t0 = time.monotonic()

    def __call__(self, job: dict[str, Any]) -> str | None:
        key = (str(job["state"]), job.get("stage"))
        if key == self.last:
            return None
        self.last = key
        if job["state"] in ("succeeded", "failed", "cancelled"):
            line = f"  {self.label}: {job['state']} in {time.monotonic() - self.t0:.0f} s"
        else:
            prog = job.get("progress") or {}
            total = f" ({prog.get('total')} to do)" if prog.get("total") else ""
            line = f"  {self.label}: {job['state']} {job.get('stage') or ''}{total}".rstrip()
        print(line, flush=True)
        return line


def run_demo(work: Path, *, model: str = "otc-micro", epochs: int = 30, seed: int = 0) -> dict[str, Any]:
    """Run the demo in ``work``; prints progress and the table, returns the numbers."""
    from otcclip.cli.embedded import run_embedded_service
    from otcclip.models.attacks import PoisonConfig, poison_many
    from otcclip.models.checkpoint import load_checkpoint
    from otcclip.models.datasets import DIGIT_TEMPLATES, digits_manifest
    from otcclip.models.evaluation import EvalConfig, evaluate
    from otcclip.models.manifest import read_manifest

    t0 = time.monotonic()
    print(f"otcclip demo: working in {work}")
    train_m = digits_manifest(work / "digits-train", split="train", seed=seed)
    test_m = digits_manifest(work / "digits-test", split="test", seed=seed)
    attacks = [
        PoisonConfig("targeted", TARGETED_CLASS, n_poison=150, n_targets=1, target_pool=test_m, seed=seed,
                     templates=DIGIT_TEMPLATES),
        PoisonConfig("backdoor-patch", BACKDOOR_CLASS, rate=0.1, patch_frac=0.3, seed=seed, templates=DIGIT_TEMPLATES),
    ]
    poisoned = poison_many(read_manifest(train_m), work / "poisoned", configs=attacks)
    truth = {r["id"]: r for r in csv.DictReader(poisoned.truth_path.open())}
    n_poison = sum(r["poisoned"] in ("1", "true", "True") for r in truth.values())
    print(f"1. poisoned {len(truth)} digit pairs: {n_poison} poisoned "
          f"(targeted -> {TARGETED_CLASS!r}, patch backdoor -> {BACKDOOR_CLASS!r})")
    images_zip = _zip_images(poisoned.manifest_path.parent, poisoned.manifest_path, work / "poisoned-images.zip")

    results: dict[str, Any] = {}
    with run_embedded_service(work / "service", port=0, worker_log=work / "worker.log") as svc:
        print(f"2. embedded service at {svc.url} (SQLite + Celery worker on the filesystem transport)")
        api = _Client(svc.url, svc.create_key("demo"))
        ds = api.upload(poisoned.manifest_path, images_zip)
        print(f"   uploaded dataset {ds['id']}: {ds['n_rows']} rows, sha256 {ds['sha256'][:12]}...")
        train_settings = {"model": model, "epochs": epochs, "batch_size": 128, "seed": seed, "lr": 1e-3,
                          "warmup_epochs": max(1, epochs // 5), "rematch_every": max(1, epochs // 5),
                          "device": "cpu"}
        jobs = {d: api.job("train", ds["id"], {**train_settings, "defence": d}) for d in ("none", "otcclip")}
        print("3. training through the API: " + ", ".join(f"{d} (job {j})" for d, j in jobs.items()))
        done = {d: api.wait(j, f"train {d}") for d, j in jobs.items()}
        ckpt_art = {d: done[d]["result"]["artifacts"]["checkpoint"] for d in done}
        san_id = api.job("sanitize", ds["id"], {"checkpoint": ckpt_art["otcclip"], "k": 16, "device": "cpu"})
        print(f"4. sanitizing with the otcclip checkpoint (job {san_id})")
        san = api.wait(san_id, "sanitize")
        arts = api.artifacts(san_id)
        cleaned_name = next(n for n in arts if n.startswith("cleaned."))
        (work / "out").mkdir(exist_ok=True)
        for name in (cleaned_name, "decisions.parquet", "report.json", "report.html"):
            (work / "out" / name).write_bytes(api.download(arts[name]))
        for d, art in ckpt_art.items():
            with tarfile.open(fileobj=io.BytesIO(api.download(art))) as tf:
                tf.extractall(work / "out" / f"ckpt-{d}", filter="data")
        print(f"   downloaded {cleaned_name}, decisions.parquet, report.json/html and both checkpoints to {work / 'out'}")
        results["sanitize_counts"] = san["result"]["counts"]
        results["model_quality"] = san["result"].get("model_quality") or {}

    # 5. Evaluate the downloaded checkpoints.
    test = read_manifest(test_m, columns=("image", "label"))
    trigger = poisoned.manifest_path.parent / "trigger-backdoor-patch.json"
    config = EvalConfig(trigger=trigger, targets=poisoned.targets_path, templates=DIGIT_TEMPLATES,
                        linear_probe=False, seed=seed)
    evals: dict[str, Any] = {}
    for d in ("none", "otcclip"):
        ckpt_dir = next((work / "out" / f"ckpt-{d}").rglob("open_clip_config.json")).parent
        evals[d] = evaluate(load_checkpoint(ckpt_dir, device="cpu"), test, config=config).to_dict()
    results["eval"] = evals
    results["detection"] = _detection(work / "out" / "decisions.parquet", truth)
    _print_table(evals, results["sanitize_counts"], results["detection"], len(truth))
    if results["model_quality"].get("message"):
        print(f"model check: {results['model_quality']['message']}")
    print(f"\ndone in {time.monotonic() - t0:.0f} s; report: {work / 'out' / 'report.html'}")
    (work / "out" / "demo_results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def _detection(decisions: Path, truth: dict[str, dict[str, str]]) -> dict[str, float]:
    import pyarrow.parquet as pq

    t = pq.read_table(decisions, columns=["id", "action"]).to_pylist()
    poisoned = {i for i, r in truth.items() if r["poisoned"] in ("1", "true", "True")}
    flagged = {r["id"] for r in t if r["action"] != "keep"}
    dropped = {r["id"] for r in t if r["action"] == "drop"}
    tp = len(flagged & poisoned)
    return {"precision": tp / len(flagged) if flagged else 0.0, "recall": tp / len(poisoned) if poisoned else 0.0,
            "flagged": float(len(flagged)), "poisoned": float(len(poisoned)),
            "clean": float(len(t) - len(poisoned)), "clean_changed": float(len(flagged - poisoned)),
            "clean_dropped": float(len(dropped - poisoned))}


def _asr(ev: dict[str, Any]) -> tuple[float, float]:
    targeted = ev.get("targeted") or {}
    back = ev.get("backdoor") or [{}]
    return 100 * float(targeted.get("asr", 0.0)), 100 * float(back[0].get("asr", 0.0))


def _print_table(evals: dict[str, Any], counts: dict[str, Any], det: dict[str, float], n_pairs: int) -> None:
    action = counts.get("action", counts)
    print("\n| model (trained on the poisoned digits) | zero-shot top-1 | targeted ASR | backdoor ASR |")
    print("|---|---|---|---|")
    for d, label in (("none", "plain CLIP (before)"), ("otcclip", "OTCCLIP (after)")):
        ev = evals[d]
        t, b = _asr(ev)
        print(f"| {label} | {100 * ev['zero_shot_top1']:.1f}% | {t:.1f}% | {b:.1f}% |")
    print(f"\nsanitize pass with the OTCCLIP checkpoint over {n_pairs} pairs: "
          f"kept {action.get('keep', 0)}, re-assigned {action.get('reassign', 0)}, dropped {action.get('drop', 0)}; "
          f"poisoned pairs flagged: recall {100 * det['recall']:.1f}%, precision {100 * det['precision']:.1f}%; "
          f"clean pairs changed {det['clean_changed']:.0f} of {det['clean']:.0f} ({det['clean_dropped']:.0f} dropped)")
