"""`make demo`: the main job end to end on the embedded default (local mode), in minutes on CPU.

1. Prepare inputs that a real run would download (no network here): local English text from
   Python's bundled docs, a byte-level BPE tokenizer trained on it, and a tiny random-init
   Llama saved as a Hugging Face model dir. This is the "base model" being continually
   pretrained.
2. Run `cpt local examples/tiny-local.yaml`: plan -> preflight -> tokenize (2 shards in
   parallel) -> train (torchrun, 2 CPU processes, checkpoints) -> export to Hugging Face.
3. Load the exported model with transformers and generate a sample.
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


def prepare_inputs(n_docs: int = 800) -> None:
    from cpt_training.corpus import python_docs, train_bpe_tokenizer
    from cpt_training.testing import make_tiny_llama

    base = DEMO / "base-model"
    text = DEMO / "text"
    if (base / "config.json").exists() and text.exists():
        print(f"inputs already prepared under {DEMO}")
        return
    shutil.rmtree(DEMO, ignore_errors=True)
    text.mkdir(parents=True)
    docs = []
    for i, doc in enumerate(python_docs()):
        if i >= n_docs:
            break
        (text / f"doc-{i:04d}.txt").write_text(doc + "\n", encoding="utf-8")
        docs.append(doc)
    print(f"wrote {len(docs)} documents to {text}")
    tok_dir = train_bpe_tokenizer(docs, DEMO / "tokenizer", vocab_size=1024)
    make_tiny_llama(
        base, 1024, hidden=128, layers=4, heads=4, kv_heads=2, seq=256, tokenizer_dir=tok_dir
    )
    print(f"tiny Llama base model in {base}")


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep-run", action="store_true", help="do not wipe .demo/run first")
    args = ap.parse_args()
    prepare_inputs()
    if not args.keep_run:
        shutil.rmtree(DEMO / "run", ignore_errors=True)
    cpt = Path(sys.executable).with_name("cpt")
    rc = subprocess.call([str(cpt), "local", str(RUN_YAML.relative_to(ROOT))], cwd=ROOT)
    if rc != 0:
        print(f"cpt local failed with exit code {rc}", file=sys.stderr)
        return rc
    model_dir = DEMO / "run" / "hf-model"
    print("\nsample from the continually pretrained model:")
    print("  " + sample(model_dir).replace("\n", "\n  "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
