"""`make demo`: the main job end to end on the embedded default (local mode), in minutes on CPU.

1. Prepare inputs that a real run would download (no network here): local English text from
   Python's bundled docs in two sources, a "domain" (standard-library docstrings) and a
   "replay" source (reference-manual topics, standing in for the base model's original data),
   a byte-level BPE tokenizer trained on both, and a tiny random-init Llama saved as a Hugging
   Face model dir. This is the "base model" being continually pretrained.
2. Run `cpt local examples/tiny-local.yaml`: plan (with the 0.9/0.1 mixture) -> preflight ->
   tokenize (2 shards in parallel) -> train (torchrun, 2 CPU processes, checkpoints, held-out
   loss per source every 50 steps) -> export to Hugging Face with eval.json and a model card.
3. Print the mixture (tokens drawn per source) and the before/after table per source, then load
   the exported model with transformers and generate a sample.
4. Draw the loss curve (terminal) and write .demo/run/curves.png (`cpt plot`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
RUN_YAML = ROOT / "examples" / "tiny-local.yaml"


REPLAY_DOCS = 200
"""The first documents of Python's docs (reference-manual topics) form the replay source."""


def prepare_inputs(demo: Path = DEMO, n_docs: int = 800) -> None:
    from cpt_training.corpus import python_docs, train_bpe_tokenizer
    from cpt_training.testing import make_tiny_llama

    base = demo / "base-model"
    dirs = {"replay": demo / "replay", "domain": demo / "domain"}
    if (base / "config.json").exists() and all(d.exists() for d in dirs.values()):
        print(f"inputs already prepared under {demo}")
        return
    shutil.rmtree(demo, ignore_errors=True)
    for d in dirs.values():
        d.mkdir(parents=True)
    docs = []
    for i, doc in enumerate(python_docs()):
        if i >= n_docs:
            break
        where = dirs["replay"] if i < REPLAY_DOCS else dirs["domain"]
        (where / f"doc-{i:04d}.txt").write_text(doc + "\n", encoding="utf-8")
        docs.append(doc)
    print(
        f"wrote {len(docs) - REPLAY_DOCS} documents to {dirs['domain']} and {REPLAY_DOCS} "
        f"to {dirs['replay']}"
    )
    tok_dir = train_bpe_tokenizer(docs, demo / "tokenizer", vocab_size=1024)
    make_tiny_llama(
        base, 1024, hidden=128, layers=4, heads=4, kv_heads=2, seq=256, tokenizer_dir=tok_dir
    )
    print(f"tiny Llama base model in {base}")


def report(run: Path) -> str:
    """The mixture the run drew and the before/after table of its export (eval.json)."""
    import json

    manifest = json.loads((run / "checkpoints" / "data" / "manifest.json").read_text())
    progress = json.loads((run / "checkpoints" / "progress.json").read_text())
    result = json.loads((run / "hf-model" / "eval.json").read_text())
    seen = progress.get("tokensPerSource", {})
    total = max(1, sum(seen.values()))
    lines = ["data mixture (tokens in the source -> tokens trained on):"]
    for src in manifest["sources"]:
        drawn = seen.get(src["name"], 0)
        epochs = drawn / max(1, src["tokens"])
        lines.append(
            f"  {src['name']:<8} {src['tokens']:>9,} -> {drawn:>9,} "
            f"({drawn / total:.1%}, {epochs:.2f} epochs)"
        )
    lines += [
        "",
        "held-out loss per source, base model -> continually pretrained model:",
        f"  {'source':<8} {'blocks':>6} {'before':>8} {'after':>8} {'change':>8}",
    ]
    for name, e in [*result["sources"].items(), ("total", result["totals"])]:
        lines.append(
            f"  {name:<8} {e['blocks']:>6} {e['before']['loss']:>8.3f} "
            f"{e['after']['loss']:>8.3f} {e['lossChange']:>+8.3f}"
        )
    lines += [
        "  (negative change: adaptation; positive on the replay source: forgetting. The demo's",
        "   base model is random-init, so both sources improve here.)",
        "",
        f"model card: {run / 'hf-model' / 'README.md'}",
    ]
    return "\n".join(lines)


def sample(model_dir: Path, prompt: str = "The list") -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    torch.manual_seed(0)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=40, do_sample=True, top_k=20, temperature=0.8)
    return str(tok.decode(out[0], skip_special_tokens=True))


def run_yaml(workdir: Path, max_steps: int | None) -> Path:
    """The example, or (``max_steps``: a quick check of the whole path, used by its test) a
    copy with fewer steps, evaluations and checkpoints halfway and at the end."""
    if max_steps is None:
        return RUN_YAML
    import yaml

    doc = yaml.safe_load(RUN_YAML.read_text())
    half = max(1, max_steps // 2)
    doc["spec"]["training"].update(maxSteps=max_steps, evalEverySteps=half)
    doc["spec"]["checkpoints"]["everySteps"] = half
    out = workdir / ".demo" / "run.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def curves(run: Path) -> str:
    """The run's loss curve across attempts, drawn here and written as a PNG (`cpt plot`)."""
    from cpt_operator import plot

    data = plot.read_curves(str(run / "checkpoints"))
    png = run / "curves.png"
    plot.render_png(data, png, title="tiny-local (make demo)")
    return f"{plot.render_text(data)}curves: {png} (also: cpt plot {run / 'checkpoints'})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep-run", action="store_true", help="do not wipe .demo/run first")
    ap.add_argument(
        "--workdir", type=Path, default=ROOT, help="where .demo/ goes (default: the checkout)"
    )
    ap.add_argument("--max-steps", type=int, help="fewer steps than the example's (a quick check)")
    args = ap.parse_args()
    demo = args.workdir.resolve() / ".demo"
    prepare_inputs(demo)
    if not args.keep_run:
        shutil.rmtree(demo / "run", ignore_errors=True)
    cpt = Path(sys.executable).with_name("cpt")
    spec = run_yaml(args.workdir.resolve(), args.max_steps)
    rc = subprocess.call([str(cpt), "local", str(spec)], cwd=args.workdir)
    if rc != 0:
        print(f"cpt local failed with exit code {rc}", file=sys.stderr)
        return rc
    model_dir = demo / "run" / "hf-model"
    print("\n" + report(demo / "run"))
    print("\nsample from the continually pretrained model:")
    print("  " + sample(model_dir).replace("\n", "\n  "))
    print("\n" + curves(demo / "run"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
